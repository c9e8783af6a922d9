"""The pretraining loop: configuration, optimiser and schedule, atomic checkpoints, exact resume, DDP.

One optimiser step is `grad_accum` batches of `batch_size` images per rank, each weighted by its
share of the step's loss pixels and images, so that the step's gradient is that of one batch of
`grad_accum * batch_size` images (with dropout off; ranks are then averaged). Every random draw
of a step (decoder dropout, candidate classes) comes from generators seeded by (seed, step,
micro-batch, rank), and the loader's crops from (seed, epoch, sample); so the only state a
resume needs is the model, the optimiser, the schedule's step and the loader's position, all of
which a checkpoint holds. A run killed at any point and resumed from its last checkpoint ends
with the same weights as one that was never interrupted.

Output folder:

    pretrain.json                      the resolved configuration and library versions
    checkpoints/step-{N:08d}.pt        model, optimiser, schedule, loader position, configuration
                                       (written to a temporary name, fsynced, renamed; the last
                                       `keep_checkpoints` are kept)
    metrics.jsonl                      one line per step (rank 0); cut back to the checkpoint on resume
    text-cache/                        text embeddings of the vocabulary, computed once

Under torchrun each process reads its own share of the data (the loader splits by rank), the
gradients are averaged by DistributedDataParallel, and rank 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from magicseg_engine.atomic import append_text, atomic_output, atomic_write_text, check_writable_dir, fsync_dir
from magicseg_engine.config import library_versions
from magicseg_engine.errors import UsageError
from magicseg_engine.train.model import MagicSegModel, SegModelConfig, TextEmbeddingBank, load_clip_weights, param_groups
from magicseg_engine.train.objective import (
    LossWeights,
    micro_batch_shares,
    pretraining_losses,
    remap_labels,
    sample_candidates,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "pretrain.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")
CHECKPOINT_FORMAT = 1


class PretrainConfig(BaseModel):
    """Everything that decides what a pretraining run computes."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    model: SegModelConfig
    # open_clip checkpoint or safetensors with the CLIP towers' weights (None: random weights).
    clip_weights: str | None = None
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # per rank and micro-batch
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(gt=0)
    head_lr_mult: float = Field(10.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    candidates: int = Field(100, gt=0)
    loss_stride: int = Field(4, gt=0)
    focal_weight: float = Field(100.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    counterfactual_weight: float = Field(1.0, ge=0)
    counterfactual_margin: float = Field(0.0, ge=-1, le=1)
    checkpoint_every: int = Field(gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0
    loader: Literal["torch", "dali"] = "torch"
    num_workers: int = Field(2, ge=0)
    # Class names the model is trained to tell apart; None: every class the data holds.
    vocabulary: list[str] | None = None
    fused_losses: bool | None = None  # None: Triton kernels on CUDA, torch references elsewhere

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.focal_weight, self.dice_weight, self.counterfactual_weight, self.counterfactual_margin)


# The reference recipe (AdamW 2e-5, x10 head, wd 0.01, 1500 warm-up steps, 20k steps, 4 images
# per GPU, 512 crops) at full size; `tiny` trains a small random model in a minute on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    # A random tiny backbone holds nothing worth freezing: it trains with the rest.
    "tiny": {"model": "tiny", "model_overrides": {"freeze_backbone": False}, "steps": 400, "batch_size": 8, "lr": 1e-4, "warmup_steps": 20,
             "checkpoint_every": 50, "candidates": 100, "loss_stride": 4, "num_workers": 0},
    "sd15-random": {"model": "vit-b16", "steps": 20000, "batch_size": 4, "lr": 2e-5, "warmup_steps": 1500,
                    "checkpoint_every": 500, "precision": "bf16"},
    "sd15": {"model": "vit-b16", "steps": 20000, "batch_size": 4, "lr": 2e-5, "warmup_steps": 1500,
             "checkpoint_every": 500, "precision": "bf16"},
}


def load_pretrain_preset(name: str, overrides: dict[str, Any] | None = None,
                         model_overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The preset `name` with non-None `overrides` applied; validation errors as one UsageError line."""
    from pydantic import ValidationError

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    model_values = {**values.pop("model_overrides", {}),
                    **{k: v for k, v in (model_overrides or {}).items() if v is not None}}
    try:
        values["model"] = SegModelConfig.preset(values["model"], **model_values)
        config = PretrainConfig(preset=name, **values)
    except ValidationError as err:
        e = err.errors()[0]
        raise UsageError(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None
    if name == "sd15" and not config.clip_weights:
        raise UsageError("preset sd15 trains from real CLIP weights: pass --clip-weights (open_clip .pt/.bin or "
                         ".safetensors of ViT-B/16), or use --preset sd15-random")
    return config


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor at a step: linear warm-up from 0, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- distributed ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """The process's rank under torchrun (gloo on the CPU, NCCL on GPUs), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), torch.device(device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world, local), dev


# --- checkpoints -------------------------------------------------------------------------------

def checkpoint_paths(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CHECKPOINT.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    path = Path(out) / CHECKPOINTS_DIR / f"step-{step:08d}.pt"
    check_writable_dir(path.parent)
    with atomic_output(path, "wb", encoding=None, site="checkpoint") as f:
        torch.save(state, f)
    fsync_dir(path.parent)
    for _, old in checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    from magicseg_engine.safe_files import load_torch_file, why_unreadable

    # Weights only: a checkpoint is tensors and plain values (the loader and schedule states
    # included), and one from elsewhere could otherwise run code as it is unpickled.
    try:
        state = load_torch_file(path)
    except Exception as err:
        raise UsageError(f"checkpoint {path} cannot be read ({why_unreadable(err)}); use a checkpoint pretrain "
                         "wrote (delete this one to resume from the one before)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a magicseg-engine pretraining checkpoint")
    problem = _checkpoint_problem(state)
    if problem:
        raise UsageError(f"checkpoint {path} is damaged ({problem}); use a checkpoint pretrain wrote (delete this one "
                         "to resume from the one before)")
    return state


def _checkpoint_problem(state: dict) -> str | None:
    """What a checkpoint of the right format lacks that resuming or evaluating reads, or None."""
    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return "no model configuration"
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return "no step number"
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        return "no model weights"
    for name in ("optimizer", "schedule", "loader"):
        if name in state and not isinstance(state[name], dict):
            return f"its {name} state is not a dict"
    return None


def load_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """`model.load_state_dict(weights)`, a mismatch (another model, other shapes) as one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        # torch lists every missing, unexpected and mis-shaped tensor; the first one says enough.
        detail = " ".join(str(err).split())
        raise UsageError(f"checkpoint {path} holds weights of another model than its configuration describes "
                         f"({detail[:300]}); use a checkpoint pretrain wrote") from None


def check_same_config(saved: dict, config: PretrainConfig, where: Path) -> None:
    """A checkpoint resumes only the configuration it was made with (more steps are allowed)."""
    ours = config.model_dump(mode="json")
    if saved["model"] != ours["model"]:
        diff = sorted(k for k in set(saved["model"]) | set(ours["model"])
                      if saved["model"].get(k) != ours["model"].get(k))
        raise UsageError(f"the checkpoint in {where} is of another model config ({', '.join(diff)} differ); "
                         "pretrain into a new --out, or resume with the preset and flags it was started with")
    diff = sorted(k for k in ours if k not in ("model", "steps", "num_workers") and saved.get(k) != ours.get(k))
    if diff:
        raise UsageError(f"the run in {where} was started with other settings ({', '.join(diff)} differ); "
                         "resume with the same flags, or pretrain into a new --out")


def _started_config(out: Path) -> dict:
    path = out / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is damaged; pretrain into a new --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise UsageError(f"{path} is damaged; pretrain into a new --out")
    return saved


# The temporary files atomic_output leaves when the process is killed while it writes one of
# the run's files: `.{final name}.{random}.tmp` beside it.
_TEMPORARY = re.compile(r"^\.(pretrain\.json|metrics\.jsonl|step-\d{8}\.pt|text-[0-9a-f]+\.safetensors)\.[A-Za-z0-9_]+\.tmp$")


def _remove_temporary_files(out: Path) -> list[Path]:
    """Delete what writes killed half way left in the run folder (its own files' temporary
    copies only); a resumed run writes those files again whole. Returns what was deleted."""
    removed = []
    for folder in (out, out / CHECKPOINTS_DIR, out / "text-cache"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _TEMPORARY.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        for folder in {p.parent for p in removed}:
            fsync_dir(folder)
    return removed


def _cut_metrics(path: Path, step: int) -> None:
    """Drop metrics lines of steps after `step`: they are computed again after a resume."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if _metrics_step(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in lines), site="metrics")


def _metrics_step(line: str) -> float:
    """A metrics line's step; infinite for a blank or torn line (a full disk can tear the last one)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError):
        return math.inf


# --- the loop ----------------------------------------------------------------------------------

@dataclass
class PretrainSummary:
    step: int
    resumed_from: int
    seconds: float
    images: int
    last: dict
    skipped: dict
    checkpoint: Path | None


def _seed_step(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    """The step's generators: torch's global one (dropout) and a numpy one (candidates)."""
    words = [seed & (2**63 - 1), step, micro, rank]
    torch.manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] & (2**63 - 1)))
    return np.random.default_rng(words)


def masks_command(data: Path) -> str:
    """The command that gives a run without masks its masks, in a new run beside it."""
    import shlex

    return (f"magicseg-engine masks --data {shlex.quote(str(data))} --out {shlex.quote(str(data) + '-masks')} "
            "--mask-source detector")


def check_has_masks(data: Path) -> None:
    """UsageError for a run generated with --mask-source none: it has no label maps to learn from,
    and the loader would only find that out after indexing every shard."""
    try:
        saved = json.loads((Path(data) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no run.json (a synthetic run): the loader counts what each sample holds
    config = saved.get("config") if isinstance(saved, dict) else None
    masks = config.get("masks") if isinstance(config, dict) else None
    if isinstance(masks, dict) and masks.get("source") == "none":
        raise UsageError(f"{data} was generated with --mask-source none and has no masks to train on; annotate it "
                         f"first with `{masks_command(data)}`, then pretrain on {str(data) + '-masks'}")


def build_loader(config: PretrainConfig, data: Path, dist: Distributed, vocabulary: Sequence[str] | None,
                 device: torch.device):
    common = dict(seed=config.seed, rank=dist.rank, world_size=dist.world_size, vocabulary=vocabulary)
    size = config.model.image_size
    if config.loader == "dali":
        from magicseg_engine.train.dali_loader import DaliPairLoader

        return DaliPairLoader(data, config.batch_size, size,
                              device_id=device.index if device.type == "cuda" else None, **common)
    from magicseg_engine.train.data import PairLoader

    return PairLoader(data, config.batch_size, size, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda", **common)


def pretrain(config: PretrainConfig, data: Path, out: Path, *, device: str = "cpu", resume: bool = False,
             on_step: Callable[[int, int, dict], None] | None = None) -> PretrainSummary:
    """Train `config` on the run directory `data` into `out`; see the module docstring."""
    data, out = Path(data), Path(out)
    check_has_masks(data)
    dist, dev = init_distributed(device)
    start = 0
    saved = None
    restart = False  # --resume of a run that stopped before its first checkpoint
    if resume:
        found = checkpoint_paths(out)
        if found:
            saved = load_checkpoint(found[-1][1])
            check_same_config(saved["config"], config, out)
            start = int(saved["step"])
        elif (out / CONFIG_FILE).is_file():
            # Stopped (killed, or a full disk) before its first checkpoint: nothing to keep but
            # its settings, so it starts again from step 0 if they are the same.
            check_same_config(_started_config(out), config, out)
            restart = True
        else:
            raise UsageError(f"--resume: {out} holds no checkpoint; start without --resume")
    elif checkpoint_paths(out) or (out / CONFIG_FILE).exists():
        raise UsageError(f"{out} already holds a pretraining run; pass --resume to continue it or choose another --out")
    if dist.main:
        _remove_temporary_files(out)

    vocabulary = config.vocabulary
    try:
        loader = build_loader(config, data, dist, vocabulary, dev)
    except ValueError as err:
        # The loaders' refusals (too few usable samples for the ranks, settings they cannot
        # take) are about the data and flags given, so they are reported as such.
        hint = ("; samples without masks need annotating first: " + masks_command(data)) if "no_mask" in str(err) else ""
        raise UsageError(f"{err}{hint}") from None
    if vocabulary is None:
        vocabulary = list(loader.index.classes)
    if not vocabulary:
        raise UsageError(f"{data} holds no usable sample (left out: {dict(loader.skipped) or 'none'}); "
                         "pretraining needs finished shards with masks")
    vocab_index = {name: i for i, name in enumerate(vocabulary)}

    # Same initial weights on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model = MagicSegModel(config.model)
    if config.clip_weights:
        log.info("%s", load_clip_weights(model, config.clip_weights))
    model.to(dev)
    if dist.main and not resume:
        check_writable_dir(out)
        atomic_write_text(out / CONFIG_FILE, json.dumps(
            {"config": config.model_dump(mode="json"), "data": str(data), "vocabulary": vocabulary,
             "world_size": dist.world_size, "versions": library_versions()}, indent=2, sort_keys=True) + "\n",
            site="pretrain_config")
    bank = TextEmbeddingBank(model, cache_dir=out / "text-cache")
    text = bank.lookup(vocabulary).to(dev)  # [V, E], frozen

    groups = param_groups(model, config.lr, config.weight_decay, config.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    if saved is not None:
        where = checkpoint_paths(out)[-1][1]
        load_weights(model, saved["model"], where)
        try:
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            loader.load_state_dict(saved["loader"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise UsageError(f"checkpoint {where} cannot be resumed ({type(err).__name__}: {str(err)[:200]}); "
                             "resume from an earlier checkpoint (delete this one) or pretrain into a new --out") from None
        if dist.main:
            _cut_metrics(out / METRICS_FILE, start)
    elif restart and dist.main:
        _cut_metrics(out / METRICS_FILE, 0)
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext())

    def batches():
        while True:
            yield from loader

    stream = batches()
    step, images, last, checkpoint = start, 0, {}, None
    t0 = time.perf_counter()
    metrics = (out / METRICS_FILE).open("a", encoding="utf-8") if dist.main else None
    try:
        net.train()
        while step < config.steps:
            t_step = time.perf_counter()
            totals: dict[str, float] = {}
            # The step's micro-batches first: each one's share of the step's pixels and images
            # weighs its losses, so that accumulation equals one batch of them all.
            micro_batches = [next(stream) for _ in range(config.grad_accum)]
            shares = micro_batch_shares([b["mask"] for b in micro_batches], config.loss_stride)
            for micro, (batch, (pixel_share, image_share)) in enumerate(zip(micro_batches, shares)):
                # After the batches: starting an epoch's DataLoader iterator draws from torch's generator.
                rng = _seed_step(config.seed, step, micro, dist.rank)
                candidates = sample_candidates(batch["classes"], vocab_index, config.candidates, rng)
                labels = remap_labels(batch["mask"], batch["classes"], candidates, vocab_index).to(dev)
                sync = net.no_sync() if dist.world_size > 1 and micro < config.grad_accum - 1 else nullcontext()
                with sync:
                    with autocast:
                        outputs = net(batch["image"].to(dev, non_blocking=True), text[candidates.to(dev)],
                                      twins=batch["twin"].to(dev, non_blocking=True))
                    losses = pretraining_losses(outputs, labels, config.weights, stride=config.loss_stride,
                                                use_triton=config.fused_losses, pixel_share=pixel_share,
                                                image_share=image_share)
                    losses["loss"].backward()
                images += len(batch["key"])
                for k, v in losses.items():
                    share = 1.0 if k == "loss" else pixel_share if k == "focal" else image_share
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) * share
            grad_norm = None
            if config.clip_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            last = {"step": step, **{k: round(v, 6) for k, v in totals.items()},
                    "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm,
                    "seconds": round(time.perf_counter() - t_step, 4),
                    "images_per_s": round(config.grad_accum * config.batch_size * dist.world_size
                                          / (time.perf_counter() - t_step), 2)}
            if metrics is not None:
                append_text(metrics, json.dumps(last) + "\n", site="metrics", path=out / METRICS_FILE)
            if step % config.checkpoint_every == 0 or step == config.steps:
                if dist.main:
                    state = {"format": CHECKPOINT_FORMAT, "step": step, "config": config.model_dump(mode="json"),
                             "vocabulary": vocabulary, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                             "loader": loader.state_dict(), "world_size": dist.world_size}
                    metrics.flush()
                    os.fsync(metrics.fileno())
                    checkpoint = save_checkpoint(out, step, state, config.keep_checkpoints)
            if on_step is not None:
                on_step(step, config.steps, last)
    finally:
        if metrics is not None:
            metrics.close()
    return PretrainSummary(step=step, resumed_from=start, seconds=time.perf_counter() - t0, images=images,
                           last=last, skipped=dict(loader.skipped), checkpoint=checkpoint)
