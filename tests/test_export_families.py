"""ONNX exports of SD 1.x, SD 2.x and SDXL models, and the exported backends running them.

The models are the small random folders of tests/families.py, in the real layouts; onnxruntime
runs every file against the torch computation it was exported from.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from families import TEXT_1, TEXT_2, write_family
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import DiffusionConfig
from magicseg_engine.data.shards import iter_samples
from magicseg_engine.engine.backends import text_conditioning
from magicseg_engine.engine.build import component_precision
from magicseg_engine.engine.export import (
    DIFFUSION_COMPONENTS,
    capture_parity,
    check_exported,
    export_component,
    onnxruntime_session,
    parity,
    sample_inputs,
    torch_callable,
)
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.models import load_diffusion

# Every test here builds ONNX exports or renders whole runs: the full suite, not the fast lane.
pytestmark = pytest.mark.slow

FAMILIES = ("sd1", "sd2", "sdxl")
SD_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    return {family: write_family(base / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def models(folders):
    config = {f: DiffusionConfig(architecture="sd15", weights="pretrained", model=str(folders[f]), dtype="float32")
              for f in FAMILIES}
    return {f: load_diffusion(config[f]) for f in FAMILIES}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    return {f: {c: export_component(c, models[f], base / f) for c in DIFFUSION_COMPONENTS} for f in FAMILIES}


def ort_run(exported, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = onnxruntime_session(exported, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feeds.items()})))


@pytest.mark.parametrize("component", DIFFUSION_COMPONENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_onnxruntime_matches_torch(models, exports, family, component):
    exported = exports[family][component]
    check_exported(exported)
    for batch in (1, 3):
        check = parity(component, models[family], exported, sample_inputs(component, models[family], batch, seed=batch))
        assert check["max_rel"] < 1e-4, (batch, check)


def test_sd_exports_keep_their_inputs_and_outputs(exports):
    for family in ("sd1", "sd2"):
        assert exports[family]["unet"].input_names == SD_UNET_INPUTS
        assert exports[family]["text-encoder"].output_names == ("last_hidden_state",)
    assert exports["sd2"]["text-encoder"].output_shapes["last_hidden_state"] == ("batch", 77, 64)


def test_sdxl_exports_take_and_give_what_the_sampler_passes(models, exports):
    text, unet = exports["sdxl"]["text-encoder"], exports["sdxl"]["unet"]
    width = TEXT_1["hidden_size"] + TEXT_2["hidden_size"]
    assert text.input_shapes == {"input_ids": ("batch", 2, 77)}
    assert text.output_shapes == {"encoder_hidden_states": ("batch", 77, width),
                                  "text_embeds": ("batch", TEXT_2["projection_dim"])}
    assert unet.input_names == SD_UNET_INPUTS + ("text_embeds", "time_ids")
    assert unet.input_shapes["text_embeds"] == ("batch", TEXT_2["projection_dim"])
    assert unet.input_shapes["time_ids"] == ("batch", 6)
    assert unet.input_shapes["encoder_hidden_states"] == ("batch", 77, width)


def test_sdxl_text_encoder_export_reads_both_tokenizers(models, exports):
    m = models["sdxl"]
    ids = m.tokenize(["a photo of a cat", "two dogs on a sofa"])
    got = ort_run(exports["sdxl"]["text-encoder"], {"input_ids": ids})
    with torch.no_grad():
        context, pooled = text_conditioning(m.text_encoder, m.text_encoder_2, ids)
    np.testing.assert_allclose(got["encoder_hidden_states"], context.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["text_embeds"], pooled.numpy(), rtol=1e-4, atol=1e-5)
    # The second tokenizer's row feeds the second half of the context and the pooled embedding only.
    swapped = ids.clone()
    swapped[:, 1] = ids.flip(0)[:, 1]
    other = ort_run(exports["sdxl"]["text-encoder"], {"input_ids": swapped})
    first = TEXT_1["hidden_size"]
    np.testing.assert_allclose(other["encoder_hidden_states"][..., :first], got["encoder_hidden_states"][..., :first],
                               rtol=1e-5, atol=1e-6)
    assert np.abs(other["encoder_hidden_states"][..., first:] - got["encoder_hidden_states"][..., first:]).max() > 1e-3
    np.testing.assert_allclose(other["text_embeds"], got["text_embeds"][::-1], rtol=1e-4, atol=1e-5)


def test_sdxl_unet_export_reads_its_added_conditions(models, exports):
    m, exported = models["sdxl"], exports["sdxl"]["unet"]
    inputs = sample_inputs("unet", m, 2)
    assert inputs["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    unet = torch_callable("unet", m)
    changed = {
        "text_embeds": {**inputs, "text_embeds": -inputs["text_embeds"]},
        "time_ids": {**inputs, "time_ids": inputs["time_ids"] * 4},
    }
    base = ort_run(exported, inputs)["noise_pred"]
    for name, feeds in changed.items():
        got = ort_run(exported, feeds)["noise_pred"]
        with torch.no_grad():
            expected = unet(*(feeds[n] for n in exported.input_names)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(got - base).max() > 1e-3, f"{name} does not reach the exported UNet"


def test_sdxl_unet_capture_export_matches_the_torch_capture(models, tmp_path):
    m = models["sdxl"]
    layers = AttentionCapture(m.unet, m.tokenizer).layers
    exported = export_component("unet", m, tmp_path, capture_layers=layers)
    assert exported.input_names[-2:] == ("text_embeds", "time_ids")
    check = capture_parity(m, exported)
    assert check["max_rel"] < 1e-4, check
    assert set(check["outputs"]) == {"noise_pred", *(f"maps_f{f}" for f in sorted(set(layers.values())))}


def test_sdxl_vae_decoder_is_exported_in_float32_when_float16_is_asked_for(models):
    assert models["sdxl"].vae_overflows_in_float16 and not models["sd2"].vae_overflows_in_float16
    assert component_precision("vae-decoder", models["sdxl"], "fp16") == "fp32"
    assert component_precision("vae-decoder", models["sdxl"], "bf16") == "bf16"  # bfloat16 has float32's range
    assert component_precision("unet", models["sdxl"], "fp16") == "fp16"
    assert component_precision("vae-decoder", models["sd2"], "fp16") == "fp16"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _images(sample) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(sample[k])), dtype=np.int32) for k in ("pos.jpg", "neg.jpg", "mask.png")]


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_build_engines_then_onnxruntime_generation_matches_torch(folders, tmp_path, family):
    engines = tmp_path / "engines"
    common = ["--preset", "sd15", "--model", folders[family], "--size", 64, 64, "--device", "cpu"]
    result = invoke("build-engines", *common, "--out", engines, "--components", "unet,unet-capture,vae-decoder,text-encoder")
    assert result.exit_code == 0, result.output
    manifest = json.loads((engines / "manifest.json").read_text())
    assert all(e["onnxruntime_parity"]["max_rel"] < 1e-4 for e in manifest["components"])
    # bench backends feeds each file at the size it was exported for (64 px here, not the UNet's default).
    timings = tmp_path / "backends.json"
    result = invoke("bench", "backends", "--preset", "sd15", "--model", folders[family], "--engines", engines,
                    "--batch-sizes", "1,2", "--reps", 1, "--warmup", 0, "--device", "cpu", "--json", timings)
    assert result.exit_code == 0, result.output
    rows = json.loads(timings.read_text())["results"]
    assert [(r["component"], r["batch"]) for r in rows] == [(c, b) for c in DIFFUSION_COMPONENTS for b in (1, 2)]
    assert all(r["onnxruntime"]["items_per_s"] > 0 for r in rows)
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        args = ["generate", *common, "--steps", 3, "--dtype", "float32", "--classes", "voc", "--num-pairs", 2,
                "--no-sam", "--backend", backend, "--out", out]
        result = invoke(*args, *(["--engines", engines] if backend == "onnxruntime" else []))
        assert result.exit_code == 0, result.output
        runs[backend] = {s["__key__"]: s for s in iter_samples(out)}
    assert set(runs["torch"]) == set(runs["onnxruntime"]) and len(runs["torch"]) == 2
    for key, s in runs["torch"].items():
        o = runs["onnxruntime"][key]
        for a, b in zip(_images(s)[:2], _images(o)[:2]):
            assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8  # JPEGs of images within float error
        maps_t, maps_o = np.load(io.BytesIO(s["attn.npy"])), np.load(io.BytesIO(o["attn.npy"]))
        assert maps_t.any() and np.abs(maps_t.astype(np.float32) - maps_o.astype(np.float32)).max() \
            <= 1e-3 * max(1.0, float(np.abs(maps_t).max()))
        assert (_images(s)[2] == _images(o)[2]).mean() > 0.98
