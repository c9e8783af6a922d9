"""Pairs per second of the paired sampler against a reference-style loop, on the same models.

The reference renders one image per call (batch 1, classifier-free guidance), a positive and
then its negative from unrelated noise. The engine renders a batch of pairs per UNet call with
the negative sharing its positive's noise. Both decode with the same VAE and count the same
work (denoising + decoding); writing to disk is left out of both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from magicseg_engine.bench.common import count_flops, dense_peak_tflops, environment, summarise, time_calls
from magicseg_engine.engine.backends import text_conditioning
from magicseg_engine.generate.models import make_scheduler
from magicseg_engine.generate.sampler import PairedSampler, initial_noise, to_uint8_images


@torch.inference_mode()
def reference_image(sampler: PairedSampler, prompt: str, seed: int):
    """One image the way the reference scripts made it: its own noise, batch 1."""
    m, s = sampler.models, sampler.settings
    (uncond, uncond_pooled), (cond, pooled) = sampler.unconditional(), sampler.encode_text([prompt])
    context = torch.cat([uncond, cond])
    added = sampler.added_conditions(None if pooled is None else torch.cat([uncond_pooled, pooled]))
    noise, _ = initial_noise([seed], sampler.latent_shape, independent=False)
    scheduler = make_scheduler(s.scheduler, m.scheduler_config)
    scheduler.set_timesteps(s.steps, device=sampler.device)
    latents = noise.to(sampler.device, sampler.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = m.unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t,
                                      encoder_hidden_states=context, added_cond_kwargs=added).sample.chunk(2)
        latents = scheduler.step(eps_uncond + s.guidance * (eps_cond - eps_uncond), t, latents).prev_sample
    return to_uint8_images(m.vae.decode((latents / m.vae.config.scaling_factor).to(m.vae.dtype)).sample)


def reference_pairs(sampler: PairedSampler, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int]) -> None:
    for prompt, negative, seed in zip(prompts, negatives, seeds):
        reference_image(sampler, prompt, seed)
        reference_image(sampler, negative, seed + 1)  # unrelated noise, as two separate runs had


@torch.inference_mode()
def pair_flops(sampler: PairedSampler) -> dict:
    """FLOPs of one guided pair, counted with torch's flop counter on the real modules."""
    m, s = sampler.models, sampler.settings
    c, h, w = sampler.latent_shape
    latents = torch.zeros(4, c, h, w, device=sampler.device, dtype=sampler.dtype)
    context, added = zero_conditions(sampler, 4)
    ids = m.tokenize(["a photo"]).to(sampler.device)
    t = torch.tensor(500, device=sampler.device)
    counts = {}
    for name, fn in {
        "unet_call_4_rows": lambda: m.unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added),
        "vae_decode_1_image": lambda: m.vae.decode(latents[:1].to(m.vae.dtype)),
        # Both encoders where the family has two (SDXL).
        "text_encoder_1_prompt": lambda: text_conditioning(m.text_encoder, m.text_encoder_2, ids),
    }.items():
        counts[name] = count_flops(fn)
    counts["pair"] = s.steps * counts["unet_call_4_rows"] + 2 * counts["vae_decode_1_image"] + 3 * counts["text_encoder_1_prompt"]
    return counts


@torch.inference_mode()
def unet_step_times(sampler: PairedSampler, rows: int, warmup: int, reps: int) -> list[float]:
    """Seconds per UNet call on `rows` latent rows through the sampler's backend: the cost of one
    denoising step."""
    latents = torch.randn(rows, *sampler.latent_shape, device=sampler.device, dtype=sampler.dtype)
    context, added = zero_conditions(sampler, rows)
    context = torch.randn_like(context)
    t = torch.tensor(500, device=sampler.device)
    return time_calls(lambda: sampler.runners.predict_noise(latents, t, context, added), sampler.device, warmup, reps)


def zero_conditions(sampler: PairedSampler, rows: int) -> tuple[torch.Tensor, dict | None]:
    """A zero context for `rows` UNet rows and, where the UNet takes them (SDXL), its added
    conditions: what a step costs does not depend on the values."""
    m = sampler.models
    context = torch.zeros(rows, m.context_length, m.cross_attention_dim, device=sampler.device, dtype=sampler.dtype)
    pooled = None
    if m.added_conditions:
        pooled = torch.zeros(rows, m.text_encoder_2.config.projection_dim, device=sampler.device, dtype=sampler.dtype)
    return context, sampler.added_conditions(pooled)


def bench_generate(sampler: PairedSampler, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int],
                   batch_size: int, warmup: int = 1, reps: int = 3) -> dict:
    """Engine vs reference pairs/s over the same prompts; returns a JSON-ready dict."""
    device = sampler.device
    n = len(prompts)

    def engine() -> None:
        for i in range(0, n, batch_size):
            sampler(prompts[i:i + batch_size], negatives[i:i + batch_size], seeds[i:i + batch_size])

    engine_times = time_calls(engine, device, warmup, reps)
    reference_times = time_calls(lambda: reference_pairs(sampler, prompts, negatives, seeds), device, warmup, reps)
    flops = pair_flops(sampler)
    engine_pps = n / summarise(engine_times)["median_s"]
    reference_pps = n / summarise(reference_times)["median_s"]
    peak = dense_peak_tflops(device)
    achieved = engine_pps * flops["pair"] / 1e12
    s = sampler.settings
    return {
        "benchmark": "generate",
        **environment(device),
        "settings": {"pairs": n, "batch_size": batch_size, "height": s.height, "width": s.width, "steps": s.steps,
                     "guidance": s.guidance, "scheduler": s.scheduler, "dtype": str(sampler.dtype).removeprefix("torch."),
                     "model": sampler.models.model_id, "warmup": warmup},
        "engine": {**summarise(engine_times), "pairs_per_s": engine_pps,
                   "unet_rows_per_step": 4 * min(batch_size, n),
                   "ms_per_unet_step": 1e3 * summarise(unet_step_times(sampler, 4 * min(batch_size, n), warmup, reps))["median_s"]},
        "reference": {**summarise(reference_times), "pairs_per_s": reference_pps, "unet_rows_per_step": 2,
                      "ms_per_unet_step": 1e3 * summarise(unet_step_times(sampler, 2, warmup, reps))["median_s"]},
        "speedup": engine_pps / reference_pps,
        "flops": flops,
        "engine_tflops_per_s": achieved,
        "dense_peak_tflops": peak,
        "ceiling_pairs_per_s": peak * 1e12 / flops["pair"] if peak else None,
        "fraction_of_ceiling": achieved / peak if peak else None,
    }
