"""What is installed here and which parts of the engine can run: the facts behind `doctor`."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as err:  # a broken install raises more than ImportError
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def check_torch() -> list[Check]:
    torch, err = _try_import("torch")
    if torch is None:
        return [Check("torch", False, f"not available ({err})")]
    checks = [Check("torch", True, f"{torch.__version__} (built for CUDA {torch.version.cuda or 'none'})")]
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            names.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
        checks.append(Check("cuda", True, "; ".join(names) + f"; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        checks.append(Check("cuda", False, "not available: no NVIDIA GPU visible to torch; everything runs on the CPU"))
    tv, err = _try_import("torchvision")
    checks.append(Check("torchvision", tv is not None, tv.__version__ if tv else f"not available ({err})"))
    return checks


def _run_probe(device: str, interpret: bool) -> tuple[bool, str]:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "magicseg_engine.kernels.probe", device],
            env=env, capture_output=True, text=True, timeout=300,
        )
    except subprocess.TimeoutExpired:
        return False, "probe kernel timed out"
    if proc.returncode == 0:
        return True, "probe kernel matches its torch reference"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"probe kernel failed: {last}"


def check_triton(cuda: bool) -> list[Check]:
    triton_version = _version("triton")
    if triton_version is None:
        return [Check("triton", False, "not installed (comes with torch's CUDA wheels on Linux)")]
    checks = [Check("triton", True, triton_version)]
    ok, detail = _run_probe("cpu", interpret=True)
    checks.append(Check("triton interpreter", ok, detail + " (TRITON_INTERPRET=1, CPU)"))
    if cuda:
        ok, detail = _run_probe("cuda", interpret=False)
        checks.append(Check("triton compiled", ok, detail + " (GPU)"))
    else:
        checks.append(Check("triton compiled", False, "not available: needs a GPU"))
    return checks


def check_onnx() -> list[Check]:
    checks = []
    onnx_version = _version("onnx")
    checks.append(Check("onnx", onnx_version is not None, onnx_version or "not installed (pip install 'magicseg-engine[onnx]')"))
    ort, err = _try_import("onnxruntime")
    if ort is None:
        checks.append(Check("onnxruntime", False, f"not available ({err or 'not installed'}); pip install 'magicseg-engine[onnx]'"))
    else:
        checks.append(Check("onnxruntime", True, f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}"))
    return checks


def check_tensorrt() -> Check:
    from magicseg_engine.engine.tensorrt import tensorrt_status

    ok, reason = tensorrt_status()
    return Check("tensorrt", ok, reason)


def check_dali() -> Check:
    dali, err = _try_import("nvidia.dali")
    if dali is None:
        return Check("dali", False, "not installed (pip install 'magicseg-engine[dali]'); the torch loader is used instead")
    return Check("dali", True, getattr(dali, "__version__", _version("nvidia-dali-cuda130") or "installed"))


def check_extension() -> Check:
    ext, err = _try_import("magicseg_engine._C")
    if ext is None:
        return Check("_C extension", False, f"not built ({err}); reinstall with pip install -e .")
    info = ext.build_info()
    cuda = "CUDA ops built" if info["cuda"] else "CPU ops only (no CUDA ops compiled)"
    return Check("_C extension", True, f"{cuda}; {info['compiler']}; {info['max_threads']} threads")


def check_clip_vocabulary() -> Check:
    tok, err = _try_import("open_clip.tokenizer")
    if tok is None:
        return Check("clip vocabulary", False, f"open_clip not available ({err})")
    path = tok.default_bpe()
    if not os.path.exists(path):
        return Check("clip vocabulary", False, f"BPE file missing at {path}")
    tokenizer = tok.SimpleTokenizer(path)
    n = int((tokenizer("a photo of a dog")[0] != 0).sum())
    return Check("clip vocabulary", n > 2, f"{os.path.basename(path)} ({len(tokenizer.encoder)} tokens), 'a photo of a dog' -> {n} ids")


def check_optional(dist: str, module: str, purpose: str) -> Check:
    mod, err = _try_import(module)
    if mod is None:
        return Check(dist, False, f"not available ({err or 'not installed'}); needed for {purpose}")
    return Check(dist, True, _version(dist) or getattr(mod, "__version__", "installed"))


def backends(checks: dict[str, Check]) -> Check:
    usable = ["torch"]
    # Inductor compiles C++ for the CPU and Triton for the GPU.
    if checks["torch"].ok and (checks["cuda"].ok or shutil.which("c++") or shutil.which("g++")):
        usable.append("compile")
    if checks["onnxruntime"].ok:
        usable.append("onnxruntime")
    if checks["tensorrt"].ok:
        usable.append("tensorrt")
    return Check("backends", True, ", ".join(usable))


def run_checks() -> list[Check]:
    import magicseg_engine

    checks = [Check("magicseg-engine", True, f"{magicseg_engine.__version__} (Python {sys.version.split()[0]})")]
    checks += check_torch()
    cuda = any(c.name == "cuda" and c.ok for c in checks)
    checks += check_triton(cuda)
    checks += check_onnx()
    checks.append(check_tensorrt())
    checks.append(check_dali())
    checks.append(check_extension())
    checks.append(check_clip_vocabulary())
    checks.append(check_optional("diffusers", "diffusers", "image generation"))
    checks.append(check_optional("segment-anything", "segment_anything", "SAM mask refinement"))
    checks.append(check_optional("webdataset", "webdataset", "reading and writing shards"))
    checks.append(check_optional("ray", "ray.data", "generation across many GPUs (pip install 'magicseg-engine[ray]')"))
    by_name = {c.name: c for c in checks}
    checks.append(backends(by_name))
    return checks


def as_dict(checks: list[Check]) -> dict[str, dict]:
    return {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in checks}
