import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import iter_samples
from magicseg_engine.config import load_preset
from magicseg_engine.engine.export import CAPTURE_COMPONENT, COMPONENTS
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.models import load_diffusion

# Every test here builds ONNX exports or renders whole runs: the full suite, not the fast lane.
pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    result = invoke("build-engines", "--preset", "tiny", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_manifest_lists_every_component_checked_against_torch(engines):
    manifest = json.loads((engines / "manifest.json").read_text())
    assert [e["component"] for e in manifest["components"]] == ["unet", "unet-capture", "vae-decoder", "text-encoder",
                                                                "sam-image-encoder", "sam-mask-decoder"]
    assert manifest["model_id"].startswith("tiny-random:seed=0")
    assert manifest["sam_id"] == "tiny:random:seed=0"
    for e in manifest["components"]:
        assert (engines / e["path"]).is_file() and e["format"] == "onnx" and e["precision"] == "fp32"
        assert e["onnxruntime_parity"]["max_abs"] < 1e-4
        assert set(COMPONENTS + (CAPTURE_COMPONENT,)) >= {e["component"]}
    unet = next(e for e in manifest["components"] if e["component"] == "unet")
    assert unet["input_shapes"]["sample"] == ["batch", 4, 8, 8]
    capture = next(e for e in manifest["components"] if e["component"] == "unet-capture")
    # The layers a run's capture reads by default, and nothing else.
    models = load_diffusion(load_preset("tiny").diffusion, "cpu")
    assert capture["capture_layers"] == AttentionCapture(models.unet, models.tokenizer).layers
    assert set(capture["input_shapes"]) == {"sample", "timestep", "encoder_hidden_states", "query_rows", "key_rows",
                                            "token_index"}


def test_profiles_checked_before_export_name_the_exports_own_dims(engines):
    """build-engines checks every TensorRT profile before exporting, from the dims EXPORT_DIMS
    says each component has: those must be the dims the exports really have."""
    from magicseg_engine.engine.build import EXPORT_DIMS, engine_profile

    manifest = json.loads((engines / "manifest.json").read_text())
    assert {e["component"] for e in manifest["components"]} == set(EXPORT_DIMS)
    for e in manifest["components"]:
        names = {d for shape in e["input_shapes"].values() for d in shape if isinstance(d, str)}
        assert names == set(EXPORT_DIMS[e["component"]]), e["component"]
        # And the real shapes get a profile for the default batch sizes.
        assert set(engine_profile(e["component"], e["input_shapes"], (1, 8, 16))) == set(e["input_shapes"])


def test_onnxruntime_backend_draws_what_torch_draws(engines, tmp_path):
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        args = ["generate", "--classes", "voc", "--num-pairs", 3, "--out", out, "--mask-source", "none",
                "--device", "cpu", "--backend", backend]
        if backend == "onnxruntime":
            args += ["--engines", engines]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        runs[backend] = {s["__key__"]: s for s in iter_samples(out)}
    assert set(runs["torch"]) == set(runs["onnxruntime"])  # same keys: the backend is not part of a sample's identity
    for key, s in runs["torch"].items():
        for image in ("pos.jpg", "neg.jpg"):
            a = np.asarray(Image.open(io.BytesIO(s[image])), dtype=int)
            b = np.asarray(Image.open(io.BytesIO(runs["onnxruntime"][key][image])), dtype=int)
            assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8  # JPEG of images within float error


def test_engines_serve_every_sampling_seed(engines, tmp_path):
    """--seed picks prompts and noise, not weights: the engines of weights seed 0 draw any seed's run."""
    out = tmp_path / "seed5"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--mask-source", "none", "--device", "cpu",
                    "--backend", "onnxruntime", "--engines", engines, "--seed", 5, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((engines / "manifest.json").read_text())
    assert {json.loads(s["json"])["model"] for s in iter_samples(out)} == {manifest["model_id"]}
    assert {json.loads(s["json"])["seed"] for s in iter_samples(out)} == {5 * 2**32}


def test_engines_of_other_weights_or_sizes_are_refused(engines, tmp_path):
    base = ["generate", "--classes", "voc", "--num-pairs", 1, "--mask-source", "none", "--device", "cpu",
            "--backend", "onnxruntime", "--engines", engines]
    result = invoke(*base, "--out", tmp_path / "a", "--weights-seed", 3)
    assert result.exit_code == 2 and "exported from other weights" in result.stderr
    result = invoke(*base, "--out", tmp_path / "b", "--size", 128, 128)
    assert result.exit_code == 2 and "exported for latents" in result.stderr
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--mask-source", "none", "--device", "cpu",
                    "--backend", "onnxruntime", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "needs --engines" in result.stderr
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--device", "cpu",
                    "--backend", "tensorrt", "--engines", engines, "--out", tmp_path / "d")
    assert result.exit_code == 2 and "TensorRT is not installed" in result.stderr
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("component", ["unet", "text-encoder"])
def test_an_export_changed_since_build_engines_is_refused_before_use(engines, tmp_path, component):
    """One byte of an exported .onnx flipped (same size, only its sha256 tells): the backend
    refuses it in one line naming the file and build-engines, before writing anything."""
    import shutil

    copy = tmp_path / "engines"
    shutil.copytree(engines, copy)
    target = copy / "onnx" / f"{component}.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--mask-source", "none", "--device", "cpu",
                    "--backend", "onnxruntime", "--engines", copy, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "build-engines" in lines[0], result.stderr
    assert "changed since build-engines wrote it" in lines[0]
    assert not (tmp_path / "run").exists()


def _masked_runs(engines, tmp_path, *extra):
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        args = ["generate", "--num-pairs", 3, "--out", out, "--device", "cpu", "--backend", backend,
                *(extra or ("--classes", "voc"))]
        if backend == "onnxruntime":
            args += ["--engines", engines]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        runs[backend] = {s["__key__"]: s for s in iter_samples(out)}
    return runs


@pytest.fixture(scope="module")
def shapes_engines(tmp_path_factory):
    """The shapes preset's engines: its trained UNet draws real objects and its trained SAM
    outlines them. On the tiny preset's random weights SAM scores its candidate masks almost
    alike and a box one pixel wider can pick another candidate, so masks there flip whole
    regions on float rounding and say nothing about the backends."""
    out = tmp_path_factory.mktemp("engines") / "shapes"
    result = invoke("build-engines", "--preset", "shapes", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_masks_from_onnxruntime_engines_match_the_torch_capture(shapes_engines, tmp_path):
    # unet-capture gives the attention maps and ONNX Runtime runs SAM: same maps, same masks.
    runs = _masked_runs(shapes_engines, tmp_path, "--preset", "shapes", "--classes", "shapes")
    assert set(runs["torch"]) == set(runs["onnxruntime"])
    assert any(np.asarray(Image.open(io.BytesIO(s["mask.png"]))).any() for s in runs["torch"].values())
    for key, s in runs["torch"].items():
        o = runs["onnxruntime"][key]
        a, b = np.load(io.BytesIO(s["attn.npy"])), np.load(io.BytesIO(o["attn.npy"]))
        assert a.shape == b.shape and a.any()
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-3 * max(1.0, float(np.abs(a).max()))
        ma = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        mb = np.asarray(Image.open(io.BytesIO(o["mask.png"])))
        assert (ma == mb).mean() > 0.98  # images equal to float error, thresholds may flip a few edge pixels
        assert json.loads(s["json"])["classes"] == json.loads(o["json"])["classes"]


def test_masks_need_unet_capture_in_the_engines(tmp_path):
    engines = tmp_path / "plain"
    result = invoke("build-engines", "--out", engines, "--device", "cpu", "--components", "unet,vae-decoder,text-encoder")
    assert result.exit_code == 0, result.output
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--device", "cpu", "--no-sam",
                    "--backend", "onnxruntime", "--engines", engines, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "has no unet-capture" in result.stderr
    result = invoke("build-engines", "--out", engines, "--device", "cpu", "--components", "unet-capture")
    assert result.exit_code == 0, result.output  # the manifest now lists unet-capture alone
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--device", "cpu",
                    "--backend", "onnxruntime", "--engines", engines, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "has no text-encoder, unet, vae-decoder" in result.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_masks_command_runs_sam_from_the_engines(engines, tiny_run, tmp_path):
    # Only read (`masks` writes to --out): the shared run of these flags (conftest.py).
    base = tiny_run("--classes", "voc", "--num-pairs", 2)
    masks = {}
    for backend in ("torch", "onnxruntime"):
        args = ["masks", "--data", base, "--out", tmp_path / backend, "--device", "cpu", "--backend", backend]
        result = invoke(*(args + (["--engines", engines] if backend == "onnxruntime" else [])))
        assert result.exit_code == 0, result.output
        masks[backend] = {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["mask.png"])))
                          for s in iter_samples(tmp_path / backend)}
    assert masks["torch"].keys() == masks["onnxruntime"].keys()
    assert any(m.any() for m in masks["torch"].values())
    for key in masks["torch"]:
        assert (masks["torch"][key] == masks["onnxruntime"][key]).mean() > 0.98
    # SAM exported from other weights is refused before anything is written.
    result = invoke("masks", "--data", base, "--out", tmp_path / "other", "--device", "cpu", "--sam-model", "vit_b",
                    "--backend", "onnxruntime", "--engines", engines)
    assert result.exit_code == 2 and "SAM in" in result.stderr and not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tensorrt"], "TensorRT is not installed"),
        (["--components", "unet,vae"], "--components: vae"),
        (["--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
        (["--batch-sizes", "0,8"], "--batch-sizes '0,8'"),
        (["--precision", "fp8"], "--precision 'fp8'"),
        (["--precision", "fp16"], "fp16"),
    ],
)
def test_build_engines_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "engines"
    result = invoke("build-engines", "--out", out, "--device", "cpu", "--components", "text-encoder", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    if out.exists():  # refused after the folder was made: still no file in it
        assert not list(out.rglob("*.*"))


def test_backends_benchmark_times_every_component_at_every_batch(engines, tmp_path):
    out = tmp_path / "backends.json"
    result = invoke("bench", "backends", "--engines", engines, "--batch-sizes", "1,2", "--reps", 1, "--warmup", 0,
                    "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["component"], r["batch"]) for r in rows] == [
        (c, b) for c in ("text-encoder", "unet", "vae-decoder") for b in (1, 2)]
    for r in rows:
        assert r["onnxruntime_speedup"] == pytest.approx(r["torch"]["median_s"] / r["onnxruntime"]["median_s"])
        assert r["torch"]["items_per_s"] == pytest.approx(r["batch"] / r["torch"]["median_s"])


@pytest.mark.parametrize("args, message", [
    (["--backends", "onnxruntime"], "torch included"),
    (["--backends", "torch,tpu"], "choose from torch, compile, onnxruntime, tensorrt"),
    (["--backends", "torch,tensorrt"], "TensorRT is not installed"),
    (["--components", "sam-image-encoder"], "times text-encoder, unet and vae-decoder"),
])
def test_backends_benchmark_bad_input(engines, tmp_path, args, message):
    out = tmp_path / "b.json"
    result = invoke("bench", "backends", "--engines", engines, "--batch-sizes", "1", "--reps", 1, "--warmup", 0,
                    "--device", "cpu", "--json", out, *args)
    assert result.exit_code == 2 and message in result.stderr and not out.exists()


@pytest.mark.slow
def test_backends_benchmark_with_compile(engines, tmp_path):
    out = tmp_path / "b.json"
    result = invoke("bench", "backends", "--engines", engines, "--batch-sizes", "2", "--reps", 1, "--warmup", 1,
                    "--device", "cpu", "--json", out, "--components", "unet", "--backends", "torch,compile")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["backends"] == ["torch", "compile"]
    (row,) = data["results"]
    assert row["compile_speedup"] == pytest.approx(row["torch"]["median_s"] / row["compile"]["median_s"])
