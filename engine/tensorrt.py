"""TensorRT engines built from our ONNX exports, cached on disk, and run on torch CUDA tensors.

An engine is only valid for the ONNX graph, optimisation profile, precision, TensorRT version
and GPU it was built for, so those make up its cache key (`EngineKey`); a change in any of them
gives another file name, and a stale engine is rebuilt rather than loaded. Each engine file has
a JSON record beside it with the sha256 of its bytes, so a truncated or damaged file is noticed
and rebuilt instead of handed to TensorRT.

Written against the TensorRT 10 Python API. `tensorrt` is imported only when needed, so this
module imports (and the rest of the engine runs) on machines without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from magicseg_engine.atomic import atomic_output, atomic_write_text, check_writable_dir
from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "BuildTarget",
    "EngineKey",
    "PRECISIONS",
    "TensorRTRunner",
    "build_engine",
    "profile_shapes",
    "require_tensorrt",
    "tensorrt_status",
]

NOT_INSTALLED = ("TensorRT is not installed: install TensorRT 10 for your CUDA version "
                 "(pip install tensorrt from NVIDIA's index) or use --format onnx")
NO_GPU = ("TensorRT engines need an NVIDIA GPU and none is visible to torch: "
          "run on a machine with a CUDA GPU or use --format onnx")

PRECISIONS = ("fp32", "fp16", "bf16")
_PRECISION_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}

# Bumped when the key's canonical form or the record's layout changes, so old caches miss.
_CACHE_FORMAT = 1
ENGINE_SUFFIX = ".engine"
RECORD_SUFFIX = ".json"


# --------------------------------------------------------------------------- availability

def _import_tensorrt():
    import tensorrt

    return tensorrt


def _cuda_device() -> tuple[str, tuple[int, int]] | None:
    """Name and compute capability of torch's current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return p.name, (int(p.major), int(p.minor))


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one line saying why): TensorRT 10+ imports and torch sees a CUDA GPU."""
    try:
        trt = _import_tensorrt()
    except ModuleNotFoundError as err:
        if err.name in (None, "tensorrt"):
            return False, NOT_INSTALLED
        return False, _broken(err)
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and others
        return False, _broken(err)
    version = getattr(trt, "__version__", "?")
    if _major(version) < 10:
        return False, (f"TensorRT {version} is installed, but engines need TensorRT 10 or newer: "
                       "upgrade it or use --format onnx")
    device = _cuda_device()
    if device is None:
        return False, NO_GPU
    name, (major, minor) = device
    return True, f"TensorRT {version} on {name} (sm_{major}{minor})"


def _broken(err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return (f"TensorRT cannot be imported ({type(err).__name__}: {first}): reinstall TensorRT 10 "
            "for your CUDA version or use --format onnx")


def require_tensorrt():
    """The `tensorrt` module, or UsageError with the one line `tensorrt_status` gives."""
    ok, reason = tensorrt_status()
    if not ok:
        raise UsageError(reason)
    return _import_tensorrt()


@dataclass(frozen=True)
class BuildTarget:
    """What a serialised engine is tied to besides its network: TensorRT version and GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def _current_target() -> BuildTarget:
    trt = require_tensorrt()
    device = _cuda_device()
    if device is None:  # the GPU went away between the two checks
        raise UsageError(NO_GPU)
    return BuildTarget(str(trt.__version__), device[0], device[1])


# --------------------------------------------------------------------------- profiles

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int | str | None]],
    batch_sizes: Sequence[int] | None,
    fixed: Mapping[str, int | tuple[int, int, int]] | None = None,
    *,
    batch_dim: str = "batch",
) -> Profile:
    """(min, opt, max) shape of every input for one TensorRT optimisation profile.

    A dimension named `batch_dim` spans min(batch_sizes)..max(batch_sizes); opt is the largest
    batch, since TensorRT tunes its kernels for opt and the largest batch is where throughput
    is decided. Every other symbolic dimension must be given in `fixed`, as one size or as a
    (min, opt, max) range (a name used by several inputs gets the same in all of them);
    integer dimensions stay as they are.
    Names in `fixed` that no input uses are ignored, so one mapping can serve several models.

    `batch_sizes` None is for a model whose calls are not sized by the batch (SAM's mask
    decoder: prompts of one image per call): every symbolic dimension then comes from
    `fixed`, and a `batch_dim` dimension is an error.
    """
    sizes = None if batch_sizes is None else list(batch_sizes)
    if sizes is not None and not sizes:
        raise ValueError("batch_sizes is empty: give at least one batch size")
    for b in sizes or ():
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be positive integers, got {b!r}")
    fixed = dict(fixed or {})
    if batch_dim in fixed:
        raise ValueError(f"{batch_dim!r} is set by batch_sizes, not by fixed dimensions")
    ranges_of: dict[str, tuple[int, int, int]] = {}
    for name, size in fixed.items():
        span = tuple(size) if isinstance(size, (tuple, list)) else (size,) * 3
        if (len(span) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in span)
                or not span[0] <= span[1] <= span[2]):
            raise ValueError(f"fixed dimension {name!r} must be a positive integer or a (min, opt, max) "
                             f"range of them, got {size!r}")
        ranges_of[name] = span
    if sizes is not None:
        ranges_of[batch_dim] = (min(sizes), max(sizes), max(sizes))

    missing: dict[str, list[str]] = {}
    uses_batch = False
    out: Profile = {}
    for inp, dims in input_shapes.items():
        ranges = []  # (min, opt, max) per axis
        for i, d in enumerate(dims):
            if isinstance(d, bool):
                raise ValueError(f"input {inp!r} dimension {i} is {d!r}, not a size or a name")
            if isinstance(d, int):
                if d < 0:
                    raise ValueError(f"input {inp!r} dimension {i} is {d}; name symbolic dimensions instead")
                ranges.append((d, d, d))
            elif d is None or d == "":
                raise ValueError(f"input {inp!r} dimension {i} is symbolic but has no name; "
                                 "name it in the export so it can be given a size")
            elif d in ranges_of:
                uses_batch = uses_batch or d == batch_dim
                ranges.append(ranges_of[d])
            else:
                missing.setdefault(str(d), []).append(inp)
                ranges.append((0, 0, 0))
        out[inp] = tuple(tuple(r[k] for r in ranges) for k in range(3))
    if missing:
        listed = "; ".join(f"{d!r} (in {', '.join(sorted(set(ins)))})" for d, ins in sorted(missing.items()))
        if sizes is None and batch_dim in missing:
            raise ValueError(f"symbolic dimensions without a size: {listed}; this profile was given no "
                             "batch sizes: give them, or size every dimension in fixed dimensions")
        raise ValueError(f"symbolic dimensions without a size: {listed}; give them in fixed dimensions")
    if sizes is not None and not uses_batch and min(sizes) != max(sizes):
        raise ValueError(f"no input has a dynamic {batch_dim!r} dimension, so one engine cannot serve "
                         f"batch sizes {min(sizes)}..{max(sizes)}; export with a dynamic batch or give one batch size")
    return out


# --------------------------------------------------------------------------- cache key

def _canonical_profile(profile) -> tuple[tuple[str, Shape, Shape, Shape], ...]:
    items = profile.items() if isinstance(profile, Mapping) else (
        (entry[0], entry[1:]) for entry in profile)
    rows = []
    for name, shapes in items:
        mn, opt, mx = shapes
        rows.append((str(name), tuple(int(d) for d in mn), tuple(int(d) for d in opt), tuple(int(d) for d in mx)))
    # Sorted by input name: the same profile must give the same key whatever order built it.
    return tuple(sorted(rows))


def canonical_precision(precision: str) -> str:
    p = _PRECISION_ALIASES.get(str(precision).strip().lower())
    if p is None:
        raise UsageError(f"unknown engine precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return p


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialised engine depends on; equal keys mean an interchangeable engine.

    `profile` may be given as a mapping {input: (min, opt, max)}; it is stored as a tuple sorted
    by input name, so keys compare, hash and digest the same whatever order it came in.
    """

    onnx_sha256: str
    profile: tuple[tuple[str, Shape, Shape, Shape], ...]
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "profile", _canonical_profile(self.profile))
        object.__setattr__(self, "precision", canonical_precision(self.precision))
        object.__setattr__(self, "compute_capability", tuple(int(c) for c in self.compute_capability))
        object.__setattr__(self, "onnx_sha256", str(self.onnx_sha256).lower())

    def profile_dict(self) -> Profile:
        return {name: (mn, opt, mx) for name, mn, opt, mx in self.profile}

    def as_json(self) -> dict[str, Any]:
        return {
            "format": _CACHE_FORMAT,
            "onnx_sha256": self.onnx_sha256,
            "profile": [[name, list(mn), list(opt), list(mx)] for name, mn, opt, mx in self.profile],
            "precision": self.precision,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
        }

    def digest(self) -> str:
        """sha256 (hex) of the key's canonical JSON: the same in every process and Python version."""
        text = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def engine_path(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / f"{self.digest()}{ENGINE_SUFFIX}"


def record_path(engine_path: str | Path) -> Path:
    """The JSON record beside an engine: its file name with `.json` appended."""
    return Path(str(engine_path) + RECORD_SUFFIX)


def _sha256_file(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of an engine; a big one is hashed once per process while it is unchanged
    (safe_files.file_sha256), since sweeps load the same multi-gigabyte engines again and again."""
    from magicseg_engine.safe_files import file_sha256

    size = Path(path).stat().st_size
    return size, file_sha256(path)


def read_record(engine_path: str | Path) -> dict | None:
    """The record build_engine wrote beside an engine, None if it is missing or not one."""
    return _read_record(Path(engine_path))


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Only a record build_engine wrote counts; an unrelated JSON file of that name does not.
    if not (isinstance(record, dict) and isinstance(record.get("key"), dict)
            and isinstance(record.get("engine_sha256"), str)):
        return None
    return record


def _cached_engine_ok(path: Path, key: EngineKey) -> bool:
    """True if `path` holds the engine `key` names, whole; warns about a damaged one."""
    if not path.exists():
        return False
    record = _read_record(path)
    if record is None or record.get("key") != key.as_json():
        log.warning("engine %s has no readable record of what it was built from; rebuilding it", path)
        return False
    try:
        size, sha = _sha256_file(path)
    except OSError as err:
        log.warning("engine %s cannot be read (%s); rebuilding it", path, err.strerror)
        return False
    if size != record.get("engine_bytes"):
        log.warning("engine %s is truncated or damaged (%d bytes, its record says %s); rebuilding it",
                    path, size, record.get("engine_bytes"))
        return False
    if sha != record.get("engine_sha256"):
        log.warning("engine %s is damaged (its sha256 differs from its record); rebuilding it", path)
        return False
    return True


# --------------------------------------------------------------------------- build

def _check_precision(precision: str, target: BuildTarget) -> None:
    cc = target.compute_capability
    sm = f"sm_{cc[0]}{cc[1]}"
    if precision == "bf16" and cc < (8, 0):
        raise UsageError(f"{target.gpu_name} ({sm}) has no bf16 support: bf16 engines need compute "
                         "capability 8.0 or newer; build with fp16 or fp32")
    # Fast fp16 arithmetic: sm_53, sm_60, sm_62 and everything from sm_70 on (sm_61 has it at 1/64 rate).
    if precision == "fp16" and not (cc >= (7, 0) or cc in ((5, 3), (6, 0), (6, 2))):
        raise UsageError(f"{target.gpu_name} ({sm}) has no fast fp16: build with fp32")


def build_engine(
    exported,
    cache_dir: str | Path,
    batch_sizes: Sequence[int] | None,
    precision: str,
    fixed_dims: Mapping[str, int | tuple[int, int, int]] | None = None,
    timing_cache_path: str | Path | None = None,
    workspace_gib: float | None = None,
) -> Path:
    """Path of a TensorRT engine for `exported` (an ONNX export), building it if no valid one is cached.

    `exported` is any object with `component`, `path`, `input_shapes` (dims as ints or names) and
    `sha256` of the ONNX model; that sha256 is what the cache trusts, so for a model with external
    data it must cover the weights file too. The engine lives in `cache_dir` under its key's
    digest, with a JSON record; a cached engine whose bytes do not match its record is rebuilt
    with a warning. "fp32" leaves TensorRT's default of TF32 matmuls and convolutions on Ampere
    and newer in place; "fp16" and "bf16" additionally allow kernels of that type.
    `batch_sizes` and `fixed_dims` give the optimisation profile, as `profile_shapes` reads them
    (None batch sizes: a model whose dims all come from `fixed_dims`).
    """
    # TensorRT and a GPU first: without them nothing below can be used, and cache_dir is untouched.
    target = _current_target()
    precision = canonical_precision(precision)
    profile = profile_shapes(exported.input_shapes, batch_sizes, fixed_dims)
    _check_precision(precision, target)
    if workspace_gib is not None and not workspace_gib > 0:
        raise UsageError(f"workspace must be a positive number of GiB, got {workspace_gib!r}")

    key = EngineKey(
        onnx_sha256=exported.sha256,
        profile=profile,
        precision=precision,
        tensorrt_version=target.tensorrt_version,
        gpu_name=target.gpu_name,
        compute_capability=target.compute_capability,
    )
    path = key.engine_path(cache_dir)
    component = getattr(exported, "component", "model")
    if _cached_engine_ok(path, key):
        log.info("%s: reusing TensorRT engine %s", component, path)
        return path

    onnx_path = Path(exported.path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX model {onnx_path} is missing: export {component} again")
    # Fail on an unwritable cache before a build that can take many minutes, not after it.
    check_writable_dir(Path(cache_dir))

    log.info("%s: building TensorRT %s engine for %s (%s); this can take minutes",
             component, precision, _ranges_text(profile), target.gpu_name)
    start = time.perf_counter()
    serialized = _build_serialized(
        exported, profile, precision,
        timing_cache_path=Path(timing_cache_path) if timing_cache_path is not None else None,
        workspace_gib=workspace_gib,
    )
    seconds = time.perf_counter() - start
    data = memoryview(serialized).cast("B")

    # Engine first, record second: a crash in between leaves an engine without a record,
    # which the next call rebuilds rather than trusts.
    with atomic_output(path, "wb") as f:
        f.write(data)
    record = {
        "key": key.as_json(),
        "key_digest": key.digest(),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "engine_bytes": data.nbytes,
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "component": component,
        "onnx_path": str(onnx_path),
        "workspace_gib": workspace_gib,
    }
    atomic_write_text(record_path(path), json.dumps(record, indent=1, sort_keys=True) + "\n")
    log.info("%s: built %s (%.1f MiB) in %.1f s", component, path, data.nbytes / 2**20, seconds)
    return path


def _ranges_text(profile: Profile) -> str:
    """The profile's ranges, e.g. "sample 1..16x4x64x64, timestep 1..16", for the build log."""
    def dims(mn, mx):
        return "x".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(mn, mx))

    return ", ".join(f"{name} {dims(mn, mx)}" for name, (mn, _, mx) in profile.items())


_LOGGER = None


def _trt_logger(trt):
    """One process-wide TensorRT logger (TensorRT warns when builders and runtimes get different
    ones) that forwards to Python logging and keeps the errors of the current build for messages."""
    global _LOGGER
    if _LOGGER is not None:
        return _LOGGER

    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level, msg):  # ILogger.log(severity, msg), called by TensorRT
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    _LOGGER = _Logger()
    return _LOGGER


def _build_serialized(exported, profile: Profile, precision: str, *, timing_cache_path: Path | None,
                      workspace_gib: float | None):
    """Parse the ONNX file and build a serialised engine (TensorRT's IHostMemory, a buffer)."""
    trt = _import_tensorrt()
    logger = _trt_logger(trt)
    logger.errors.clear()
    onnx_path = Path(exported.path)

    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the old EXPLICIT_BATCH flag is gone.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): weights exported as external data sit in a file beside
    # the model, and the parser finds them relative to the model's path.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors or ["no detail"]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(f"TensorRT cannot parse {onnx_path}: {errors[0].splitlines()[0]}{more}; "
                         "use --format onnx for this model")

    dynamic = _check_network_inputs(network, profile, onnx_path)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    # The flags allow lower-precision kernels; layers without them, and the I/O types the ONNX
    # declares, stay as they are.
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)

    opt_profile = builder.create_optimization_profile()
    for name in dynamic:
        mn, opt, mx = profile[name]
        opt_profile.set_shape(name, mn, opt, mx)
    if dynamic and config.add_optimization_profile(opt_profile) < 0:
        raise UsageError(f"TensorRT rejected the optimisation profile for {onnx_path}: {profile}")

    cache = _load_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1].splitlines()[0] if logger.errors else "see the TensorRT log above"
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}: {detail}")
    if timing_cache_path is not None and cache is not None:
        with atomic_output(timing_cache_path, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()).cast("B"))
    return serialized


def _check_network_inputs(network, profile: Profile, onnx_path: Path) -> list[str]:
    """Names of the network's inputs that need a profile; errors if they disagree with `profile`."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if set(names) != set(profile):
        raise UsageError(f"inputs of {onnx_path} ({', '.join(sorted(names))}) differ from the export's "
                         f"record ({', '.join(sorted(profile))}): export it again")
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            raise UsageError(f"input {tensor.name} of {onnx_path} is a shape tensor, "
                             "which this engine builder does not handle")
        dims = tuple(tensor.shape)
        mn, _, mx = profile[tensor.name]
        if len(dims) != len(mn):
            raise UsageError(f"input {tensor.name} of {onnx_path} has rank {len(dims)}, "
                             f"the export's record {len(mn)}: export it again")
        for axis, d in enumerate(dims):
            if d >= 0 and not (mn[axis] == mx[axis] == d):
                raise UsageError(f"input {tensor.name} of {onnx_path} has fixed size {d} on axis {axis}, but the "
                                 f"engine would need {mn[axis]}..{mx[axis]}: export with that axis dynamic")
        if any(d < 0 for d in dims):
            dynamic.append(tensor.name)
    return dynamic


def _load_timing_cache(config, path: Path | None):
    """Attach a timing cache (tactic timings reused across builds) loaded from `path` if present."""
    if path is None:
        return None
    data = b""
    if path.exists():
        try:
            data = path.read_bytes()
        except OSError as err:
            log.warning("timing cache %s cannot be read (%s); starting an empty one", path, err.strerror)
    cache = None
    try:
        cache = config.create_timing_cache(data)
    except Exception as err:  # TensorRT raises on bytes it cannot parse
        log.debug("timing cache %s rejected: %s", path, err)
    # ignore_mismatch=False: timings measured on another GPU would pick the wrong tactics here.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            log.warning("timing cache %s is from another GPU or TensorRT version, or damaged; "
                        "starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


# --------------------------------------------------------------------------- run

def _dtype_table(trt) -> dict:
    import torch

    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
             ("INT8", torch.int8), ("UINT8", torch.uint8), ("INT32", torch.int32),
             ("INT64", torch.int64), ("BOOL", torch.bool), ("FP8", getattr(torch, "float8_e4m3fn", None))]
    return {getattr(trt.DataType, n): t for n, t in pairs if t is not None and hasattr(trt.DataType, n)}


class TensorRTRunner:
    """Runs a serialised engine on torch CUDA tensors: `runner(x=..., t=...) -> {"out": tensor}`.

    Inputs must be CUDA tensors on the device the runner was made on, with the engine's dtypes
    (they are not converted silently). Outputs are new tensors on the current stream.

    With `cuda_graph=True` the first call for a set of input shapes runs once and captures the
    engine's launch into a CUDA graph; later calls with the same shapes copy their inputs into
    the graph's buffers and replay it, which removes the per-kernel launch cost. Outputs are
    cloned out of the graph's buffers, so they stay valid after the next call. Not thread-safe.
    """

    def __init__(self, engine_path: str | Path, *, cuda_graph: bool = False, verify: bool = True):
        import torch

        trt = require_tensorrt()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UsageError(f"TensorRT engine {self.path} does not exist: build it first")
        self._check_record(verify)
        self._trt = trt
        self._logger = _trt_logger(trt)
        self.device = torch.device("cuda", torch.cuda.current_device())
        # The runtime must outlive the engine it deserialised, so it is kept.
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UsageError(f"TensorRT engine {self.path} could not be loaded (built by another TensorRT "
                             "version, or damaged): delete it and build it again")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")
        table = _dtype_table(trt)
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.dtypes: dict[str, torch.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = self.engine.get_tensor_dtype(name)
            if dtype not in table:
                raise UsageError(f"engine {self.path} tensor {name} has type {dtype}, which torch cannot hold")
            self.dtypes[name] = table[dtype]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
            else:
                self.output_names.append(name)
        self.cuda_graph = cuda_graph
        self._graph = None
        self._graph_shapes: tuple | None = None
        self._static_inputs: dict[str, torch.Tensor] = {}
        self._static_outputs: dict[str, torch.Tensor] = {}

    def _check_record(self, verify: bool) -> None:
        # An engine from build_engine has a record; refuse one made for another GPU or TensorRT
        # rather than let TensorRT fail obscurely or run untuned kernels.
        record = _read_record(self.path)
        if record is None:
            return
        key = record["key"]
        target = _current_target()
        built = (key.get("tensorrt_version"), key.get("gpu_name"))
        if built != (target.tensorrt_version, target.gpu_name):
            raise UsageError(f"engine {self.path} was built with TensorRT {built[0]} for {built[1]}, but this is "
                             f"TensorRT {target.tensorrt_version} on {target.gpu_name}: build it again here")
        if verify:
            size, sha = _sha256_file(self.path)
            if (size, sha) != (record.get("engine_bytes"), record.get("engine_sha256")):
                raise UsageError(f"engine {self.path} is truncated or damaged: delete it and build it again")

    def _checked(self, inputs: dict) -> dict:
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.dtypes or n in self.output_names]
        if missing or extra:
            raise ValueError(f"engine inputs are {', '.join(self.input_names)}; "
                             f"missing: {', '.join(missing) or 'none'}, unexpected: {', '.join(extra) or 'none'}")
        out = {}
        for name in self.input_names:
            t = inputs[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {name} must be a torch tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"input {name} is on {t.device}; the engine runs on {self.device}")
            if t.dtype != self.dtypes[name]:
                raise TypeError(f"input {name} is {t.dtype}, but the engine expects {self.dtypes[name]}")
            out[name] = t.contiguous()
        return out

    def _bind(self, inputs: dict) -> dict:
        """Set input shapes and addresses, allocate outputs at the shapes TensorRT infers."""
        import torch

        ctx = self.context
        for name in self.input_names:
            t = inputs[name]
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name} has shape {tuple(t.shape)}, outside the engine's profile "
                                 f"{self._profile_text(name)}: build an engine for these shapes")
            ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {name} has a data-dependent shape {shape}, "
                                   "which this runner does not handle")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def _profile_text(self, name: str) -> str:
        try:
            mn, _, mx = self.engine.get_tensor_profile_shape(name, 0)
            return f"{tuple(mn)}..{tuple(mx)}"
        except Exception:
            return "(unknown)"

    def _enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")

    def __call__(self, **inputs) -> dict:
        import torch

        tensors = self._checked(inputs)
        with torch.cuda.device(self.device):
            if self.cuda_graph:
                return self._run_graph(tensors)
            outputs = self._bind(tensors)
            # The current torch stream orders the engine after the kernels that made its inputs
            # and before whatever consumes its outputs, with no synchronisation.
            self._enqueue(torch.cuda.current_stream(self.device))
            return outputs

    def _run_graph(self, tensors: dict) -> dict:
        import torch

        shapes = tuple((n, tuple(tensors[n].shape)) for n in self.input_names)
        if self._graph is not None and shapes == self._graph_shapes:
            for name in self.input_names:
                self._static_inputs[name].copy_(tensors[name])
            self._graph.replay()
            return {n: t.clone() for n, t in self._static_outputs.items()}

        # New shapes: the old graph baked in the old shapes and buffers, so it is dropped.
        self._graph = self._graph_shapes = None
        self._static_inputs = {n: t.clone() for n, t in tensors.items()}
        self._static_outputs = self._bind(self._static_inputs)
        # Warm-up outside capture: TensorRT sets up state on the first run after a shape change,
        # which must not land in the graph. This run also gives this call's results.
        self._enqueue(torch.cuda.current_stream(self.device))
        results = {n: t.clone() for n, t in self._static_outputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._enqueue(torch.cuda.current_stream(self.device))
        except RuntimeError as err:  # an enqueue that is not capturable, or the capture's own CUDA error
            log.warning("engine %s cannot be captured in a CUDA graph (%s); running it without one",
                        self.path, str(err).splitlines()[0] if str(err) else type(err).__name__)
            self.cuda_graph = False
            return results
        self._graph, self._graph_shapes = graph, shapes
        return results

    def close(self) -> None:
        """Release the graph, context, engine and runtime, in that order (each needs the next)."""
        self._graph = None
        self._static_inputs, self._static_outputs = {}, {}
        for attr in ("context", "engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)


def engine_record(engine_path: str | Path) -> dict | None:
    """The JSON record written beside an engine by `build_engine`, or None."""
    return _read_record(Path(engine_path))

