"""The onnxruntime backend's CLIP text encoder and SAM image encoder against torch, element by element.

Files come from build-engines (tiny preset) and run through the backend's own runners
(`OnnxRuntimeComponent`, `make_sam_runners("onnxruntime", ...)`), as `generate --backend
onnxruntime` runs them; torch runs through `torch_runners` / `sam_torch_runners`. Inputs are
what a run feeds them: token ids of real prompts (padded to 77, the empty prompt included), and
images resized and normalised the way SamRefiner does.

Tolerances: float32 on ONNX Runtime's CPU provider against float32 torch; the graphs compute
the same operations, fused or reordered, so outputs differ by accumulated rounding. Measured
on a 2-core x86 CPU: text encoder largest |difference| 1.4e-6 on outputs up to 3.4 in
magnitude, SAM image encoder 4.5e-6 on outputs up to 3.8. Bounds: atol 5e-5 and rtol 1e-5 per
element (np.testing.assert_allclose: |onnx - torch| <= atol + rtol * |torch|), ten times the
larger of those, while an export error (a wrong layer, weight, scale or dropped row) moves
elements by 1e-2 or more, which the last test shows is far outside them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from magicseg_engine.config import load_preset  # noqa: E402
from magicseg_engine.engine.backends import OnnxRuntimeComponent, make_sam_runners, torch_runners  # noqa: E402
from magicseg_engine.engine.build import build_engines, load_components, sam_identity  # noqa: E402
from magicseg_engine.generate.models import load_diffusion  # noqa: E402
from magicseg_engine.masks.sam import build_sam  # noqa: E402

# Exporting the three components and building both models takes over ten seconds on 2 cores.
pytestmark = pytest.mark.slow

ATOL = 5e-5
RTOL = 1e-5
PROMPTS = ["a photograph of a dog on the grass", "nothing on the grass", "",
           "a red circle and a blue square on a grey floor, seen from above at noon"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = load_preset("tiny")
    engines = tmp_path_factory.mktemp("engines") / "tiny"
    build_engines(config, engines, fmt="onnx", precision="fp32", batch_sizes=(1,),
                  components=("text-encoder", "sam-image-encoder", "sam-mask-decoder"), device="cpu")
    # The weights build-engines exported: the preset's, from its seed.
    models = load_diffusion(config.diffusion, "cpu", torch.float32, seed=config.seed)
    sam = build_sam(config.sam.model_type, config.sam.checkpoint, device="cpu", seed=config.seed)
    return config, engines, models, sam


def assert_elementwise_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=RTOL, atol=ATOL)


def test_text_encoder_matches_torch_element_by_element(tiny):
    config, engines, models, _ = tiny
    exported = load_components(engines, models.model_id, ("text-encoder",))["text-encoder"]
    onnx_text = OnnxRuntimeComponent(exported, torch.device("cpu"))
    ids = models.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    with torch.no_grad():
        want, pooled = torch_runners(models).encode_text(ids)
    assert pooled is None  # SD 1.x conditioning: the last hidden state only
    for rows in (slice(0, 1), slice(0, len(PROMPTS))):  # batch 1 and a batch of all prompts
        got = onnx_text(input_ids=ids[rows])["last_hidden_state"]
        assert_elementwise_close(got, want[rows])
    # Rows are the prompts' own: different prompts give different states, far beyond the bounds.
    assert float((want[0] - want[1]).abs().max()) > 100 * ATOL


def _sam_inputs(sam, seed: int, count: int) -> torch.Tensor:
    """Images as SamRefiner hands them to the encoder: longest side resized, normalised, padded."""
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(seed)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    images = []
    for _ in range(count):
        # Smooth gradients plus a bright rectangle and noise: image-like, not only noise.
        h, w = 96, 72
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 80.0)], -1)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y0:y0 + 30, x0:x0 + 20] = 250
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        images.append(transform.apply_image(image))
    pixels = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2)
    return sam.preprocess(pixels)


def test_sam_image_encoder_matches_torch_element_by_element(tiny):
    config, engines, _, sam = tiny
    onnx_sam = make_sam_runners("onnxruntime", sam, sam_identity(config), engines)
    torch_sam = make_sam_runners("torch", sam, sam_identity(config))
    x = _sam_inputs(sam, seed=0, count=3)
    assert x.shape == (3, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.no_grad():
        want = torch_sam.encode_images(x)
    for rows in (slice(0, 1), slice(0, 3)):
        got = onnx_sam.encode_images(x[rows])
        assert_elementwise_close(got, want[rows])
    assert float((want[0] - want[1]).abs().max()) > 100 * ATOL


def test_the_bounds_catch_a_small_export_error(tiny):
    """The check is not vacuous: the same comparison fails for a text encoder whose final
    layer norm is off by 1% (a wrong weight in one layer), and for SAM inputs scaled by 1%."""
    _, engines, models, sam = tiny
    exported = load_components(engines, models.model_id, ("text-encoder",))["text-encoder"]
    got = OnnxRuntimeComponent(exported, torch.device("cpu"))(input_ids=models.tokenize(PROMPTS))["last_hidden_state"]
    norm = models.text_encoder.get_submodule("final_layer_norm")
    original = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.mul_(1.01)
            off = torch_runners(models).encode_text(models.tokenize(PROMPTS))[0]
    finally:
        with torch.no_grad():
            norm.weight.copy_(original)
    with pytest.raises(AssertionError):
        assert_elementwise_close(got, off)
    x = _sam_inputs(sam, seed=1, count=1)
    with torch.no_grad():
        want = make_sam_runners("torch", sam, "").encode_images(x * 1.01)
    with pytest.raises(AssertionError):
        assert_elementwise_close(make_sam_runners("onnxruntime", sam, sam_identity(load_preset("tiny")), engines)
                                 .encode_images(x), want)
