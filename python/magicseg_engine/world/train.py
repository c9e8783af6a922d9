"""`train-world`: train the `shapes` VAE, UNet and text encoder from scratch on the CPU.

Four stages, each resumable from the files it leaves in `OUT/.train/`:

1. draw the scenes (a function of the seed: drawn again on resume, never stored);
2. train the VAE on random crops (squared error, the shapes' pixels weighted up, plus a tiny
   KL term), then encode every image once and set the VAE's scaling factor to 1 / std of the
   latents, as Stable Diffusion's was chosen;
3. train the UNet and the text encoder together on the latents: epsilon prediction on
   Stable Diffusion 1.5's noise schedule with min-SNR loss weights, 10% of captions dropped
   to "" so classifier-free guidance works;
4. write OUT as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
   scheduler/) that `--preset sd15 --model OUT` loads, plus `shapes.safetensors`, the compact
   copy the `shapes` preset ships, and `world.json`, the command and settings that made it.

Every batch is drawn from a generator seeded by (seed, stage, step), and checkpoints hold the
optimiser and learning-rate state, so a run interrupted at any step and resumed ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from magicseg_engine.atomic import atomic_output, atomic_write_text
from magicseg_engine.errors import UsageError
from magicseg_engine.train.loop import warmup_cosine
from magicseg_engine.world.model import SHAPES_TEXT_ENCODER, ShapesModels, build_shapes_models, pack
from magicseg_engine.world.shapes import FLOORS, World


class WorldTrainConfig(BaseModel):
    """The training schedule. The defaults are the shipped weights' (about 15 minutes on 2 idle CPU cores)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, lt=2**31)
    samples: int = Field(5000, ge=8)
    vae_steps: int = Field(2000, ge=1)
    vae_batch: int = Field(32, ge=1)
    vae_crop: int = Field(32, ge=8)  # the whole image at the world's 32 pixels
    vae_lr: float = Field(3e-3, gt=0)
    unet_steps: int = Field(4000, ge=1)
    unet_batch: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(50, ge=0)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(100, ge=1)


# progress(stage, done, total, loss): stage is "scenes", "vae", "latents", "unet" or "export".
Progress = Callable[[str, int, int, float | None], None]

STATE_DIR = ".train"


@dataclass
class Scenes:
    images: torch.Tensor  # [N, 3, H, W] float32 in [-1, 1]
    captions: list[str]


def draw_scenes(world: World, count: int, seed: int, progress: Progress | None = None) -> Scenes:
    """`count` captioned scenes of `world`, scene i a function of (seed, i) alone."""
    from magicseg_engine.prompts.records import sample_seed
    from magicseg_engine.world.shapes import draw_scene

    images = np.empty((count, world.size, world.size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        rng = np.random.default_rng(sample_seed(seed, i))
        names, floor_name = world.choose(rng)
        images[i] = draw_scene(rng, names, world.size, floor_name)[0]
        captions.append(world.training_caption(rng, names, floor_name))
        if progress and (i + 1) % 500 == 0:
            progress("scenes", i + 1, count, None)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return Scenes(pixels, captions)


def world_token_ids(world: World) -> list[int]:
    """The CLIP token ids the world's captions can use, plus start, end and padding."""
    from magicseg_engine.generate.tokenizer import ClipTokenizer, clip_token_id

    tok = ClipTokenizer(SHAPES_TEXT_ENCODER["max_position_embeddings"], clip_token_id("<|endoftext|>"))
    words = {"a", "and", "on", "nothing"}
    for name in world.classes:
        words.update(name.split())
    for f in FLOORS:
        words.update(f.split())
    ids = {tok.sot_id, tok.eot_id, tok.pad_id}
    for w in words:
        ids.update(tok.encode(w))
    return sorted(ids)


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator of one step's batch: a function of (seed, stage, step), so resuming redraws it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 100_003 + step) % 2**63)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """A training checkpoint, written whole or not at all."""
    with atomic_output(path, "wb") as f:
        torch.save(state, f)


def load_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint `save_state` wrote at `path`, None if there is none; UsageError if damaged."""
    from magicseg_engine.safe_files import load_torch_file, why_unreadable

    if not path.is_file():
        return None
    # Weights only: the states hold tensors and plain values, and a file put in their place
    # could otherwise run code as it is unpickled.
    try:
        state = load_torch_file(path)
    except Exception as err:
        raise UsageError(f"the checkpoint {path} cannot be read ({why_unreadable(err)}); "
                         "start again with --overwrite") from None
    if not isinstance(state, dict):
        raise UsageError(f"the checkpoint {path} holds a {type(state).__name__}, not a training state; "
                         "start again with --overwrite")
    return state


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, clip: list[torch.nn.Parameter] | None = None) -> float:
    """Backward, optional gradient clipping to norm 1, one optimiser and schedule step; the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def _pixel_weights(images: torch.Tensor) -> torch.Tensor:
    """4 on the shapes' saturated pixels, 1 on the grey floors: the shapes are what the world is
    about and a small part of each image, and an unweighted loss learns grey shapes first."""
    saturation = images.amax(1, keepdim=True) - images.amin(1, keepdim=True)
    return 1.0 + 3.0 * (saturation > 0.6).float()


def _train_vae(vae: torch.nn.Module, scenes: Scenes, cfg: WorldTrainConfig, state_dir: Path,
               progress: Progress | None) -> float:
    path = state_dir / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(cfg.warmup, cfg.vae_steps // 4), cfg.vae_steps, 0.0))
    start, loss_value = 0, float("nan")
    saved = load_state(path)
    if saved is not None:
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start, loss_value = saved["step"], saved["loss"]
    vae.train()
    n, size = scenes.images.shape[0], scenes.images.shape[-1]
    crop = min(cfg.vae_crop, size)
    for step in range(start, cfg.vae_steps):
        g = step_generator(cfg.seed, 1, step)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=g)
        y, x = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=g))
        batch = scenes.images[idx, :, y:y + crop, x:x + crop].to(vae.device)
        posterior = vae.encode(batch).latent_dist
        # The posterior mean is decoded, not a sample: a few hundred steps are too few for the
        # encoder to shrink the posterior's unit variance, and sampled latents would drown the
        # image. The KL term only keeps the latents near unit scale.
        recon = vae.decode(posterior.mean).sample
        loss = (_pixel_weights(batch) * (recon - batch) ** 2).mean() + 1e-6 * posterior.kl().mean()
        loss_value = optimiser_step(loss, opt, sched)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
            save_state(path, {"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                              "step": done, "loss": loss_value})
        if progress:
            progress("vae", done, cfg.vae_steps, loss_value)
    vae.eval()
    return loss_value


@torch.no_grad()
def _encode(vae: torch.nn.Module, scenes: Scenes, state_dir: Path, progress: Progress | None) -> torch.Tensor:
    """The posterior means of every scene: what the VAE was trained to decode."""
    path = state_dir / "latents.pt"
    saved = load_state(path)
    if saved is not None:
        return saved["mean"]
    means = []
    n = scenes.images.shape[0]
    for lo in range(0, n, 256):
        means.append(vae.encode(scenes.images[lo:lo + 256].to(vae.device)).latent_dist.mean.cpu())
        if progress:
            progress("latents", min(n, lo + 256), n, None)
    mean = torch.cat(means)
    save_state(path, {"mean": mean})
    return mean


def _train_unet(models: ShapesModels, mean: torch.Tensor, token_ids: torch.Tensor,
                empty_ids: torch.Tensor, cfg: WorldTrainConfig, state_dir: Path,
                progress: Progress | None) -> float:
    from diffusers import DDPMScheduler

    from magicseg_engine.generate.models import SD15_SCHEDULER

    path = state_dir / "unet.pt"
    noise_schedule = DDPMScheduler.from_config(SD15_SCHEDULER)
    params = list(models.unet.parameters()) + list(models.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.unet_steps, 0.0))
    start, loss_value = 0, float("nan")
    saved = load_state(path)
    if saved is not None:
        models.unet.load_state_dict(saved["unet"])
        models.text_encoder.load_state_dict(saved["text_encoder"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start, loss_value = saved["step"], saved["loss"]
    models.unet.train()
    models.text_encoder.train()
    scale = float(models.vae.config.scaling_factor)
    # Min-SNR-5 loss weights (Hang et al., 2023): the nearly clean timesteps, easy and many,
    # stop drowning out the noisy ones where the layout of a scene is decided.
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    snr_weight = snr.clamp(max=5.0) / snr
    n = mean.shape[0]
    # Every random draw is made on the CPU from the step's generator, then moved: the batches
    # are the same on any device, and a run may resume on another one.
    device = models.unet.device
    for step in range(start, cfg.unet_steps):
        g = step_generator(cfg.seed, 2, step)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        latents = mean[idx] * scale
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], token_ids[idx])
        weight = snr_weight[t].to(device)
        noisy = noise_schedule.add_noise(latents, noise, t).to(device)
        noise, t, ids = noise.to(device), t.to(device), ids.to(device)
        context = models.text_encoder(ids)[0]
        pred = models.unet(noisy, t, encoder_hidden_states=context).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3)).mul(weight).mean()
        loss_value = optimiser_step(loss, opt, sched, clip=params)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            save_state(path, {"unet": models.unet.state_dict(), "text_encoder": models.text_encoder.state_dict(),
                              "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done, "loss": loss_value})
        if progress:
            progress("unet", done, cfg.unet_steps, loss_value)
    models.unet.eval()
    models.text_encoder.eval()
    return loss_value


def _write_tokenizer(folder: Path, context_length: int) -> None:
    """tokenizer/ as transformers' CLIPTokenizer reads it, from open_clip's BPE file."""
    import gzip

    from open_clip.tokenizer import default_bpe

    from magicseg_engine.generate.tokenizer import clip_vocabulary

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(), ensure_ascii=False), encoding="utf-8")
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # open_clip reads the same slice: the header line, then 48 894 merges.
    merges = lines[1:49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
         "do_lower_case": True}, indent=1), encoding="utf-8")


def _export(models: ShapesModels, out: Path, token_ids: list[int], info: dict[str, Any]) -> str:
    import diffusers

    from magicseg_engine.generate.models import SD15_SCHEDULER

    models.unet.save_pretrained(out / "unet", safe_serialization=True)
    models.vae.save_pretrained(out / "vae", safe_serialization=True)
    models.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    _write_tokenizer(out / "tokenizer", SHAPES_TEXT_ENCODER["max_position_embeddings"])
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "_diffusers_version": diffusers.__version__, **SD15_SCHEDULER},
        indent=1), encoding="utf-8")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=1), encoding="utf-8")
    digest = pack(models, token_ids, out / "shapes.safetensors", info)
    atomic_write_text(out / "world.json", json.dumps({**info, "shapes_safetensors_sha256_16": digest},
                                                     indent=1, sort_keys=True) + "\n")
    return digest


def check_out(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """UsageError unless `out` may take a training run with `settings`: new or empty, emptied by
    `overwrite`, or resumed with the settings saved in its state folder."""
    import shutil

    saved = out / STATE_DIR / "settings.json"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder")
    busy = out.is_dir() and any(out.iterdir())
    if overwrite and busy:
        shutil.rmtree(out)
        busy = False
    if busy and not resume:
        raise UsageError(f"{out} is not empty; pass --resume to continue its training or --overwrite to start again")
    if busy and resume:
        if not saved.is_file():
            raise UsageError(f"{out} holds no training state to resume; pass --overwrite or another --out")
        before = json.loads(saved.read_text(encoding="utf-8"))
        if before != settings:
            diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise UsageError(f"{out} was trained with other settings ({', '.join(diff)}); resume with the same "
                             "flags, or pass --overwrite")


def train_world(out: Path, cfg: WorldTrainConfig, world: World, *, resume: bool = False, overwrite: bool = False,
                progress: Progress | None = None, command: str = "", device: str = "cpu") -> dict[str, Any]:
    """Train the three models of `world` under `cfg` into the diffusers folder `out`; return a summary.

    `device` is where the models train; batches are drawn on the CPU either way, so a GPU runs
    the same schedule (to float rounding), only faster, and longer schedules become practical.
    """
    world.check()
    settings = {"train": cfg.model_dump(), "world": {
        "classes": list(world.classes), "floors": list(world.floors), "size": world.size,
        "max_classes": world.max_classes, "empty_fraction": world.empty_fraction}}
    check_out(out, settings, resume, overwrite)
    if (out / "world.json").is_file():
        return json.loads((out / "world.json").read_text(encoding="utf-8"))
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_dir / "settings.json", json.dumps(settings, sort_keys=True))

    t0 = time.perf_counter()
    scenes = draw_scenes(world, cfg.samples, cfg.seed, progress)
    models = build_shapes_models(cfg.seed)
    for module in (models.vae, models.unet, models.text_encoder):
        module.to(device)
    vae_loss = _train_vae(models.vae, scenes, cfg, state_dir, progress)
    mean = _encode(models.vae, scenes, state_dir, progress)
    models.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))

    from magicseg_engine.generate.tokenizer import ClipTokenizer

    tok = ClipTokenizer(SHAPES_TEXT_ENCODER["max_position_embeddings"], SHAPES_TEXT_ENCODER["pad_token_id"])
    token_ids = tok(scenes.captions)
    empty_ids = tok([""])[0]
    unet_loss = _train_unet(models, mean, token_ids, empty_ids, cfg, state_dir, progress)
    if progress:
        progress("export", 0, 1, None)
    for module in (models.vae, models.unet, models.text_encoder):
        module.to("cpu")
    info = {"command": command, "seed": cfg.seed, "train": cfg.model_dump(), "world": settings["world"],
            "vae_scaling_factor": float(models.vae.config.scaling_factor),
            "final_loss": {"vae_mse": vae_loss, "unet_mse": unet_loss},
            "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "device": str(device)}
    _export(models, out, world_token_ids(world), info)
    if progress:
        progress("export", 1, 1, None)
    return json.loads((out / "world.json").read_text(encoding="utf-8"))
