"""TensorRT engine building, caching and running.

Most of this runs without TensorRT: availability reporting, optimisation profiles, cache keys
and the engine cache. The cache tests replace the TensorRT build step with a stand-in that
returns placeholder bytes, and count how often it is called; they test when a build happens and
what is written, never what TensorRT produces. The real build and run is the last test, which
needs TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import magicseg_engine.engine.tensorrt as trt_mod
from magicseg_engine.engine.build import capture_dims, engine_profile
from magicseg_engine.engine.tensorrt import (
    NO_GPU,
    NOT_INSTALLED,
    BuildTarget,
    EngineKey,
    TensorRTRunner,
    build_engine,
    profile_shapes,
    record_path,
    require_tensorrt,
    tensorrt_status,
)
from magicseg_engine.errors import UsageError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


# --------------------------------------------------------------------------- stand-ins

@dataclass
class Export:
    """The attributes build_engine reads from an ONNX export."""

    component: str
    path: Path
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple]
    precision: str
    opset: int
    sha256: str
    external_data: bool = False


def affine_onnx(path: Path, batch: str | int = "batch", seed: int = 0) -> Export:
    """y = x @ w + b with x [batch, 4]: the smallest model with a dynamic batch and weights."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for every onnxruntime and TensorRT parser we support
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Export("affine", path, ["x"], ["y"], {"x": (batch, 4)}, "fp32", 17,
                  hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def export(tmp_path) -> Export:
    return affine_onnx(tmp_path / "affine.onnx")


class Targets:
    """The TensorRT version and GPU the engine cache believes it runs on; tests change them."""

    def __init__(self):
        self.target = BuildTarget("10.7.0", "NVIDIA H100 80GB HBM3", (9, 0))

    def __call__(self):
        return self.target


class BuildStandIn:
    """Replaces the TensorRT build step: records each call and returns placeholder bytes that
    differ per call, so a test can tell which build wrote the file on disk."""

    def __init__(self):
        self.calls: list[dict] = []
        self.fail = False

    def __call__(self, exported, profile, precision, *, timing_cache_path, workspace_gib):
        self.calls.append({"profile": profile, "precision": precision, "workspace_gib": workspace_gib})
        if self.fail:
            raise RuntimeError("build failed")
        return f"placeholder engine bytes, build {len(self.calls)}".encode() * 50


@pytest.fixture
def targets(monkeypatch) -> Targets:
    t = Targets()
    monkeypatch.setattr(trt_mod, "_current_target", t)
    return t


@pytest.fixture
def builds(monkeypatch) -> BuildStandIn:
    b = BuildStandIn()
    monkeypatch.setattr(trt_mod, "_build_serialized", b)
    return b


def _no_tensorrt():
    raise ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")


def _module(version: str):
    return types.SimpleNamespace(__version__=version)


# --------------------------------------------------------------------------- availability

def test_module_imports_and_reports_without_tensorrt():
    # A fresh interpreter where `import tensorrt` must fail, on any machine.
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import magicseg_engine.engine.tensorrt as m\n"
            "print(m.tensorrt_status())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr((False, NOT_INSTALLED))


def test_importing_the_module_does_not_import_tensorrt():
    code = "import sys, magicseg_engine.engine.tensorrt; print('tensorrt' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_status_on_this_machine_without_tensorrt():
    ok, reason = tensorrt_status()
    assert ok is False
    assert reason == NOT_INSTALLED
    with pytest.raises(UsageError) as err:
        require_tensorrt()
    assert str(err.value) == NOT_INSTALLED and err.value.exit_code == 2


@pytest.mark.parametrize("situation, device, ok, expect", [
    ("missing", None, False, NOT_INSTALLED),
    ("broken", None, False, "cannot be imported (OSError: libnvinfer.so.10: cannot open shared object file)"),
    ("8.6.1", ("NVIDIA A100-SXM4-80GB", (8, 0)), False, "TensorRT 8.6.1 is installed, but engines need TensorRT 10"),
    ("10.7.0", None, False, NO_GPU),
    ("10.7.0", ("NVIDIA A100-SXM4-80GB", (8, 0)), True, "TensorRT 10.7.0 on NVIDIA A100-SXM4-80GB (sm_80)"),
])
def test_status_and_require(monkeypatch, situation, device, ok, expect):
    if situation == "missing":
        monkeypatch.setattr(trt_mod, "_import_tensorrt", _no_tensorrt)
    elif situation == "broken":
        def broken():
            raise OSError("libnvinfer.so.10: cannot open shared object file\nsecond line")
        monkeypatch.setattr(trt_mod, "_import_tensorrt", broken)
    else:
        monkeypatch.setattr(trt_mod, "_import_tensorrt", lambda: _module(situation))
    monkeypatch.setattr(trt_mod, "_cuda_device", lambda: device)

    got_ok, reason = tensorrt_status()
    assert got_ok is ok
    assert expect in reason and "\n" not in reason
    if ok:
        assert require_tensorrt().__version__ == situation
    else:
        with pytest.raises(UsageError) as err:
            require_tensorrt()
        assert str(err.value) == reason


# --------------------------------------------------------------------------- profiles

def test_profile_dynamic_batch_with_fixed_dims():
    shapes = {"latents": ("batch", 4, "h", "w"), "timestep": ("batch",), "context": ("batch", "seq", 768)}
    got = profile_shapes(shapes, [2, 8, 4], {"h": 64, "w": 96, "seq": 77, "unused": 5})
    assert got == {
        "latents": ((2, 4, 64, 96), (8, 4, 64, 96), (8, 4, 64, 96)),
        "timestep": ((2,), (8,), (8,)),
        "context": ((2, 77, 768), (8, 77, 768), (8, 77, 768)),
    }
    assert list(got) == list(shapes)


def test_profile_ranges_for_other_dynamic_dims():
    # unet-capture: map rows follow the batch, classes and tokens vary per batch of prompts.
    shapes = {"sample": ("batch", 4, 8, 8), "query_rows": ("rows",), "token_index": ("rows", "classes", "tokens")}
    got = profile_shapes(shapes, [1, 16], capture_dims([1, 16]))
    assert got["query_rows"] == ((1,), (8,), (16,))
    assert got["token_index"] == ((1, 1, 1), (8, 2, 4), (16, 4, 16))
    assert got["sample"] == ((1, 4, 8, 8), (16, 4, 8, 8), (16, 4, 8, 8))
    for bad in ((4, 2, 8), (1, 2), (0, 1, 2), (1.0, 2, 3)):
        with pytest.raises(ValueError, match="'rows' must be a positive integer or a"):
            profile_shapes(shapes, [1], {"rows": bad, "classes": 1, "tokens": 1})


def test_profile_single_batch_size_and_static_model():
    assert profile_shapes({"x": ("batch", 3)}, [4]) == {"x": ((4, 3), (4, 3), (4, 3))}
    # Without a dynamic batch only one batch size can be served.
    assert profile_shapes({"x": (2, 3)}, [1]) == {"x": ((2, 3),) * 3}
    with pytest.raises(ValueError, match="no input has a dynamic 'batch'"):
        profile_shapes({"x": (2, 3)}, [1, 4])


def test_profile_names_every_missing_dim():
    with pytest.raises(ValueError) as err:
        profile_shapes({"a": ("batch", "h", "w"), "b": ("batch", "seq")}, [1], {"w": 8})
    msg = str(err.value)
    assert "'h' (in a)" in msg and "'seq' (in b)" in msg and "'w'" not in msg


@pytest.mark.parametrize("batch_sizes, fixed, match", [
    ([], None, "empty"),
    ([0, 2], None, "positive"),
    ([1.5], None, "positive"),
    ([1], {"h": 0}, "'h' must be a positive"),
    ([1], {"batch": 4}, "set by batch_sizes"),
])
def test_profile_rejects_bad_arguments(batch_sizes, fixed, match):
    with pytest.raises(ValueError, match=match):
        profile_shapes({"x": ("batch", "h")}, batch_sizes, {"h": 3} if fixed is None else fixed)


def test_profile_rejects_unnamed_symbolic_dim():
    with pytest.raises(ValueError, match="no name"):
        profile_shapes({"x": ("batch", None)}, [1])


def test_profile_without_batch_sizes_takes_every_dim_from_fixed():
    # SAM's mask decoder: sized by one image's prompts, whatever the generation batch.
    shapes = {"emb": ("images", 64, 16, 16), "sparse": ("prompts", "tokens", 64)}
    fixed = {"images": 1, "prompts": (1, 2, 8), "tokens": (2, 4, 18)}
    assert profile_shapes(shapes, None, fixed) == {
        "emb": ((1, 64, 16, 16),) * 3,
        "sparse": ((1, 2, 64), (2, 4, 64), (8, 18, 64)),
    }
    with pytest.raises(ValueError, match="'batch' \\(in x\\); this profile was given no batch sizes"):
        profile_shapes({"x": ("batch", 3)}, None)
    with pytest.raises(ValueError, match="'tokens' \\(in sparse\\)"):
        profile_shapes(shapes, None, {"images": 1, "prompts": 8})


# --------------------------------------------------------------------------- SAM mask decoder

@pytest.fixture(scope="module")
def sam_decoder(tmp_path_factory):
    """The tiny SAM and its exported mask decoder."""
    from magicseg_engine.engine.export import export_component
    from magicseg_engine.masks.sam import build_sam

    sam = build_sam("tiny")
    return sam, export_component("sam-mask-decoder", sam, tmp_path_factory.mktemp("sam-onnx"))


class RecordingSamRunners:
    """SamRefiner's torch runners, recording the shapes of every mask-decoder call."""

    def __init__(self, sam):
        from magicseg_engine.engine.backends import sam_torch_runners

        self.inner = sam_torch_runners(sam)
        self.encode_images = self.inner.encode_images
        self.calls: list[dict[str, tuple]] = []

    def decode_masks(self, embedding, sparse, dense):
        self.calls.append({"image_embeddings": tuple(embedding.shape),
                           "sparse_prompt_embeddings": tuple(sparse.shape),
                           "dense_prompt_embeddings": tuple(dense.shape)})
        return self.inner.decode_masks(embedding, sparse, dense)


def _refiner_prompts(classes: int, positive: int, negative: int, box: bool, seed: int = 0):
    """Prompts for 2 images of 64x64 pixels, `classes` classes each, laid out as extract_masks lays
    them out: `positive` points labelled 1, then `negative` labelled 0, and a box or none."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = positive + negative
    points = torch.rand((2, classes, max(n, 1), 2), generator=gen) * 63
    labels = torch.tensor([1] * positive + [0] * negative if n else [-1]).expand(2, classes, -1).clone()
    corner = torch.rand((2, classes, 2), generator=gen) * 32
    boxes = torch.cat([corner, corner + 24], dim=-1) if box else torch.full((2, classes, 4), -1.0)
    images = (torch.rand((2, 64, 64, 3), generator=gen) * 255).to(torch.uint8).numpy()
    return images, boxes, points, labels


def test_sam_decoder_profile_covers_every_call_the_refiner_makes(sam_decoder):
    """With --batch-sizes 1,8,16 (the default) the decoder gets ranges, not an error: images 1,
    prompts up to the classes a pair may have, tokens from a box alone up to every point a run
    may ask for and a box; and every call SamRefiner makes at those extremes lies inside them."""
    from magicseg_engine.config import MaskConfig, PromptsConfig
    from magicseg_engine.masks.sam import SamRefiner

    sam, exported = sam_decoder
    profile = engine_profile("sam-mask-decoder", exported.input_shapes, (1, 8, 16))
    assert set(profile) == set(exported.input_names)
    for name, (mn, opt, mx) in profile.items():
        assert len(mn) == len(opt) == len(mx) == len(exported.input_shapes[name])
        assert all(1 <= a <= b <= c for a, b, c in zip(mn, opt, mx)), (name, mn, opt, mx)
    assert profile["image_embeddings"] == ((1, 64, 16, 16),) * 3
    assert profile["sparse_prompt_embeddings"] == ((1, 2, 64), (2, 4, 64), (8, 18, 64))
    assert profile["dense_prompt_embeddings"] == ((1, 64, 16, 16), (2, 64, 16, 16), (8, 64, 16, 16))
    # The same profile whatever the batch sizes: the decoder's calls do not follow the batch.
    assert engine_profile("sam-mask-decoder", exported.input_shapes, (4,)) == profile

    most_classes = PromptsConfig.model_fields["max_classes_per_sample"].metadata
    most_points = [MaskConfig.model_fields[f].metadata for f in ("positive_points", "negative_points")]
    classes = next(m.le for m in most_classes if hasattr(m, "le"))
    positive, negative = (next(m.le for m in meta if hasattr(m, "le")) for meta in most_points)
    runners = RecordingSamRunners(sam)
    refiner = SamRefiner(sam, runners=runners)
    layouts = [
        (classes, positive, negative, True),   # every class, every point and a box: the largest call
        (1, 0, 0, True),                       # a box alone: 2 tokens
        (1, 1, 0, False),                      # one point and SAM's padding point: 2 tokens
        (2, 1, 1, True),                       # the default settings
        (3, positive, negative, False),        # every point, no box
    ]
    for seed, layout in enumerate(layouts):
        refiner(*_refiner_prompts(*layout, seed=seed))
    assert len(runners.calls) == 2 * len(layouts)  # one call per image: each image's prompts share a layout
    for call in runners.calls:
        for name, shape in call.items():
            mn, _, mx = profile[name]
            assert all(a <= d <= b for a, d, b in zip(mn, shape, mx)), (name, shape, profile[name])
    sparse = [c["sparse_prompt_embeddings"] for c in runners.calls]
    # The extremes are reached, so the ranges are the calls' own, not guesses.
    assert max(s[0] for s in sparse) == profile["sparse_prompt_embeddings"][2][0] == classes
    assert max(s[1] for s in sparse) == profile["sparse_prompt_embeddings"][2][1] == positive + negative + 2
    assert min(s[1] for s in sparse) == profile["sparse_prompt_embeddings"][0][1] == 2
    assert (2, 4, 64) in sparse  # the default settings' call is the one TensorRT tunes for


def test_sam_decoder_export_matches_torch_at_both_ends_of_its_profile(sam_decoder):
    """The exported graph keeps prompts and tokens dynamic: onnxruntime equals torch at the
    profile's smallest call (1 prompt of 2 tokens) and its largest (8 prompts of 18 tokens)."""
    import torch

    from magicseg_engine.engine.export import onnxruntime_session, parity

    sam, exported = sam_decoder
    profile = engine_profile("sam-mask-decoder", exported.input_shapes, (1, 8, 16))
    session = onnxruntime_session(exported)
    gen = torch.Generator().manual_seed(0)
    for end in (0, 2):
        prompts, tokens, _ = profile["sparse_prompt_embeddings"][end]
        inputs = {
            "image_embeddings": torch.randn(profile["image_embeddings"][end], generator=gen),
            "sparse_prompt_embeddings": torch.randn((prompts, tokens, 64), generator=gen),
            "dense_prompt_embeddings": torch.randn(profile["dense_prompt_embeddings"][end], generator=gen),
        }
        result = parity("sam-mask-decoder", sam, exported, inputs, session=session)
        assert result["max_abs"] < 1e-4 and result["max_rel"] < 1e-5, (end, result)
        masks, iou = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert masks.shape == (prompts, 3, 64, 64) and iou.shape == (prompts, 3)


def test_engine_profile_failure_is_one_usage_line():
    with pytest.raises(UsageError) as err:
        engine_profile("unet", {"sample": (2, 4, 8, 8)}, (1, 8, 16))
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert message.startswith("no TensorRT optimisation profile for unet with --batch-sizes 1,8,16: ")


# --------------------------------------------------------------------------- keys

PROFILE = {"x": ((1, 4), (8, 4), (8, 4)), "t": ((1,), (8,), (8,))}


def make_key(**changes) -> EngineKey:
    fields = dict(onnx_sha256="ab" * 32, profile=PROFILE, precision="fp16", tensorrt_version="10.7.0",
                  gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    fields.update(changes)
    return EngineKey(**fields)


def test_key_ignores_ordering_and_spelling():
    a = make_key()
    b = make_key(profile=dict(reversed(list(PROFILE.items()))), precision="float16",
                 onnx_sha256="AB" * 32, compute_capability=[9, 0])
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert a.profile_dict() == PROFILE
    # Pinned: a change to the canonical form would silently invalidate every cached engine.
    canonical = ('{"compute_capability":[9,0],"format":1,"gpu_name":"NVIDIA H100 80GB HBM3",'
                 f'"onnx_sha256":"{"ab" * 32}","precision":"fp16",'
                 '"profile":[["t",[1],[8],[8]],["x",[1,4],[8,4],[8,4]]],"tensorrt_version":"10.7.0"}')
    assert a.digest() == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32),
    ("profile", {**PROFILE, "x": ((1, 4), (4, 4), (8, 4))}),
    ("profile", {**PROFILE, "x": ((2, 4), (8, 4), (8, 4))}),
    ("profile", {"x": PROFILE["x"]}),
    ("precision", "bf16"),
    ("tensorrt_version", "10.8.0"),
    ("gpu_name", "NVIDIA H100 PCIe"),
    ("compute_capability", (8, 9)),
])
def test_key_changes_with_each_field(field, value, tmp_path):
    base = make_key()
    other = dataclasses.replace(base, **{field: value})
    assert other != base and other.digest() != base.digest()
    assert other.engine_path(tmp_path) != base.engine_path(tmp_path)


def test_engine_path_is_named_by_digest(tmp_path):
    key = make_key()
    assert key.engine_path(tmp_path) == tmp_path / f"{key.digest()}.engine"
    assert len(key.digest()) == 64 and int(key.digest(), 16) >= 0


def test_key_rejects_unknown_precision():
    with pytest.raises(UsageError, match="fp32, fp16, bf16"):
        make_key(precision="int3")


# --------------------------------------------------------------------------- build and cache

def test_build_without_tensorrt_fails_before_touching_cache(monkeypatch, export, tmp_path):
    monkeypatch.setattr(trt_mod, "_import_tensorrt", _no_tensorrt)
    cache = tmp_path / "engines"
    with pytest.raises(UsageError) as err:
        build_engine(export, cache, [1, 8], "fp16")
    assert str(err.value) == NOT_INSTALLED
    assert not cache.exists()


def test_build_writes_engine_and_record_then_reuses(targets, builds, export, tmp_path):
    cache = tmp_path / "engines"
    path = build_engine(export, cache, [1, 8], "fp16", workspace_gib=2)
    assert len(builds.calls) == 1
    assert builds.calls[0] == {"profile": {"x": ((1, 4), (8, 4), (8, 4))}, "precision": "fp16", "workspace_gib": 2}
    data = path.read_bytes()
    assert data.startswith(b"placeholder engine bytes, build 1")
    key = EngineKey(export.sha256, {"x": ((1, 4), (8, 4), (8, 4))}, "fp16", "10.7.0", "NVIDIA H100 80GB HBM3", (9, 0))
    assert path == key.engine_path(cache)
    record = json.loads(record_path(path).read_text())
    assert record["key"] == key.as_json() and record["key_digest"] == key.digest()
    assert record["engine_sha256"] == hashlib.sha256(data).hexdigest() and record["engine_bytes"] == len(data)
    assert record["build_seconds"] >= 0 and record["component"] == "affine"
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, record_path(path).name])

    # Same key, intact file: reused; a different order of the same batch sizes is the same key.
    assert build_engine(export, cache, [8, 4, 1], "float16", workspace_gib=4) == path
    assert len(builds.calls) == 1 and path.read_bytes() == data


@pytest.mark.parametrize("damage, warning", [
    ("truncate", "truncated"),
    ("flip", "sha256 differs"),
    ("drop_record", "no readable record"),
    ("garble_record", "no readable record"),
    ("other_key_record", "no readable record"),
])
def test_damaged_engine_is_rebuilt_with_warning(targets, builds, export, tmp_path, caplog, damage, warning):
    path = build_engine(export, tmp_path, [1, 4], "fp32")
    data = path.read_bytes()
    rec = record_path(path)
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    elif damage == "drop_record":
        rec.unlink()
    elif damage == "garble_record":
        rec.write_text(rec.read_text()[:20])
    else:
        record = json.loads(rec.read_text())
        record["key"]["precision"] = "fp16"
        rec.write_text(json.dumps(record))

    with caplog.at_level(logging.WARNING, logger=trt_mod.__name__):
        assert build_engine(export, tmp_path, [1, 4], "fp32") == path
    assert len(builds.calls) == 2
    assert warning in caplog.text
    rebuilt = path.read_bytes()
    assert rebuilt.startswith(b"placeholder engine bytes, build 2")
    assert json.loads(rec.read_text())["engine_sha256"] == hashlib.sha256(rebuilt).hexdigest()

    caplog.clear()  # and the rebuilt one is trusted again
    build_engine(export, tmp_path, [1, 4], "fp32")
    assert len(builds.calls) == 2 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_other_gpu_version_precision_or_shapes_get_their_own_engine(targets, builds, export, tmp_path):
    first = build_engine(export, tmp_path, [1, 4], "fp16")
    first_bytes = first.read_bytes()
    paths = {first}

    targets.target = dataclasses.replace(targets.target, gpu_name="NVIDIA L40S", compute_capability=(8, 9))
    paths.add(build_engine(export, tmp_path, [1, 4], "fp16"))
    targets.target = dataclasses.replace(targets.target, tensorrt_version="10.8.0")
    paths.add(build_engine(export, tmp_path, [1, 4], "fp16"))
    paths.add(build_engine(export, tmp_path, [1, 4], "bf16"))
    paths.add(build_engine(export, tmp_path, [1, 8], "bf16"))
    paths.add(build_engine(dataclasses.replace(export, sha256="0" * 64), tmp_path, [1, 8], "bf16"))
    assert len(paths) == 6 and len(builds.calls) == 6
    # The engine for the first GPU is neither loaded for the others nor overwritten by them.
    assert first.read_bytes() == first_bytes

    # Back on the first GPU and version, its engine is found again.
    targets.target = Targets().target
    assert build_engine(export, tmp_path, [4, 1], "fp16") == first
    assert len(builds.calls) == 6


@pytest.mark.parametrize("precision, cc, match", [
    ("bf16", (7, 5), "compute capability 8.0"),
    ("fp16", (6, 1), "no fast fp16"),
])
def test_precision_the_gpu_lacks_is_refused(targets, builds, export, tmp_path, precision, cc, match):
    targets.target = BuildTarget("10.7.0", "Old GPU", cc)
    cache = tmp_path / "engines"
    with pytest.raises(UsageError, match=match):
        build_engine(export, cache, [1], precision)
    assert builds.calls == [] and not cache.exists()


def test_bf16_on_ampere_and_fp16_on_turing_are_built(targets, builds, export, tmp_path):
    targets.target = BuildTarget("10.7.0", "NVIDIA A100", (8, 0))
    build_engine(export, tmp_path, [1], "bf16")
    targets.target = BuildTarget("10.7.0", "Tesla T4", (7, 5))
    build_engine(export, tmp_path, [1], "fp16")
    assert [c["precision"] for c in builds.calls] == ["bf16", "fp16"]


def test_failed_build_leaves_no_files(targets, builds, export, tmp_path):
    builds.fail = True
    cache = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="build failed"):
        build_engine(export, cache, [1, 2], "fp32")
    assert list(cache.iterdir()) == []


def test_missing_onnx_or_dim_is_reported_before_building(targets, builds, export, tmp_path):
    with pytest.raises(ValueError, match="'h'"):
        build_engine(dataclasses.replace(export, input_shapes={"x": ("batch", "h")}), tmp_path, [1], "fp32")
    export.path.unlink()
    with pytest.raises(UsageError, match="affine.onnx is missing"):
        build_engine(export, tmp_path / "engines", [1], "fp32")
    assert builds.calls == []


# --------------------------------------------------------------------------- build step calls

class RecordingTensorRT:
    """Stands in for the `tensorrt` module to check the calls the build step makes and the
    order of its checks. It builds nothing: its serialised 'engine' is a fixed placeholder.
    The network's inputs are read from the ONNX file, as TensorRT's parser would see them."""

    __version__ = "10.7.0"

    def __init__(self, parse_ok=True, build_ok=True, accept_cache=True):
        self.log: list[tuple] = []
        rec = self

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            def __init__(self):
                pass

        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            cache = None

            def set_memory_pool_limit(self, pool, size):
                rec.log.append(("pool", pool, size))

            def set_flag(self, flag):
                rec.log.append(("flag", flag))

            def add_optimization_profile(self, profile):
                rec.log.append(("profile", dict(profile.shapes)))
                return 0

            def create_timing_cache(self, data):
                rec.log.append(("create_timing_cache", bytes(data)))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.log.append(("set_timing_cache", cache.data, ignore_mismatch))
                ok = accept_cache or not cache.data
                if ok:
                    self.cache = cache
                return ok

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Input:
            def __init__(self, value_info):
                self.name = value_info.name
                dims = value_info.type.tensor_type.shape.dim
                self.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                self.is_shape_tensor = False

        class Network:
            inputs: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)

            def create_network(self, flags):
                rec.log.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.log.append(("build",))
                return b"placeholder, not an engine" if build_ok else None

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0 if parse_ok else 2

            def parse_from_file(self, path):
                rec.log.append(("parse_from_file", path))
                if parse_ok:
                    self.network.inputs = [Input(v) for v in onnx.load(path).graph.input]
                return parse_ok

            def get_error(self, i):
                return ["In node 0 (MatMul): unsupported", "second"][i]

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def calls(self, name):
        return [entry for entry in self.log if entry[0] == name]


@pytest.fixture
def recording(monkeypatch):
    def install(**kw):
        fake = RecordingTensorRT(**kw)
        monkeypatch.setattr(trt_mod, "_import_tensorrt", lambda: fake)
        monkeypatch.setattr(trt_mod, "_LOGGER", None)  # the process-wide logger belongs to the fake
        return fake

    return install


def test_build_step_calls(recording, export, tmp_path, caplog):
    fake = recording()
    timing = tmp_path / "timing.cache"
    profile = {"x": ((1, 4), (8, 4), (8, 4))}
    out = trt_mod._build_serialized(export, profile, "bf16", timing_cache_path=timing, workspace_gib=1.5)
    assert out == b"placeholder, not an engine"
    assert fake.calls("create_network") == [("create_network", 0)]
    assert fake.calls("parse_from_file") == [("parse_from_file", str(export.path))]
    assert fake.calls("flag") == [("flag", "BF16")]
    assert fake.calls("pool") == [("pool", "WORKSPACE", int(1.5 * 2**30))]
    assert fake.calls("profile") == [("profile", profile)]
    assert fake.calls("set_timing_cache") == [("set_timing_cache", b"", False)]
    assert timing.read_bytes() == b"+timings"

    # The next build starts from the saved timings.
    fake = recording()
    trt_mod._build_serialized(export, profile, "fp16", timing_cache_path=timing, workspace_gib=None)
    assert fake.calls("create_timing_cache") == [("create_timing_cache", b"+timings")]
    assert fake.calls("flag") == [("flag", "FP16")] and fake.calls("pool") == []
    assert timing.read_bytes() == b"+timings+timings"

    # Timings from another GPU are refused and replaced by an empty cache, with a warning.
    fake = recording(accept_cache=False)
    with caplog.at_level(logging.WARNING, logger=trt_mod.__name__):
        trt_mod._build_serialized(export, profile, "fp32", timing_cache_path=timing, workspace_gib=None)
    assert "another GPU" in caplog.text and fake.calls("flag") == []
    assert [c[1] for c in fake.calls("set_timing_cache")] == [b"+timings+timings", b""]


def test_build_step_reports_parse_and_build_failures(recording, export, tmp_path):
    profile = {"x": ((1, 4), (8, 4), (8, 4))}
    recording(parse_ok=False)
    parse_error = r"cannot parse .*affine.onnx: In node 0 \(MatMul\): unsupported \(and 1 more\)"
    with pytest.raises(UsageError, match=parse_error):
        trt_mod._build_serialized(export, profile, "fp32", timing_cache_path=None, workspace_gib=None)

    fake = recording(build_ok=False)
    with pytest.raises(RuntimeError, match="failed to build"):
        trt_mod._build_serialized(export, profile, "fp32", timing_cache_path=tmp_path / "t.cache", workspace_gib=None)
    assert fake.calls("build") and not (tmp_path / "t.cache").exists()


def test_build_step_checks_onnx_against_export_record(recording, tmp_path):
    static = affine_onnx(tmp_path / "static.onnx", batch=2)
    fake = recording()
    with pytest.raises(UsageError, match="fixed size 2 on axis 0, but the engine would need 1..8"):
        trt_mod._build_serialized(static, {"x": ((1, 4), (8, 4), (8, 4))}, "fp32",
                                  timing_cache_path=None, workspace_gib=None)
    with pytest.raises(UsageError, match=r"inputs of .* \(x\) differ from the export's record \(ids\)"):
        trt_mod._build_serialized(static, {"ids": ((2, 4),) * 3}, "fp32", timing_cache_path=None, workspace_gib=None)
    # A network without dynamic inputs needs no optimisation profile.
    trt_mod._build_serialized(static, {"x": ((2, 4),) * 3}, "fp32", timing_cache_path=None, workspace_gib=None)
    assert fake.calls("profile") == [] and fake.calls("build")


@pytest.mark.slow
def test_sdxl_exports_get_profiles_for_every_input(recording, tmp_path):
    """SDXL's text encoder ([batch, 2, L] ids), UNet (text_embeds, time_ids) and unet-capture:
    the profiles build_engine derives cover every input of the real ONNX files, batch ranged."""
    from families import TEXT_1, TEXT_2, write_family

    from magicseg_engine.config import DiffusionConfig
    from magicseg_engine.engine.export import export_component
    from magicseg_engine.generate.attention import AttentionCapture
    from magicseg_engine.generate.models import load_diffusion

    folder = write_family(tmp_path / "sdxl", "sdxl")
    models = load_diffusion(DiffusionConfig(architecture="sd15", weights="pretrained", model=str(folder),
                                            dtype="float32"))
    layers = AttentionCapture(models.unet, models.tokenizer).layers
    files = {c: export_component(c, models, tmp_path / "onnx") for c in ("text-encoder", "unet")}
    files["unet-capture"] = export_component("unet", models, tmp_path / "onnx", capture_layers=layers)
    sizes = [1, 4, 8]
    fixed = {"unet-capture": capture_dims(sizes)}
    for component, exported in files.items():
        fake = recording()
        profile = profile_shapes(exported.input_shapes, sizes, fixed.get(component))
        trt_mod._build_serialized(exported, profile, "fp16", timing_cache_path=None, workspace_gib=None)
        assert fake.calls("profile") == [("profile", profile)]
        assert set(profile) == set(exported.input_names)
    unet = trt_mod.profile_shapes(files["unet"].input_shapes, sizes)
    pooled, width = TEXT_2["projection_dim"], TEXT_1["hidden_size"] + TEXT_2["hidden_size"]
    assert unet["text_embeds"] == ((1, pooled), (8, pooled), (8, pooled))
    assert unet["time_ids"] == ((1, 6), (8, 6), (8, 6))
    assert unet["encoder_hidden_states"][2] == (8, 77, width)
    assert trt_mod.profile_shapes(files["text-encoder"].input_shapes, sizes)["input_ids"] == \
        ((1, 2, 77), (8, 2, 77), (8, 2, 77))


# --------------------------------------------------------------------------- build-engines

@pytest.fixture
def fake_gpu(recording, monkeypatch):
    """build-engines --format tensorrt on this machine: the recording TensorRT and a GPU torch never sees."""
    monkeypatch.setattr(trt_mod, "_cuda_device", lambda: ("NVIDIA H100 80GB HBM3", (9, 0)))
    return recording()


def build_engines_cli(out, *args):
    from typer.testing import CliRunner

    from magicseg_engine.cli import app

    return CliRunner().invoke(app, ["build-engines", "--preset", "tiny", "--device", "cpu", "--format", "tensorrt",
                                    "--out", str(out), *map(str, args)])


@pytest.mark.slow
def test_build_engines_builds_every_engine_for_several_batch_sizes(fake_gpu, tmp_path):
    """The default --batch-sizes 1,8,16: one engine per component, SAM's mask decoder included,
    each from the profile its calls need."""
    out = tmp_path / "engines"
    result = build_engines_cli(out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch_sizes"] == [1, 8, 16]
    components = [e["component"] for e in manifest["components"]]
    assert len(components) == 6 and len(fake_gpu.calls("build")) == 6
    profiles = {}
    for e in manifest["components"]:
        record = json.loads(record_path(out / e["engine"]).read_text())
        assert record["component"] == e["component"]
        profiles[e["component"]] = EngineKey(**{k: v for k, v in record["key"].items() if k != "format"}).profile_dict()
    assert profiles["unet"]["sample"] == ((1, 4, 8, 8), (16, 4, 8, 8), (16, 4, 8, 8))
    decoder = profiles["sam-mask-decoder"]
    assert decoder["sparse_prompt_embeddings"] == ((1, 2, 64), (2, 4, 64), (8, 18, 64))
    assert decoder["image_embeddings"] == ((1, 64, 16, 16),) * 3
    # TensorRT was given, for each engine in turn, the ranges its cache key records.
    given = [entry[1] for entry in fake_gpu.calls("profile")]
    assert len(given) == 6
    for component, ranges in zip(components, given):
        assert ranges == {k: profiles[component][k] for k in ranges} and ranges


def test_engines_are_checked_against_the_manifest_before_tensorrt_reads_them(fake_gpu, tmp_path):
    """The manifest records each engine's bytes and sha256; loading refuses an engine that differs,
    and one with no recorded digest at all (record deleted, older manifest), in one line."""
    from magicseg_engine.engine.build import MANIFEST, load_engines

    out = tmp_path / "engines"
    result = build_engines_cli(out, "--components", "text-encoder", "--batch-sizes", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["components"][0]
    engine = out / entry["engine"]
    data = engine.read_bytes()
    assert entry["engine_sha256"] == hashlib.sha256(data).hexdigest() and entry["engine_bytes"] == len(data)
    model_id = manifest["model_id"]
    assert load_engines(out, model_id, ["text-encoder"])[1] == {"text-encoder": engine}

    engine.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size: only the digest tells
    with pytest.raises(UsageError, match="changed since build-engines wrote it") as err:
        load_engines(out, model_id, ["text-encoder"])
    assert str(engine) in str(err.value) and "build-engines --format tensorrt" in str(err.value)
    engine.write_bytes(data[:-1])
    with pytest.raises(UsageError, match="changed since build-engines wrote it"):
        load_engines(out, model_id, ["text-encoder"])

    # A manifest without the digests: the record beside the engine is the reference...
    engine.write_bytes(data)
    for key in ("engine_sha256", "engine_bytes"):
        del entry[key]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert load_engines(out, model_id, ["text-encoder"])[1] == {"text-encoder": engine}
    engine.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    with pytest.raises(UsageError, match="changed since build-engines wrote it"):
        load_engines(out, model_id, ["text-encoder"])
    # ... and an engine with neither is not run unchecked.
    record_path(engine).unlink()
    with pytest.raises(UsageError, match="no recorded sha256"):
        load_engines(out, model_id, ["text-encoder"])


def test_build_engines_with_a_bad_profile_stops_before_anything_is_written(fake_gpu, monkeypatch, tmp_path):
    import magicseg_engine.engine.build as build

    monkeypatch.setattr(build, "SAM_DECODER_DIMS", {"images": 1, "prompts": (1, 2, 8)})  # no tokens
    out = tmp_path / "engines"
    result = build_engines_cli(out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no TensorRT optimisation profile for sam-mask-decoder with --batch-sizes 1,8,16" \
        in lines[0] and "'tokens'" in lines[0]
    # Refused before a model loaded: no export, no engine, not even the folder's files.
    assert fake_gpu.log == [] and not (out.exists() and list(out.rglob("*.*")))


@pytest.mark.slow
def test_build_engines_checks_every_exported_profile_before_the_first_engine(fake_gpu, monkeypatch, tmp_path):
    """An export whose shapes disagree with what build-engines expected (here: the decoder's
    tokens axis left unsized) is refused after exporting and before any engine, the unet's
    included, is built."""
    import magicseg_engine.engine.build as build

    monkeypatch.setitem(build.EXPORT_DIMS, "sam-mask-decoder", ("images", "prompts"))
    monkeypatch.setattr(build, "SAM_DECODER_DIMS", {"images": 1, "prompts": (1, 2, 8)})
    out = tmp_path / "engines"
    result = build_engines_cli(out, "--components", "unet,sam-mask-decoder")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no TensorRT optimisation profile for sam-mask-decoder" in lines[0]
    assert "'tokens' (in sparse_prompt_embeddings)" in lines[0]
    assert fake_gpu.calls("parse_from_file") == [] and fake_gpu.calls("build") == []
    assert not (out / "tensorrt").exists() and not (out / "manifest.json").exists()


# --------------------------------------------------------------------------- on a GPU

def test_runner_without_tensorrt_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_mod, "_import_tensorrt", _no_tensorrt)
    with pytest.raises(UsageError, match="TensorRT is not installed"):
        TensorRTRunner(tmp_path / "missing.engine")


HAS_TENSORRT = tensorrt_status()[0]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU")
def test_engine_matches_onnxruntime(export, tmp_path):
    import onnxruntime as ort
    import torch

    cache, timing = tmp_path / "engines", tmp_path / "timing.cache"
    path = build_engine(export, cache, [1, 8], "fp32", timing_cache_path=timing)
    assert record_path(path).exists() and timing.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert build_engine(export, cache, [1, 8], "fp32", timing_cache_path=timing) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    runner = TensorRTRunner(path)
    graphed = TensorRTRunner(path, cuda_graph=True)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    gen = torch.Generator().manual_seed(0)
    # TensorRT may use TF32 for fp32 matmuls on Ampere and newer, hence the tolerance.
    for batch in (1, 5, 5, 8, 1):
        x = torch.randn(batch, 4, generator=gen)
        want = torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])
        for r in (runner, graphed):
            got = r(x=x.cuda())["y"]
            assert got.shape == (batch, 3) and got.dtype == torch.float32
            torch.testing.assert_close(got.cpu(), want, atol=1e-2, rtol=1e-2)
    assert graphed.cuda_graph, "the engine could not be captured in a CUDA graph"

    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(x=torch.zeros(9, 4, device="cuda"))
    with pytest.raises(TypeError, match="expects torch.float32"):
        runner(x=torch.zeros(2, 4, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="is on cpu"):
        runner(x=torch.zeros(2, 4))

    if torch.cuda.get_device_capability() >= (7, 0):
        half = build_engine(export, cache, [1, 8], "fp16")
        assert half != path
        x = torch.randn(3, 4, generator=gen)
        want = torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])
        torch.testing.assert_close(TensorRTRunner(half)(x=x.cuda())["y"].cpu(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU")
def test_sam_decoder_engine_serves_its_whole_profile(sam_decoder, tmp_path):
    """The decoder engine build-engines makes runs SamRefiner's smallest, default and largest
    calls as onnxruntime does, and refuses one beyond the profile."""
    import torch

    from magicseg_engine.engine.build import profile_sizing
    from magicseg_engine.engine.export import onnxruntime_session

    sam, exported = sam_decoder
    sizes, fixed = profile_sizing("sam-mask-decoder", (1, 8, 16))
    path = build_engine(exported, tmp_path, sizes, "fp32", fixed_dims=fixed)
    profile = engine_profile("sam-mask-decoder", exported.input_shapes, (1, 8, 16))
    runner, session = TensorRTRunner(path), onnxruntime_session(exported)
    gen = torch.Generator().manual_seed(0)
    for end in range(3):
        inputs = {name: torch.randn(shapes[end], generator=gen) for name, shapes in profile.items()}
        want = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        got = runner(**{k: v.cuda() for k, v in inputs.items()})
        for name, expected in zip(("masks", "iou_predictions"), want):
            # TensorRT may use TF32 for fp32 matmuls on Ampere and newer, hence the tolerance.
            torch.testing.assert_close(got[name].cpu(), torch.from_numpy(expected), atol=2e-2, rtol=2e-2)
    too_many = {name: torch.zeros(shapes[2], device="cuda") for name, shapes in profile.items()}
    too_many["sparse_prompt_embeddings"] = torch.zeros((9, 4, 64), device="cuda")
    too_many["dense_prompt_embeddings"] = torch.zeros((9, 64, 16, 16), device="cuda")
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(**too_many)
