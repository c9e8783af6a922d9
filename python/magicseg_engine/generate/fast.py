"""Fast mode: reuse the UNet's deep features on the steps between full ones.

Between neighbouring denoising steps the coarse features of a UNet barely change while its
outermost blocks, which see the current latent directly, still do. So on a "full" step the whole
UNet runs and the feature map that its deep path hands to the outermost up block(s) is kept; on
the steps after it only the shallow ends run:

    conv_in → time embedding → down_blocks[:k] (for their skip connections)
            → up_blocks[-k:] fed with the kept deep feature → conv_norm_out, conv_act, conv_out

with k = `shallow_blocks` (1: the first down block and the last up block); this is DeepCache's
idea (Ma, Fang and Wang, CVPR 2024), written here against diffusers' blocks. The UNet is not
forked or patched: the cached path calls its own submodules in the order of
`UNet2DConditionModel.forward`, SDXL's added conditions (`text_embeds`, `time_ids`) included,
so attention processors installed on it (attention capture) run there too; a full step is the
UNet's own call, bit for bit.

What it does to attention capture: on a cached step only the shallow blocks' attention layers
run; with one shallow block those are the latent-resolution layers (factor 1; SDXL has none
there). The layers the default capture reads (factors 2 and 4) record nothing on such steps,
and the maps average the full steps only. A capture step range narrower than the cache interval
can therefore fall on cached steps alone, and then it records nothing (the capture warns).

Rows: the cache holds the whole batch the UNet sees (4B rows under guidance: both images'
unconditional rows, positives, negatives), so guidance and the pair layout are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from magicseg_engine.engine.backends import DiffusionRunners


@dataclass(frozen=True)
class CacheSchedule:
    """How often the full UNet runs (every `interval` steps) and how many blocks at each end run
    on the steps between."""

    interval: int
    shallow_blocks: int = 1


# The user-facing levels of fast mode (the sampler's `fast` setting). Level 1 runs the deep
# path every other step, level 2 every third; both cache at the outermost block only, so a
# cached step still sees the current latent through the full-resolution skips. Longer
# intervals and deeper splits (FeatureCache's shallow_blocks) remain open to callers of
# FeatureCache, not levels, since no measurement here backs them.
# What each level buys in pairs/s and how far its images and masks drift from full mode is
# measured by `bench.fast.fast_mode_agreement` (same prompts and seeds, mask IoU and map
# agreement against level 0). On the shapes preset (20 DDIM steps, masks from the factor-1
# layers of the last quarter of the steps, 8 pairs) level 1 kept a mask IoU of 0.95 against
# full mode and level 2 of 0.88: level 1 stays closest to full mode, level 2 trades more for speed.
FAST_LEVELS: dict[int, CacheSchedule | None] = {
    0: None,
    1: CacheSchedule(interval=2),
    2: CacheSchedule(interval=3),
}

# addition_embed_type values the cached path knows how to embed; the others (Kandinsky's image
# conditions, "image_hint" which also changes the input) take inputs the sampler never passes.
_ADDITION_TYPES = (None, "text", "text_time")

FullStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "dict[str, torch.Tensor] | None"], torch.Tensor]


class FeatureCache:
    """Noise predictions that run the whole UNet every `interval` steps and its shallow ends between.

    Usage, once per denoising run::

        cache = FeatureCache(models.unet, interval=2)
        cache.reset()
        for i, t in enumerate(scheduler.timesteps):
            eps = cache.predict(model_in, t, context, added, step_index=i)

    `full_step(sample, t, context, added) -> eps` is how a full step runs the UNet; it must call
    this very module (eagerly, as the torch backend and its attention-kernel hold do). Default:
    `unet(...).sample`.
    """

    def __init__(self, unet: torch.nn.Module, interval: int, shallow_blocks: int = 1,
                 full_step: FullStep | None = None):
        if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
            raise TypeError(f"{type(unet).__name__} has no down_blocks/up_blocks; "
                            "expected a diffusers UNet2DConditionModel")
        if interval < 1:
            raise ValueError(f"the cache interval must be 1 or more steps, got {interval}")
        ups = len(unet.up_blocks)
        # At least one up block must stay deep: its output is what the cache holds.
        if not 1 <= shallow_blocks < ups or shallow_blocks > len(unet.down_blocks):
            raise ValueError(f"shallow_blocks must be from 1 to {min(ups - 1, len(unet.down_blocks))} "
                             f"for this UNet's {len(unet.down_blocks)} down and {ups} up blocks, got {shallow_blocks}")
        config = unet.config
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError("fast mode does not support UNets with class embeddings (they take class_labels)")
        if config.get("addition_embed_type") not in _ADDITION_TYPES:
            raise ValueError(f"fast mode does not support addition_embed_type "
                             f"{config.get('addition_embed_type')!r}; it knows {_ADDITION_TYPES}")
        # The skips the shallow up blocks read are the first entries of forward's skip tuple:
        # conv_in's output and the shallow down blocks' outputs. A UNet whose shallow up blocks
        # read deeper than that cannot be split at this depth.
        needed = sum(len(block.resnets) for block in unet.up_blocks[ups - shallow_blocks:])
        available = 1 + sum(len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
                            for block in unet.down_blocks[:shallow_blocks])
        if needed > available:
            raise ValueError(f"the last {shallow_blocks} up block(s) read {needed} skip connections but the first "
                             f"{shallow_blocks} down block(s) give {available}; use fewer shallow blocks")
        self.unet = unet
        self.interval = int(interval)
        self.shallow_blocks = int(shallow_blocks)
        self._skip_count = needed
        self._full_step = full_step or _unet_call(unet)
        self._deep: torch.Tensor | None = None
        self._shape: torch.Size | None = None
        self.full_steps = 0
        self.cached_steps = 0

    @property
    def deep_block(self) -> torch.nn.Module:
        """The up block whose output the cache holds: the last one that runs only on full steps."""
        return self.unet.up_blocks[len(self.unet.up_blocks) - self.shallow_blocks - 1]

    def reset(self) -> None:
        """Forget the cached features and the step counts; call before each denoising run."""
        self._deep = None
        self._shape = None
        self.full_steps = 0
        self.cached_steps = 0

    def is_full(self, step_index: int) -> bool:
        """Whether step `step_index` runs the whole UNet (always so while nothing is cached)."""
        return self._deep is None or step_index % self.interval == 0

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, step_index: int = 0) -> torch.Tensor:
        """The UNet's noise prediction for `sample` at step `step_index` of the current run."""
        if self.is_full(step_index):
            return self._run_full(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if sample.shape != self._shape:
            raise ValueError(f"the cached deep features are of a batch of shape {tuple(self._shape)}, "
                             f"not {tuple(sample.shape)}: call reset() before denoising another batch")
        self.cached_steps += 1
        return self._run_shallow(sample, timestep, encoder_hidden_states, added_cond_kwargs, self._deep)

    # --- the two paths --------------------------------------------------------------------

    def _run_full(self, sample, timestep, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        handle = self.deep_block.register_forward_hook(lambda module, args, output: kept.append(output))
        try:
            eps = self._full_step(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        finally:
            handle.remove()
        if len(kept) != 1:
            raise RuntimeError("the full step did not run this UNet's up blocks once (an exported or compiled "
                               "UNet?); fast mode needs the torch backend")
        self._deep = kept[0]
        self._shape = sample.shape
        self.full_steps += 1
        return eps

    def _run_shallow(self, sample, timestep, encoder_hidden_states, added_cond_kwargs,
                     deep: torch.Tensor) -> torch.Tensor:
        """UNet2DConditionModel.forward with the deep path replaced by `deep`, op for op otherwise,
        so that fed the deep feature of the same step it returns the full step's output exactly."""
        unet = self.unet
        # As forward: interpolation sizes are passed down only when the latent is not a
        # multiple of the total upsampling factor.
        forward_upsample_size = any(dim % (2 ** unet.num_upsamplers) != 0 for dim in sample.shape[-2:])

        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0

        # Time embedding, with SDXL's (or any text) added conditions.
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)

        sample = unet.conv_in(sample)
        # The shallow down blocks run whole, downsamplers included: their last output feeds only
        # the deep path, but skipping it would mean re-writing the block rather than calling it,
        # and it is one strided convolution.
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks[: self.shallow_blocks]:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res

        remaining = skips[: self._skip_count]
        # forward sets this while running the last deep up block; the shallow ones start from it.
        upsample_size = remaining[-1].shape[2:] if forward_upsample_size else None
        sample = deep
        ups = len(unet.up_blocks)
        for i in range(ups - self.shallow_blocks, ups):
            block = unet.up_blocks[i]
            res = remaining[-len(block.resnets):]
            remaining = remaining[: -len(block.resnets)]
            if i != ups - 1 and forward_upsample_size:
                upsample_size = remaining[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                               upsample_size=upsample_size, attention_mask=None, encoder_attention_mask=None)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               upsample_size=upsample_size)

        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        return unet.conv_out(sample)


def _unet_call(unet: torch.nn.Module) -> FullStep:
    def full_step(sample, timestep, context, added):
        return unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample

    return full_step


def make_feature_cache(unet: torch.nn.Module, level: int,
                       runners: DiffusionRunners | None = None) -> FeatureCache | None:
    """The cache of fast mode `level` (None for 0: the full UNet every step).

    With `runners`, full steps go through their `predict_noise`, so whatever they wrap around
    the UNet call (an attention-kernel hold) stays there; cached steps call the UNet's blocks
    themselves, outside such wrappers, which is why the runners must be the torch backend's.
    """
    if level not in FAST_LEVELS:
        raise ValueError(f"unknown fast level {level}; choose one of {sorted(FAST_LEVELS)} (0 is off)")
    schedule = FAST_LEVELS[level]
    if schedule is None:
        return None
    full_step = None
    if runners is not None:
        if runners.backend != "torch":
            raise ValueError(f"fast mode runs the UNet's own blocks in eager torch, which --backend "
                             f"{runners.backend} does not; use --backend torch or fast level 0")
        full_step = runners.predict_noise
    return FeatureCache(unet, schedule.interval, schedule.shallow_blocks, full_step=full_step)
