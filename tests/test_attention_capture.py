"""Attention capture on the tiny preset's UNet, through the paired sampler."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from magicseg_engine.config import load_preset
from magicseg_engine.generate.attention import AttentionCapture, cross_attention_layers
from magicseg_engine.generate.models import SD15_UNET, load_diffusion
from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings

TINY = load_preset("tiny").diffusion
# Fixed here rather than read from the preset: the tests below count steps and latent pixels.
STEPS, SIZE, GUIDANCE = 4, 64, 7.5  # 8x8 latents
PROMPTS = ["a dog on a beach", "two people near traffic lights"]
NEGATIVES = ["nothing on a beach", "nothing near nothing"]
CLASSES = [("dog",), ("person", "traffic light")]
SEEDS = [1, 2]
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"  # 4x4 for the tiny model's 8x8 latents
OUTER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # 8x8: the latent resolution


@pytest.fixture(scope="module")
def models():
    return load_diffusion(TINY)


@pytest.fixture(scope="module")
def default_capture(models):
    """A capture with every default, over PROMPTS: shared by the tests that only read its maps."""
    capture, _ = capture_run(models)
    return capture


def make_sampler(models, **changes):
    settings = SamplingSettings(height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, scheduler="ddim")
    return PairedSampler(models, replace(settings, **changes), torch.device("cpu"), torch.float32)


def capture_run(models, sampler=None, prompts=PROMPTS, negatives=NEGATIVES, classes=CLASSES, seeds=SEEDS, **options):
    sampler = sampler or make_sampler(models)
    capture = AttentionCapture(models.unet, models.tokenizer, **options)
    capture.set_prompts(prompts, classes)
    with capture.installed():
        batch = sampler(prompts, negatives, seeds, hook=capture)
    return capture, batch


def processors(unet):
    return {name: proc for name, proc in unet.attn_processors.items()}


def token_position(tokenizer, prompt, word):
    """Where the single-token `word` sits in the padded prompt, found from the ids alone."""
    ids = tokenizer([prompt])[0].tolist()
    (word_id,) = tokenizer.encode(word)
    return [i for i, t in enumerate(ids) if t == word_id]


# --- the model is untouched ---------------------------------------------------------------

@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0], ids=["guided", "unguided"])
def test_images_are_bit_identical_with_capture_installed(models, guidance):
    sampler = make_sampler(models, guidance=guidance)
    plain = sampler(PROMPTS, NEGATIVES, SEEDS)
    before = processors(models.unet)
    capture, captured = capture_run(models, sampler, steps=(0.0, 1.0))
    np.testing.assert_array_equal(plain.positives, captured.positives)
    np.testing.assert_array_equal(plain.negatives, captured.negatives)
    after = processors(models.unet)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert capture.maps().abs().sum() > 0


def test_processors_are_restored_after_an_error(models):
    before = processors(models.unet)
    capture = AttentionCapture(models.unet, models.tokenizer)
    with pytest.raises(RuntimeError, match="boom"), capture.installed():
        assert any(p is not before[n] for n, p in processors(models.unet).items())
        raise RuntimeError("boom")
    after = processors(models.unet)
    assert all(after[n] is before[n] for n in before)


def test_nothing_recorded_without_installing(models, caplog):
    capture = AttentionCapture(models.unet, models.tokenizer)
    capture.set_prompts(PROMPTS, CLASSES)
    with caplog.at_level(logging.WARNING):
        make_sampler(models)(PROMPTS, NEGATIVES, SEEDS, hook=capture)
    assert "recorded nothing" in caplog.text
    with pytest.raises(RuntimeError):
        capture.maps()  # the latent size is only seen while installed


def test_generic_processor_path_is_also_transparent(models, default_capture):
    # With a processor other than AttnProcessor2_0 the original runs untouched and q, k are
    # projected separately; maps agree with the inline path up to float rounding.
    models.unet.set_attn_processor(AttnProcessor())
    try:
        sampler = make_sampler(models)
        plain = sampler(PROMPTS, NEGATIVES, SEEDS)
        generic, captured = capture_run(models, sampler)
        np.testing.assert_array_equal(plain.positives, captured.positives)
        np.testing.assert_array_equal(plain.negatives, captured.negatives)
        assert all(type(p) is AttnProcessor for p in models.unet.attn_processors.values())
    finally:
        models.unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(generic.maps(), default_capture.maps(), atol=1e-5, rtol=1e-4)


# --- maps ----------------------------------------------------------------------------------

def test_maps_shape_range_and_padding(default_capture):
    maps = default_capture.maps()
    assert maps.shape == (2, 2, 2, 8, 8) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    # Each map is an average of probability masses over some tokens.
    assert (maps <= 1).all()
    # Pair 0 has one class: its second slot is padding.
    assert torch.equal(maps[0, :, 1], torch.zeros(2, 8, 8))
    assert (maps[:, :, 0] > 0).all() and (maps[1] > 0).all()


def test_missing_and_truncated_classes_map_to_zero(models, caplog):
    long_prompt = "a dog " + "and a very long description of the scenery " * 12 + "with a cat"
    prompts = ["a dog on a beach", long_prompt]
    classes = [("dog", "cat"), ("dog", "cat")]
    with caplog.at_level(logging.WARNING):
        capture, _ = capture_run(models, prompts=prompts, negatives=["a beach", "scenery"], classes=classes)
    assert capture.missing_classes() == [["cat"], ["cat"]]
    assert "cat" in caplog.text
    maps = capture.maps()
    assert torch.equal(maps[:, :, 1], torch.zeros(2, 2, 8, 8))
    assert (maps[:, :, 0] > 0).all()


def test_token_positions_cover_all_forms_and_occurrences(models):
    capture = AttentionCapture(models.unet, models.tokenizer)
    tok = models.tokenizer
    prompts = ["two people near traffic lights", "a person, a traffic-light and another traffic light",
               "a dog and two dogs"]
    capture.set_prompts(prompts, [("person", "traffic light"), ("person", "traffic light"), ("dogs", "cat")])
    pos = capture.token_positions
    people = token_position(tok, prompts[0], "people")
    traffic, lights = token_position(tok, prompts[0], "traffic"), token_position(tok, prompts[0], "lights")
    assert pos[0] == [people, traffic + lights]
    traffic1 = token_position(tok, prompts[1], "traffic")
    light1 = token_position(tok, prompts[1], "light")
    assert len(traffic1) == 2 and len(light1) == 2
    assert pos[1][0] == token_position(tok, prompts[1], "person")
    assert pos[1][1] == sorted(traffic1 + light1)
    # A plural class name finds the singular too.
    assert pos[2][0] == sorted(token_position(tok, prompts[2], "dog") + token_position(tok, prompts[2], "dogs"))
    assert capture.missing_classes() == [[], [], ["cat"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sampler forces the interpreted kernel; on a GPU "
                    "machine the kernel is compiled and tests/test_attention_capture_kernel.py covers it there")
def test_triton_path_equals_reference_path(models):
    # One step keeps the interpreted kernel quick; every default layer is still read.
    reference, _ = capture_run(models, use_triton=False, steps=(0.75, 1.0))
    triton_run, _ = capture_run(models, use_triton=True, steps=(0.75, 1.0))
    torch.testing.assert_close(triton_run.maps(), reference.maps(), atol=2e-6, rtol=1e-5)


def test_step_ranges_split_the_average(models, default_capture):
    # 4 steps: the halves hold two steps each, so the full average is their mean.
    full = default_capture
    early, _ = capture_run(models, steps=(0.0, 0.5))
    late, _ = capture_run(models, steps=(0.5, 1.0))
    assert not torch.allclose(early.maps(), late.maps())
    torch.testing.assert_close(full.maps(), (early.maps() + late.maps()) / 2, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("layer", [MID, OUTER])
def test_single_layer_maps_equal_a_direct_softmax(models, layer):
    # Record what the layer is given, then recompute its attention from scratch.
    attn = dict(models.unet.named_modules())[layer]
    inputs = []
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        capture, _ = capture_run(models, layer_names=[layer], steps=(0.5, 1.0))
    finally:
        handle.remove()
    assert len(inputs) == STEPS
    tok = models.tokenizer
    columns = [[token_position(tok, PROMPTS[0], "dog"), []],
               [token_position(tok, PROMPTS[1], "people"),
                token_position(tok, PROMPTS[1], "traffic") + token_position(tok, PROMPTS[1], "lights")]]
    b, heads = len(PROMPTS), attn.heads
    want = torch.zeros(b, 2, 2, 4 if layer == MID else 8, 4 if layer == MID else 8)
    for hidden, context in inputs[2:]:  # steps 2 and 3 of 4
        q = attn.to_q(hidden)  # rows: uncond x 2B, positives, negatives
        k = attn.to_k(context)
        d = q.shape[-1] // heads
        q = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
        k = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
        for i in range(b):
            keys = k[2 * b + i]  # the positive prompt's keys, for both images
            for image, row in enumerate((2 * b + i, 3 * b + i)):
                probs = torch.softmax(q[row] @ keys.transpose(-1, -2) / d**0.5, dim=-1).mean(0)  # [N, 77]
                side = int(probs.shape[0] ** 0.5)
                for c, cols in enumerate(columns[i]):
                    want[i, image, c] += probs[:, cols].sum(-1).view(side, side)
    want /= 2
    if layer == MID:
        want = F.interpolate(want.view(b * 4, 1, 4, 4), size=(8, 8), mode="bilinear",
                             align_corners=False).view(b, 2, 2, 8, 8)
    torch.testing.assert_close(capture.maps(), want, atol=1e-6, rtol=1e-5)


# --- layer choice and arguments ------------------------------------------------------------

def test_layers_are_derived_from_the_unet(models):
    tiny = cross_attention_layers(models.unet)
    assert sorted(tiny.values()) == [1, 1, 1, 2, 2, 2, 2]
    assert tiny[MID] == 2 and tiny[OUTER] == 1
    # The tiny model has no factor-4 layers: the default keeps what it has of (2, 4).
    assert set(AttentionCapture(models.unet, models.tokenizer).layers.values()) == {2}

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd = UNet2DConditionModel.from_config(SD15_UNET)
    factors = cross_attention_layers(sd)
    by_block = {name.split(".attentions")[0]: f for name, f in factors.items()}
    assert by_block == {"down_blocks.0": 1, "down_blocks.1": 2, "down_blocks.2": 4, "mid_block": 8,
                        "up_blocks.1": 4, "up_blocks.2": 2, "up_blocks.3": 1}
    # SD at 64x64 latents: the 32x32 and 16x16 layers.
    chosen = AttentionCapture(sd, models.tokenizer).layers
    assert len(chosen) == 10 and set(chosen.values()) == {2, 4}


def test_invalid_arguments(models):
    with pytest.raises(ValueError):
        AttentionCapture(models.unet, models.tokenizer, steps=(0.5, 0.5))
    with pytest.raises(ValueError):
        AttentionCapture(models.unet, models.tokenizer, factors=[8])
    with pytest.raises(ValueError):
        AttentionCapture(models.unet, models.tokenizer, layer_names=["mid_block.attentions.0"])
    capture = AttentionCapture(models.unet, models.tokenizer)
    with pytest.raises(ValueError):
        capture.set_prompts(["a dog"], [])
    capture.set_prompts(["a dog"], [("dog",)])
    with capture.installed():
        with pytest.raises(RuntimeError):
            with AttentionCapture(models.unet, models.tokenizer).installed():
                pass
        with pytest.raises(ValueError):  # two pairs sampled, one set
            make_sampler(models)(PROMPTS, NEGATIVES, SEEDS, hook=capture)


# --- what is computed ---------------------------------------------------------------------


def test_reading_positives_only_gives_the_same_positive_maps_and_masks(models, default_capture):
    """read_negatives=False computes half the rows; the positives' maps, and the masks made of
    them, are those of the capture that reads both, and the negatives' maps stay zero."""
    from magicseg_engine.kernels.mask_extract import extract_masks
    from magicseg_engine.masks.annotate import class_validity

    positives_only, _ = capture_run(models, read_negatives=False)
    full, half = default_capture.maps(), positives_only.maps()
    torch.testing.assert_close(half[:, 0], full[:, 0], atol=1e-7, rtol=1e-6)
    assert (half[:, 1] == 0).all() and full[:, 1].abs().sum() > 0
    valid = class_validity(full, CLASSES)
    want = extract_masks(full[:, 0], valid, (SIZE, SIZE)).class_masks
    got = extract_masks(half[:, 0], valid, (SIZE, SIZE)).class_masks
    assert want.any() and torch.equal(got, want)


def test_maps_equal_every_layers_full_probabilities(models, default_capture):
    """Capture that reads only the class columns (a log-sum-exp for the normaliser, the
    step's layers computed together) against capture of everything: every captured layer's
    full softmax over the 77 keys for every row, stored by plain processors, then the class
    columns picked and averaged."""
    modules = dict(models.unet.named_modules())
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    class Everything:
        def __init__(self, original, factor):
            self.original, self.factor = original, factor

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            q = attn.to_q(hidden_states)
            k = attn.to_k(encoder_hidden_states)
            heads, d = attn.heads, q.shape[-1] // attn.heads
            q = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
            k = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
            b = len(PROMPTS)
            keys = torch.cat([k[2 * b: 3 * b], k[2 * b: 3 * b]])  # the positive prompts' keys for both images
            probs = torch.softmax(q[2 * b:] @ keys.transpose(-1, -2) / d**0.5, dim=-1).mean(1)  # [2B, N, 77]
            seen.append((self.factor, probs, None))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    originals = {n: modules[n].processor for n in default_capture.layers}
    try:
        for n, f in default_capture.layers.items():
            modules[n].set_processor(Everything(originals[n], f))
        make_sampler(models)(PROMPTS, NEGATIVES, SEEDS)
    finally:
        for n, p in originals.items():
            modules[n].set_processor(p)
    index = default_capture._token_index.long()
    b, c = index.shape[:2]
    want = torch.zeros(2 * b, c, SIZE // 8, SIZE // 8)
    for factor, probs, _ in seen:
        side = int(probs.shape[1] ** 0.5)
        for row in range(2 * b):
            for cls in range(c):
                cols = [p for p in index[row % b, cls].tolist() if p >= 0]
                grid = probs[row][:, cols].sum(-1).view(1, 1, side, side)
                want[row, cls] += F.interpolate(grid, size=(SIZE // 8, SIZE // 8), mode="bilinear",
                                                align_corners=False)[0, 0]
    want /= len(seen)
    torch.testing.assert_close(default_capture.maps(), want.view(2, b, c, SIZE // 8, SIZE // 8).transpose(0, 1),
                               atol=1e-6, rtol=1e-5)


def test_processors_are_the_same_objects_every_batch(models):
    """A compiled UNet guards on its processors: new ones every batch would recompile it."""
    capture = AttentionCapture(models.unet, models.tokenizer)
    with capture.installed():
        first = processors(models.unet)
    with capture.installed():
        second = processors(models.unet)
    assert all(first[n] is second[n] for n in first)
    assert any(type(p).__name__ == "_CapturingProcessor" for p in first.values())


@pytest.mark.slow
def test_a_compiled_unet_captures_without_recompiling(models):
    """torch.compile with capture: the capture's bookkeeping stays out of the compiled UNet, so
    batches after the first reuse its graphs (no recompiles until the limit and an eager
    fallback) and the maps are the eager ones."""
    import torch._dynamo.utils as dynamo_utils

    from magicseg_engine.engine.backends import torch_runners

    torch._dynamo.reset()
    unet = torch.compile(models.unet, dynamic=False)
    runners = replace(torch_runners(models), backend="compile",
                      predict_noise=lambda x, t, ctx, added=None: unet(x, t, encoder_hidden_states=ctx,
                                                                        added_cond_kwargs=added).sample)
    compiled = make_sampler(models)
    compiled.runners = runners
    seen = []
    for seeds in ([1, 2], [3, 4], [5, 6]):
        captured, _ = capture_run(models, compiled, seeds=seeds)
        eager, _ = capture_run(models, seeds=seeds)
        torch.testing.assert_close(captured.maps(), eager.maps(), atol=1e-6, rtol=1e-5)
        seen.append(dynamo_utils.counters["stats"]["unique_graphs"])
    # Captured steps and the others are two graphs; the later batches add none.
    assert seen[0] <= 2 and seen[0] == seen[1] == seen[2]
    torch._dynamo.reset()
