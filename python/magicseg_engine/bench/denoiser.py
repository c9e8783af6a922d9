"""What a model's denoiser knows about each class, read from its loss rather than from its samples.

Noise a true image of the shapes world, and the UNet predicts that noise better under the
caption that describes the image than under one that names another shape: ranking the
candidate captions by prediction error is a classifier (Li et al., 2023, "Your diffusion model
is secretly a zero-shot classifier"). Only the shape word (or only the colour word) changes
between candidates, so the ranking says whether the model tells that word's shapes apart.

It answers sooner than prompt adherence does: a model drawing blobs may already rank the
right shape first well above chance, so a short `train-world --unet-steps N` run can be judged
without waiting for its samples to look right.
"""

from __future__ import annotations

import numpy as np
import torch

from magicseg_engine.generate.models import DiffusionModels
from magicseg_engine.world.shapes import WORLD_COLOURS, WORLD_SHAPES, World, caption, draw_scene, split_class

# Mid-range noise levels: nearly clean images rank every caption alike (the image says it all),
# and nearly pure noise leaves nothing to rank.
RANKING_TIMESTEPS = (150, 300, 450, 600)


@torch.no_grad()
def denoiser_ranking(models: DiffusionModels, images: int = 72, seed: int = 0, draws: int = 2,
                     timesteps: tuple[int, ...] = RANKING_TIMESTEPS, world: World | None = None) -> dict:
    """How often the denoiser ranks the true shape (and the true colour) first among the world's.

    `images` one-shape scenes cycle through the world's classes and floors; each is noised at
    every timestep `draws` times, the same noise for every candidate caption, and the errors
    summed. Returns the two accuracies, their chance level and the shape accuracy per shape.
    """
    from diffusers import DDPMScheduler

    world = world or World()
    classes, floors = list(world.classes), list(world.floors)
    names = [classes[i % len(classes)] for i in range(images)]
    floor_names = [floors[(i // len(classes)) % len(floors)] for i in range(images)]
    rng = np.random.default_rng(seed)
    pixels = np.stack([draw_scene(rng, [n], world.size, f)[0] for n, f in zip(names, floor_names)])

    device, dtype = models.device, models.dtype
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device, dtype) / 127.5 - 1.0
    latents = models.vae.encode(x).latent_dist.mean * float(models.vae.config.scaling_factor)
    schedule = DDPMScheduler.from_config(models.scheduler_config)
    v_prediction = schedule.config.prediction_type == "v_prediction"

    shapes = sorted({split_class(c)[0] for c in classes}, key=WORLD_SHAPES.index)
    colours = sorted({split_class(c)[1] for c in classes}, key=WORLD_COLOURS.index)
    truth = [split_class(n) for n in names]

    def errors(candidates: list[list[str]]) -> torch.Tensor:
        """[images, candidates] summed squared error of the denoiser under each caption."""
        contexts = [models.text_encoder(models.tokenizer(caps).to(device))[0] for caps in candidates]
        total = torch.zeros(images, len(candidates), dtype=torch.float64)
        for ti, t in enumerate(timesteps):
            steps = torch.full((images,), t, dtype=torch.long, device=device)
            for k in range(draws):
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed * 1000 + ti * 10 + k))
                noise = noise.to(device, dtype)
                noisy = schedule.add_noise(latents, noise, steps)
                target = schedule.get_velocity(latents, noise, steps) if v_prediction else noise
                for j, context in enumerate(contexts):
                    pred = models.unet(noisy, steps, encoder_hidden_states=context).sample
                    total[:, j] += (pred.float() - target.float()).pow(2).mean((1, 2, 3)).double().cpu()
        return total

    by_shape = errors([[caption([f"{colour} {s}"], f) for (_, colour), f in zip(truth, floor_names)] for s in shapes])
    by_colour = errors([[caption([f"{c} {shape}"], f) for (shape, _), f in zip(truth, floor_names)] for c in colours])
    shape_hit = by_shape.argmin(1).numpy() == np.array([shapes.index(s) for s, _ in truth])
    colour_hit = by_colour.argmin(1).numpy() == np.array([colours.index(c) for _, c in truth])
    return {
        "images": images, "timesteps": list(timesteps), "draws": draws,
        "shape_first": float(shape_hit.mean()), "colour_first": float(colour_hit.mean()),
        "chance": {"shape": 1.0 / len(shapes), "colour": 1.0 / len(colours)},
        "shape_first_per_shape": {s: float(shape_hit[[t[0] == s for t in truth]].mean()) for s in shapes},
    }
