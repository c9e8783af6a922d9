"""Paired counterfactual sampling: positives and their negatives in one UNet batch, same noise.

For a batch of B pairs the UNet sees 4B rows per step when guidance is on:

    rows [0, 2B)    unconditional   (positives' latents, then negatives' latents)
    rows [2B, 3B)   positive prompts
    rows [3B, 4B)   negative prompts

Each pair draws its initial noise from its own seed, on the CPU, so a sample is reproducible
alone and on any device; its negative starts from the same noise (unless asked otherwise), so
the two images differ where the prompts differ and little elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from magicseg_engine.engine.backends import DiffusionRunners, torch_runners
from magicseg_engine.generate.fast import make_feature_cache
from magicseg_engine.generate.models import DiffusionModels, check_image_size, make_scheduler


@dataclass(frozen=True)
class UNetBatchLayout:
    """Which rows of the UNet batch hold what, and the latents' size; handed to step hooks such
    as attention capture. Positive rows are always directly followed by the negative rows."""

    pairs: int
    guided: bool
    latent_hw: tuple[int, int] | None = None

    @property
    def positive_rows(self) -> slice:
        start = 2 * self.pairs if self.guided else 0
        return slice(start, start + self.pairs)

    @property
    def negative_rows(self) -> slice:
        start = 3 * self.pairs if self.guided else self.pairs
        return slice(start, start + self.pairs)


class StepHook(Protocol):
    """Told where the sampler is, so it can record what the UNet's processors see."""

    def start(self, layout: UNetBatchLayout, num_steps: int) -> None: ...
    def before_step(self, index: int, timestep: torch.Tensor) -> None: ...
    def finish(self) -> None: ...


@dataclass
class PairBatch:
    positives: np.ndarray  # [B, H, W, 3] uint8
    negatives: np.ndarray  # [B, H, W, 3] uint8
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SamplingSettings:
    height: int
    width: int
    steps: int
    guidance: float
    scheduler: str
    independent_noise: bool = False
    vae_batch_size: int = 8
    # generate.fast.FAST_LEVELS: 0 runs the whole UNet every step; higher levels reuse its deep
    # features between full steps (torch backend only).
    fast: int = 0


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], independent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative starting latents, float32 on the CPU, one generator per sample.

    With `independent` the negative takes the next draw of the same generator, which is how
    the reference (two unrelated runs) behaves while staying reproducible per sample.
    """
    pos, neg = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        first = torch.randn(shape, generator=gen)
        pos.append(first)
        neg.append(torch.randn(shape, generator=gen) if independent else first)
    return torch.stack(pos), torch.stack(neg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], NCHW → NHWC uint8, rounded like diffusers' image processor."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


class PairedSampler:
    def __init__(self, models: DiffusionModels, settings: SamplingSettings, device: torch.device, dtype: torch.dtype,
                 runners: DiffusionRunners | None = None):
        check_image_size(models, settings.height, settings.width)
        self.models = models
        self.runners = runners or torch_runners(models)
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.latent_shape = (
            models.latent_channels,
            settings.height // models.vae_scale_factor,
            settings.width // models.vae_scale_factor,
        )
        self._uncond: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # None at level 0; refuses unknown levels and backends that do not run the UNet in torch.
        self.feature_cache = make_feature_cache(models.unet, settings.fast, self.runners)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled or None) of `texts`, in the sampler's dtype."""
        ids = self.models.tokenize(list(texts)).to(self.device)
        context, pooled = self.runners.encode_text(ids)
        return context.to(self.dtype), None if pooled is None else pooled.to(self.dtype)

    def unconditional(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The empty prompt's embedding never changes: encode it once per sampler. SDXL's
        # pipelines guide against zeros instead, where the model's folder says so.
        if self._uncond is None:
            context, pooled = self.encode_text([""])
            if self.models.zero_unconditional:
                context = torch.zeros_like(context)
                pooled = None if pooled is None else torch.zeros_like(pooled)
            self._uncond = (context, pooled)
        return self._uncond

    def added_conditions(self, pooled: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """The UNet's added conditions for rows with these pooled embeddings (SDXL), else None."""
        if not self.models.added_conditions:
            return None
        if pooled is None:
            raise ValueError("this UNet takes a pooled text embedding, which its text encoder did not give")
        s = self.settings
        time_ids = self.models.time_ids(s.height, s.width).to(self.device, self.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}

    @torch.inference_mode()
    def denoise(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int],
                hook: StepHook | None = None) -> torch.Tensor:
        """Final latents of shape [2B, C, h, w]: B positives, then their B negatives."""
        s = self.settings
        pairs = len(prompts)
        guided = s.guidance > 1.0
        cond, pooled = self.encode_text(list(prompts) + list(negatives))
        if guided:
            uncond, uncond_pooled = self.unconditional()
            context = torch.cat([uncond.expand(2 * pairs, -1, -1), cond])
            if pooled is not None:
                pooled = torch.cat([uncond_pooled.expand(2 * pairs, -1), pooled])
        else:
            context = cond
        added = self.added_conditions(pooled)

        pos_noise, neg_noise = initial_noise(seeds, self.latent_shape, s.independent_noise)
        scheduler = make_scheduler(s.scheduler, self.models.scheduler_config)
        scheduler.set_timesteps(s.steps, device=self.device)
        latents = torch.cat([pos_noise, neg_noise]).to(self.device, self.dtype) * scheduler.init_noise_sigma

        if hook is not None:
            hook.start(UNetBatchLayout(pairs=pairs, guided=guided, latent_hw=tuple(self.latent_shape[1:])),
                       len(scheduler.timesteps))
        cache = self.feature_cache
        if cache is not None:
            cache.reset()  # the deep features of another batch are no use to this one
        for i, t in enumerate(scheduler.timesteps):
            if hook is not None:
                hook.before_step(i, t)
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            if cache is None:
                eps = self.runners.predict_noise(model_in, t, context, added)
            else:
                eps = cache.predict(model_in, t, context, added, step_index=i)
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + s.guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        if hook is not None:
            hook.finish()
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        chunks = [self.runners.decode(part) for part in latents.split(self.settings.vae_batch_size)]
        return to_uint8_images(torch.cat(chunks))

    def __call__(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int],
                 hook: StepHook | None = None) -> PairBatch:
        if not (len(prompts) == len(negatives) == len(seeds)) or not prompts:
            raise ValueError("prompts, negatives and seeds must be non-empty and of equal length")
        t0 = time.perf_counter()
        latents = self.denoise(prompts, negatives, seeds, hook)
        _sync(self.device)
        t1 = time.perf_counter()
        images = self.decode(latents)
        t2 = time.perf_counter()
        b = len(prompts)
        return PairBatch(images[:b], images[b:], {"denoise_s": t1 - t0, "decode_s": t2 - t1})
