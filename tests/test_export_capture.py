"""The UNet exported with attention-capture outputs, checked against torch with ONNX Runtime.

The expected maps come from AttentionCapture itself, run for one UNet call on the tiny
preset's UNet: its per-factor sums after one captured step are exactly what one call of the
exported graph returns (positive rows then negative rows).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from magicseg_engine.config import load_preset
from magicseg_engine.engine import export as E
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.attention import AttentionCapture, cross_attention_layers
from magicseg_engine.generate.models import load_diffusion
from magicseg_engine.generate.sampler import UNetBatchLayout
from magicseg_engine.kernels.attention_capture import class_attention_reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return load_diffusion(load_preset("tiny").diffusion, "cpu")


@pytest.fixture(scope="module")
def capture(models):
    return AttentionCapture(models.unet, models.tokenizer, factors=(1, 2), use_triton=False)


@pytest.fixture(scope="module")
def exported(models, capture, tmp_path_factory):
    return E.export_component("unet", models, tmp_path_factory.mktemp("onnx"), capture_layers=capture.layers)


@pytest.fixture(scope="module")
def session(exported):
    return E.onnxruntime_session(exported, providers=["CPUExecutionProvider"])


def _unet_inputs(models, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return E.sample_inputs("unet", models, batch, seed=seed)


def _run(session, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.slow
def test_file_describes_the_capture_outputs(exported, capture):
    assert exported.component == E.CAPTURE_COMPONENT
    assert exported.path.name == "unet-capture.onnx"
    assert exported.input_names == E._SPECS["unet"].inputs + E.CAPTURE_INPUTS
    assert exported.output_names == ("noise_pred", "maps_f1", "maps_f2")
    assert exported.input_shapes["token_index"] == ("rows", "classes", "tokens")
    assert exported.input_shapes["query_rows"] == ("rows",)
    # 8x8 latents: 64 positions at factor 1, 16 at factor 2.
    assert exported.output_shapes["maps_f1"] == ("rows", "classes", 64)
    assert exported.output_shapes["maps_f2"] == ("rows", "classes", 16)
    assert exported.dtypes["token_index"] == "int64" and exported.dtypes["maps_f2"] == "float32"
    meta = {p.key: p.value for p in onnx.load(str(exported.path), load_external_data=False).metadata_props}
    assert json.loads(meta["magicseg.capture_layers"]) == capture.layers
    assert E.load_exported(exported.path) == exported
    E.check_exported(exported)


@pytest.mark.parametrize(
    ("prompts", "classes"),
    [
        (["a photo of a dog"], [("dog",)]),  # R = 2, C = 1
        (["a cat and a traffic light on a street", "a person with two dogs and a cat"],
         [("cat", "traffic light"), ("person", "dog", "cat")]),  # R = 4, C = 3, padded classes and tokens
    ],
)
def test_maps_match_attention_capture_for_one_call(models, capture, session, prompts, classes):
    pairs = len(prompts)
    layout = UNetBatchLayout(pairs=pairs, guided=True)
    inputs = _unet_inputs(models, 4 * pairs, seed=pairs)
    capture.set_prompts(prompts, classes)
    with torch.no_grad(), capture.installed():
        capture.start(layout, 1)
        capture.before_step(0, inputs["timestep"][:1])
        noise = models.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        capture.finish()
    token_index = capture._token_index.long()
    assert (token_index == -1).any() or pairs == 1
    pos, neg = layout.positive_rows, layout.negative_rows
    rows = torch.arange(4 * pairs)
    feeds = dict(inputs)
    feeds["query_rows"] = torch.cat([rows[pos], rows[neg]])
    feeds["key_rows"] = torch.cat([rows[pos], rows[pos]])
    feeds["token_index"] = torch.cat([token_index, token_index])
    got = _run(session, feeds)

    np.testing.assert_allclose(got["noise_pred"], noise.numpy(), rtol=0, atol=ATOL)
    for factor in (1, 2):
        expected = capture._sums[factor].numpy()
        assert got[f"maps_f{factor}"].shape == expected.shape
        assert np.abs(expected).max() > 0.01  # the prompts' classes were found and attended to
        np.testing.assert_allclose(got[f"maps_f{factor}"], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("rows", "classes", "tokens"), [(1, 2, 1), (5, 4, 6)])
def test_maps_match_the_reference_for_any_rows(models, capture, session, rows, classes, tokens):
    """Arbitrary query/key rows and token lists (repeats, padding, an all-padding class)."""
    batch = 3
    gen = torch.Generator().manual_seed(rows * 100 + classes)
    inputs = _unet_inputs(models, batch, seed=rows)
    query_rows = torch.randint(0, batch, (rows,), generator=gen)
    key_rows = torch.randint(0, batch, (rows,), generator=gen)
    token_index = torch.randint(-1, 77, (rows, classes, tokens), generator=gen)
    token_index[0, -1] = -1

    # The layers' own q and k, recorded by processors that compute them as diffusers does.
    from magicseg_engine.generate.attention import _sdpa_attention

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(models.unet.named_modules())
    originals = {n: modules[n].processor for n in capture.layers}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            out, q, k = _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            seen[self.name] = (q, k)
            return out

    try:
        for n in capture.layers:
            modules[n].set_processor(Recorder(n))
        with torch.no_grad():
            noise = models.unet(inputs["sample"], inputs["timestep"],
                                encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    finally:
        for n, p in originals.items():
            modules[n].set_processor(p)
    expected: dict[int, torch.Tensor] = {}
    for name, factor in capture.layers.items():
        q, k = seen[name]
        m = class_attention_reference(q[query_rows], k[key_rows], token_index, q.shape[-1] ** -0.5)
        expected[factor] = expected.get(factor, 0) + m

    got = _run(session, {**inputs, "query_rows": query_rows, "key_rows": key_rows, "token_index": token_index})
    np.testing.assert_allclose(got["noise_pred"], noise.numpy(), rtol=0, atol=ATOL)
    for factor, maps in expected.items():
        assert got[f"maps_f{factor}"].shape == (rows, classes, 64 // factor**2)
        np.testing.assert_allclose(got[f"maps_f{factor}"], maps.numpy(), rtol=0, atol=ATOL)
    assert np.all(got["maps_f1"][0, -1] == 0)


def test_torch_callable_of_the_capture_variant_matches(models, capture, session):
    inputs = _unet_inputs(models, 4, seed=7)
    inputs["query_rows"] = torch.tensor([2, 3])
    inputs["key_rows"] = torch.tensor([2, 2])
    inputs["token_index"] = torch.tensor([[[5, 6]], [[5, -1]]])
    f = E.capture_callable(models, capture.layers)
    with torch.no_grad(), f.installed():
        expected = f(*(inputs[n] for n in E._SPECS["unet"].inputs + E.CAPTURE_INPUTS))
    got = _run(session, inputs)
    for name, ref in zip(("noise_pred", "maps_f1", "maps_f2"), expected):
        np.testing.assert_allclose(got[name], ref.numpy(), rtol=0, atol=ATOL)
    # The caller's UNet keeps its processors.
    assert all(type(m.processor).__name__ != "_ExportCaptureProcessor"
               for m in models.unet.modules() if hasattr(m, "processor"))


def test_capture_layers_are_checked(models, tmp_path):
    layers = cross_attention_layers(models.unet)
    with pytest.raises(UsageError, match="not cross-attention"):
        E.export_component("unet", models, tmp_path, capture_layers={"conv_in": 1})
    name = next(iter(layers))
    with pytest.raises(UsageError, match="factors"):
        E.export_component("unet", models, tmp_path, capture_layers={name: layers[name] * 8})
    with pytest.raises(UsageError, match="applies to the unet"):
        E.export_component("vae-decoder", models, tmp_path, capture_layers={name: layers[name]})
