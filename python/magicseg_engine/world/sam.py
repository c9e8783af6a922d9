"""`train-world-sam`: the tiny SAM trained on the shapes world.

With random weights, the attention + SAM route measures nothing but noise. Trained here on the
world's scenes, SAM plays the part the real one does for Stable Diffusion images: a
class-agnostic segmenter that turns a rough box and a few points into an object's outline.

The model is `masks.sam`'s tiny architecture. Each training object is prompted as the mask stage
would prompt it: its true footprint is pooled to the shapes UNet's latent resolution (where the
cross-attention maps live), noised, and passed through `extract_masks`, the code that turns
attention maps into a box and points. The loss is SAM's own recipe: focal (x20) plus dice on the
best of the three masks it proposes, plus the squared error of its predicted IoUs.

Batches are drawn from generators seeded by (seed, step) and checkpoints hold the optimiser and
schedule, so an interrupted run resumed ends with the weights of one that never stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from magicseg_engine.atomic import atomic_output, atomic_write_text
from magicseg_engine.config import SHIPPED_SAM_FILE as SAM_FILE
from magicseg_engine.world.shapes import World
from magicseg_engine.world.train import STATE_DIR, check_out, load_state, optimiser_step, save_state, step_generator


class SamTrainConfig(BaseModel):
    """The schedule; the defaults are the shipped weights' (a few minutes on 2 CPU cores)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, lt=2**31)
    steps: int = Field(1500, ge=1)
    batch: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(50, ge=0)
    # The shapes UNet's latent side: its attention maps, and so its prompts, are this coarse.
    map_size: int = Field(8, ge=2)
    # Noise on the pooled footprint, relative to its peak: attention maps are not clean.
    map_noise: float = Field(0.3, ge=0)
    checkpoint_every: int = Field(100, ge=1)


# progress(done, total, loss)
Progress = Callable[[int, int, float | None], None]


def draw_batch(world: World, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`count` scenes with at least one shape: images [N,H,W,3] uint8, local label maps [N,H,W]
    (label i is the scene's i-th shape) and each scene's number of shapes."""
    from magicseg_engine.world.shapes import draw_scene

    images, labels, counts = [], [], []
    while len(images) < count:
        names, floor_name = world.choose(rng)
        if not names:
            continue
        image, _, local = draw_scene(rng, names, world.size, floor_name)
        images.append(image)
        labels.append(local)
        counts.append(len(names))
    return np.stack(images), np.stack(labels), counts


def truth_prompts(labels: np.ndarray, counts: list[int], cfg: SamTrainConfig, generator: torch.Generator,
                  num_positive: int, num_negative: int):
    """The prompts the mask stage would derive from attention maps that look like the truth:
    footprints pooled to `map_size`, noised, then `extract_masks`. Returns (prompts, valid [N,C])."""
    from magicseg_engine.kernels.mask_extract import extract_masks

    n, h, w = labels.shape
    c = max(counts)
    truth = torch.from_numpy(labels).long()
    footprints = torch.stack([(truth == i + 1).float() for i in range(c)], dim=1)  # [N, C, H, W]
    maps = F.adaptive_avg_pool2d(footprints, cfg.map_size)
    peak = maps.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    maps = (maps / peak + cfg.map_noise * torch.randn(maps.shape, generator=generator)).clamp(min=0)
    valid = torch.tensor([[i < k for i in range(c)] for k in counts])
    extracted = extract_masks(maps, valid, (h, w), "otsu", num_positive, num_negative, use_triton=False)
    return extracted.prompts, valid


def sam_loss(low_res: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's loss for one object: low_res [M,H,W] mask logits, iou_pred [M], target [H,W] in {0,1}.

    20 x focal + dice of the best of the M masks (only it learns the object, so the others stay
    free to propose other readings of an ambiguous prompt), and the squared error of every
    predicted IoU against the mask's true IoU."""
    from torchvision.ops import sigmoid_focal_loss

    m = low_res.shape[0]
    t = target.expand(m, -1, -1)
    focal = sigmoid_focal_loss(low_res, t, reduction="none").mean(dim=(1, 2))
    p = low_res.sigmoid()
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    per_mask = 20 * focal + dice
    hard = low_res > 0
    inter = (hard & (t > 0.5)).sum((1, 2)).float()
    union = (hard | (t > 0.5)).sum((1, 2)).float().clamp(min=1)
    return per_mask.min() + F.mse_loss(iou_pred, inter / union)


def _step_loss(sam, images: np.ndarray, labels: np.ndarray, counts: list[int], prompts, valid) -> torch.Tensor:
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    size = labels.shape[1:]
    resized = np.stack([transform.apply_image(image) for image in images])
    pixels = torch.as_tensor(resized).permute(0, 3, 1, 2)
    input_size = tuple(pixels.shape[-2:])
    embeddings = sam.image_encoder(sam.preprocess(pixels))
    boxes = transform.apply_boxes_torch(prompts.boxes.reshape(-1, 4), size).reshape(prompts.boxes.shape)
    points = transform.apply_coords_torch(prompts.points.reshape(-1, 2), size).reshape(prompts.points.shape)
    # Where the image sits inside the padded input: the same for every image of the batch.
    scaled = transform.get_preprocess_shape(*size, sam.image_encoder.img_size)
    losses = []
    for b, k in enumerate(counts):
        # Objects the noisy map lost entirely get no prompt, as in the mask stage.
        objects = [i for i in range(k) if valid[b, i] and prompts.boxes[b, i, 0] >= 0]
        if not objects:
            continue
        # One call per image for all its objects, as the refiner decodes them.
        sparse, dense = sam.prompt_encoder(points=(points[b, objects], prompts.point_labels[b, objects].int()),
                                           boxes=boxes[b, objects], masks=None)
        low_res, iou = sam.mask_decoder(image_embeddings=embeddings[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True)
        # The truth in the low-resolution masks' frame: the padded input, shrunk by 4.
        up = F.interpolate(torch.from_numpy(labels[b:b + 1]).float()[:, None], size=scaled, mode="nearest")[0, 0]
        full = torch.zeros(len(objects), *input_size)  # zero padding, as `preprocess` pads
        full[:, :scaled[0], :scaled[1]] = torch.stack([(up == i + 1).float() for i in objects])
        target = F.interpolate(full[:, None], size=low_res.shape[-2:], mode="nearest")[:, 0]
        losses += [sam_loss(low_res[j], iou[j], target[j]) for j in range(len(objects))]
    return torch.stack(losses).mean()


def train_world_sam(out: Path, cfg: SamTrainConfig, world: World, *, resume: bool = False, overwrite: bool = False,
                    progress: Progress | None = None, command: str = "") -> dict[str, Any]:
    """Train the tiny SAM on `world` into the folder `out` (`SAM_FILE` and `sam.json`); return the summary."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.masks.sam import build_sam
    from magicseg_engine.train.loop import warmup_cosine

    world.check()
    settings = {"train": cfg.model_dump(), "world": {"classes": list(world.classes), "floors": list(world.floors),
                                                     "size": world.size}}
    check_out(out, settings, resume, overwrite)
    if (out / "sam.json").is_file():
        return json.loads((out / "sam.json").read_text(encoding="utf-8"))
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STATE_DIR / "settings.json", json.dumps(settings, sort_keys=True))
    masks = load_preset("shapes").masks

    sam = build_sam("tiny", seed=cfg.seed)
    sam.requires_grad_(True)
    sam.train()
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, 0.0))
    start, loss_value = 0, float("nan")
    state = out / STATE_DIR / "sam.pt"
    saved = load_state(state)
    if saved is not None:
        sam.load_state_dict(saved["sam"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start, loss_value = saved["step"], saved["loss"]
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        generator = step_generator(cfg.seed, 0, step)
        images, labels, counts = draw_batch(world, cfg.batch, rng)
        prompts, valid = truth_prompts(labels, counts, cfg, generator, masks.positive_points, masks.negative_points)
        loss = _step_loss(sam, images, labels, counts, prompts, valid)
        loss_value = optimiser_step(loss, opt, sched, clip=params)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_state(state, {"sam": sam.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                               "step": done, "loss": loss_value})
        if progress:
            progress(done, cfg.steps, loss_value)
    sam.eval()
    with atomic_output(out / SAM_FILE, "wb") as f:
        # Meta's layout (a bare state dict), in float16: `build_sam("tiny", checkpoint)` reads it.
        torch.save({k: v.detach().half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}, f)
    info = {"command": command, "seed": cfg.seed, "train": cfg.model_dump(), "world": settings["world"],
            "final_loss": loss_value, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    atomic_write_text(out / "sam.json", json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info
