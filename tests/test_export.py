"""ONNX exports of the tiny diffusion models and tiny SAM, checked against torch with ONNX Runtime.

Tolerances: float32 graphs on ONNX Runtime's CPU provider differ from torch by float32
rounding only. Measured on the tiny models: largest absolute difference 3.6e-6 (VAE decoder),
largest difference relative to the output's magnitude 1.9e-6; the bounds below leave
headroom for other CPUs' kernels while still catching any real divergence (a wrong scaling,
a dropped row, a swapped input), which shows up at 1e-2 or more.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import onnx
import pytest
import torch

from magicseg_engine.config import load_preset
from magicseg_engine.engine import export as E
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import load_diffusion
from magicseg_engine.masks.sam import build_sam

ATOL = 1e-4  # largest absolute difference, float32
RTOL = 1e-5  # largest difference / largest magnitude of torch's output, float32

EXPECTED = {
    "text-encoder": (
        {"input_ids": ("batch", 77)},
        {"last_hidden_state": ("batch", 77, 64)},
        {"input_ids": "int64", "last_hidden_state": "float32"},
    ),
    "unet": (
        {"sample": ("batch", 4, 8, 8), "timestep": ("batch",), "encoder_hidden_states": ("batch", 77, 64)},
        {"noise_pred": ("batch", 4, 8, 8)},
        {"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32", "noise_pred": "float32"},
    ),
    "vae-decoder": (
        {"latents": ("batch", 4, 8, 8)},
        {"image": ("batch", 3, 64, 64)},
        {"latents": "float32", "image": "float32"},
    ),
    "sam-image-encoder": (
        {"images": ("batch", 3, 128, 128)},
        {"image_embeddings": ("batch", 64, 16, 16)},
        {"images": "float32", "image_embeddings": "float32"},
    ),
    "sam-mask-decoder": (
        {"image_embeddings": ("images", 64, 16, 16), "sparse_prompt_embeddings": ("prompts", "tokens", 64),
         "dense_prompt_embeddings": ("prompts", 64, 16, 16)},
        {"masks": ("prompts", 3, 64, 64), "iou_predictions": ("prompts", 3)},
        {"image_embeddings": "float32", "sparse_prompt_embeddings": "float32",
         "dense_prompt_embeddings": "float32", "masks": "float32", "iou_predictions": "float32"},
    ),
}


@pytest.fixture(scope="module")
def diffusion():
    return load_diffusion(load_preset("tiny").diffusion, "cpu")


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def exported(diffusion, sam, out_dir):
    models = E.export_diffusion(diffusion, out_dir) + E.export_sam(sam, out_dir)
    return {m.component: m for m in models}


@pytest.fixture(scope="module")
def sessions(exported):
    return {c: E.onnxruntime_session(m) for c, m in exported.items()}


def source(component, diffusion, sam):
    return diffusion if component in E.DIFFUSION_COMPONENTS else sam


def run(session, inputs):
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


# --- every component ------------------------------------------------------------------------


@pytest.mark.parametrize("component", E.COMPONENTS)
@pytest.mark.slow
def test_component_passes_the_checker_and_matches_torch_at_batch_1_and_3(component, diffusion, sam, exported, sessions):
    model, session = exported[component], sessions[component]
    E.check_exported(model)
    src = source(component, diffusion, sam)
    for batch in (1, 3):
        inputs = E.sample_inputs(component, src, batch)
        result = E.parity(component, src, model, inputs, session=session)
        assert result["max_abs"] < ATOL, result
        assert result["max_rel"] < RTOL, result
        outputs = run(session, inputs)
        assert [o.shape[0] for o in outputs] == [batch] * len(outputs)
        if batch == 3:
            # Rows are computed per row, not broadcast from the first one.
            assert not np.allclose(outputs[0][0], outputs[0][1])


def test_metadata_names_shapes_and_digests(exported, out_dir):
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{c}.onnx" for c in E.COMPONENTS)
    for component, model in exported.items():
        inputs, outputs, dtypes = EXPECTED[component]
        assert model.path == out_dir / f"{component}.onnx"
        assert model.input_names == tuple(inputs)
        assert model.output_names == tuple(outputs)
        assert model.input_shapes == inputs
        assert model.output_shapes == outputs
        assert model.dtypes == dtypes
        assert (model.precision, model.opset, model.external_data) == ("fp32", 18, False)
        assert model.sha256 == hashlib.sha256(model.path.read_bytes()).hexdigest()
        # The file itself carries the metadata.
        assert E.load_exported(model.path) == model
        proto = onnx.load(str(model.path))
        assert {p.key: p.value for p in proto.metadata_props}["magicseg.component"] == component
        # Shape inference annotated the graph, and the clean-up left no Identity or Constant nodes.
        assert len(proto.graph.value_info) > 10
        assert not {n.op_type for n in proto.graph.node} & {"Identity", "Constant"}


def test_unet_takes_one_timestep_per_row(diffusion, sessions):
    inputs = E.sample_inputs("unet", diffusion, 3)
    inputs["timestep"] = torch.tensor([999.0, 500.0, 1.0])
    got = run(sessions["unet"], inputs)[0]
    with torch.no_grad():
        for row, t in enumerate(inputs["timestep"]):
            want = diffusion.unet(inputs["sample"][row : row + 1], t,
                                  encoder_hidden_states=inputs["encoder_hidden_states"][row : row + 1]).sample
            np.testing.assert_allclose(got[row : row + 1], want.numpy(), atol=ATOL, rtol=0)
    # The timestep matters: the same rows at another step give other predictions.
    inputs["timestep"] = torch.tensor([1.0, 1.0, 1.0])
    assert np.abs(run(sessions["unet"], inputs)[0][0] - got[0]).max() > 1e-3


def test_vae_decoder_divides_by_the_scaling_factor(diffusion, exported, sessions):
    vae = diffusion.vae
    latents = E.sample_inputs("vae-decoder", diffusion, 2)["latents"]
    got = run(sessions["vae-decoder"], {"latents": latents})[0]
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor).sample
        unscaled = vae.decode(latents).sample
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
    assert np.abs(got - unscaled.numpy()).max() > 1e-2
    meta = {p.key: p.value for p in onnx.load(str(exported["vae-decoder"].path)).metadata_props}
    assert float(meta["magicseg.vae_scaling_factor"]) == vae.config.scaling_factor


@pytest.mark.parametrize("shared_image", [True, False])
def test_mask_decoder_is_sams_decoder_for_any_number_of_prompts_and_tokens(sam, sessions, shared_image):
    gen = torch.Generator().manual_seed(3)
    n, size = 3, sam.image_encoder.img_size
    # One point per prompt and no box: SAM pads with a not-a-point token, 2 tokens (the
    # export was traced with 3).
    coords = torch.rand((n, 1, 2), generator=gen) * size
    labels = torch.ones((n, 1), dtype=torch.int)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape[1] == 2
    images = torch.randn((1 if shared_image else n, 64, 16, 16), generator=gen)
    masks, iou = run(sessions["sam-mask-decoder"], {
        "image_embeddings": images, "sparse_prompt_embeddings": sparse, "dense_prompt_embeddings": dense,
    })
    assert masks.shape == (n, 3, 64, 64) and iou.shape == (n, 3)
    with torch.no_grad():
        for i in range(n):
            want_masks, want_iou = sam.mask_decoder(
                image_embeddings=images[0 if shared_image else i][None],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=True,
            )
            np.testing.assert_allclose(masks[i : i + 1], want_masks.numpy(), atol=ATOL, rtol=0)
            np.testing.assert_allclose(iou[i : i + 1], want_iou.numpy(), atol=ATOL, rtol=0)


def test_latent_size_sets_the_spatial_size(diffusion, tmp_path):
    model = E.export_component("vae-decoder", diffusion, tmp_path, latent_size=(4, 6))
    assert model.input_shapes == {"latents": ("batch", 4, 4, 6)}
    assert model.output_shapes == {"image": ("batch", 3, 32, 48)}
    inputs = E.sample_inputs("vae-decoder", diffusion, 2, latent_size=(4, 6))
    assert E.parity("vae-decoder", diffusion, model, inputs)["max_abs"] < ATOL
    with pytest.raises(UsageError, match="latent_size applies"):
        E.export_component("text-encoder", diffusion, tmp_path, latent_size=8)


# --- files ----------------------------------------------------------------------------------


def test_external_data_is_written_beside_the_model_and_hashed(diffusion, tmp_path):
    model = E.export_component("vae-decoder", diffusion, tmp_path, external_data=True)
    data = tmp_path / "vae-decoder.onnx.data"
    assert model.external_data and model.data_path == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae-decoder.onnx", "vae-decoder.onnx.data"]
    # The weights are in the data file, not the model file.
    assert data.stat().st_size > 4 * model.path.stat().st_size
    assert model.sha256 == hashlib.sha256(model.path.read_bytes() + data.read_bytes()).hexdigest()
    E.check_exported(model)
    assert E.load_exported(model.path) == model
    inputs = E.sample_inputs("vae-decoder", diffusion, 3)
    assert E.parity("vae-decoder", diffusion, model, inputs)["max_abs"] < ATOL

    # Exported again with the weights inside: the stale data file goes, and the old record no
    # longer describes what is on disk.
    inline = E.export_component("vae-decoder", diffusion, tmp_path, external_data=False)
    assert not inline.external_data and not data.exists()
    with pytest.raises(E.ExportError, match="missing"):
        E.check_exported(model)
    E.check_exported(inline)


def test_check_exported_rejects_changed_and_invalid_files(exported, tmp_path):
    model = exported["text-encoder"]
    copy = tmp_path / "text-encoder.onnx"
    blob = bytearray(model.path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    copy.write_bytes(bytes(blob))
    changed = E.ExportedModel(**{**model.__dict__, "path": copy})
    with pytest.raises(E.ExportError, match="changed since it was exported"):
        E.check_exported(changed)
    # A file whose digest matches but that is no valid model fails the checker.
    copy.write_bytes(b"not a model")
    invalid = E.ExportedModel(**{**model.__dict__, "path": copy, "sha256": hashlib.sha256(b"not a model").hexdigest()})
    with pytest.raises(E.ExportError, match="fails the ONNX checker"):
        E.check_exported(invalid)
    with pytest.raises(E.ExportError, match="does not exist"):
        E.check_exported(E.ExportedModel(**{**model.__dict__, "path": tmp_path / "gone.onnx"}))


def test_a_failed_export_leaves_the_previous_file(diffusion, tmp_path, monkeypatch):
    first = E.export_component("text-encoder", diffusion, tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("inference broke")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", broken)
    with pytest.raises(E.ExportError, match="shape inference failed"):
        E.export_component("text-encoder", diffusion, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["text-encoder.onnx"]
    E.check_exported(first)


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="half-precision export works where CUDA is")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_is_refused_without_cuda(diffusion, tmp_path, precision):
    with pytest.raises(UsageError, match="needs a CUDA device"):
        E.export_component("unet", diffusion, tmp_path, precision=precision)
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(diffusion, sam, tmp_path):
    with pytest.raises(UsageError, match="unknown component"):
        E.export_component("vae-encoder", diffusion, tmp_path)
    with pytest.raises(UsageError, match="unknown precision"):
        E.export_component("unet", diffusion, tmp_path, precision="int8")
    with pytest.raises(UsageError, match="opset"):
        E.export_component("unet", diffusion, tmp_path, opset=13)
    with pytest.raises(UsageError, match="export_sam exports"):
        E.export_sam(sam, tmp_path, components=("unet",))
    with pytest.raises(UsageError, match="export_diffusion exports"):
        E.export_diffusion(diffusion, tmp_path, components=())
    with pytest.raises(TypeError, match="Sam"):
        E.export_component("sam-mask-decoder", diffusion, tmp_path)
    with pytest.raises(ValueError, match="not a unet"):
        E.parity("unet", diffusion, E.ExportedModel("vae-decoder", tmp_path / "x.onnx", (), (), {}, "fp32", 18, "", False), {})
    assert not list(tmp_path.iterdir())


def test_export_leaves_the_callers_module_as_it_was(diffusion, tmp_path):
    text_encoder = diffusion.text_encoder
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    text_encoder.train()
    try:
        E.export_component("text-encoder", diffusion, tmp_path)
        assert all(m.training for m in text_encoder.modules())
    finally:
        text_encoder.eval()
    after = text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_unet_with_attention_capture_installed_is_refused(diffusion, tmp_path):
    from magicseg_engine.generate.attention import AttentionCapture

    capture = AttentionCapture(diffusion.unet, diffusion.tokenizer)
    with capture.installed(), pytest.raises(UsageError, match="attention-capture"):
        E.export_component("unet", diffusion, tmp_path)


# --- GPU and full size ----------------------------------------------------------------------


@pytest.mark.gpu
def test_fp16_unet_export_on_cuda(tmp_path):
    models = load_diffusion(load_preset("tiny").diffusion, "cuda", dtype=torch.float32)
    model = E.export_component("unet", models, tmp_path, precision="fp16")
    assert model.precision == "fp16"
    assert model.dtypes["sample"] == "float16" and model.dtypes["noise_pred"] == "float16"
    assert model.dtypes["timestep"] == "float32"
    assert next(models.unet.parameters()).dtype is torch.float32  # the caller's model is untouched
    E.check_exported(model)
    # Against the float32 model: what half precision costs, on the CUDA provider where there is one.
    result = E.parity("unet", models, model, E.sample_inputs("unet", models, 3))
    assert result["max_rel"] < 2e-2, result


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MAGICSEG_SLOW") != "1", reason="set MAGICSEG_SLOW=1 (needs ~13 GB RAM, about a minute)")
def test_sd15_unet_exports_with_external_data_and_matches_torch(tmp_path):
    models = load_diffusion(load_preset("sd15-random").diffusion, "cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    model = E.export_component("unet", models, tmp_path)
    export_s = time.perf_counter() - t0
    assert model.external_data
    assert model.input_shapes == {"sample": ("batch", 4, 64, 64), "timestep": ("batch",),
                                  "encoder_hidden_states": ("batch", 77, 768)}
    assert model.data_path.stat().st_size > 3 * 2**30 and model.path.stat().st_size < 50 * 2**20
    t0 = time.perf_counter()
    E.check_exported(model)
    check_s = time.perf_counter() - t0
    result = E.parity("unet", models, model, E.sample_inputs("unet", models, 1))
    print(f"sd15 unet: export {export_s:.0f} s, check {check_s:.0f} s, torch {result['torch_s']:.1f} s, "
          f"onnxruntime {result['onnxruntime_s']:.1f} s, max_abs {result['max_abs']:.2e}, "
          f"max_rel {result['max_rel']:.2e}")
    assert result["max_abs"] < 1e-3 and result["max_rel"] < 1e-4, result
