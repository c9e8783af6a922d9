"""Zero-shot evaluation of a pretrained checkpoint on one benchmark split.

`load_segmenter` rebuilds the model a pretraining checkpoint was made with; `evaluate` reads
the split with a DataLoader (decoding and resizing in worker processes), runs the sliding
window over every image, turns logits into labels at the ground truth's size and accumulates
one confusion matrix on the device. The summary is a plain dict, written as JSON by the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from magicseg_engine.atomic import atomic_output, check_writable_dir
from magicseg_engine.config import library_versions
from magicseg_engine.data.encoding import encode_png
from magicseg_engine.errors import UsageError
from magicseg_engine.evaluate.datasets import IGNORE_LABEL, EvalDataset, Sample
from magicseg_engine.evaluate.inference import SlideSettings, SlidingWindowSegmenter, logits_to_labels
from magicseg_engine.evaluate.metrics import ConfusionMatrix
from magicseg_engine.train.data import CLIP_MEAN, CLIP_STD
from magicseg_engine.train.loop import CHECKPOINTS_DIR, checkpoint_paths, load_checkpoint, load_weights
from magicseg_engine.train.model import MagicSegModel, SegModelConfig, TextEmbeddingBank


@dataclass(frozen=True)
class Segmenter:
    """A pretrained model ready for inference, and where it came from."""

    model: MagicSegModel
    checkpoint: Path
    step: int
    run_dir: Path | None  # the pretraining --out folder, when the checkpoint sits in one

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """[K, E] embeddings of class names through the model's prompt templates.

        Cached in the run's text-cache/ folder when it is writable, so a second evaluation
        of the same vocabulary encodes nothing.
        """
        cache = None
        if self.run_dir is not None:
            cache = self.run_dir / "text-cache"
            try:
                check_writable_dir(cache)
            except UsageError:
                cache = None
        return TextEmbeddingBank(self.model, cache_dir=cache).lookup(list(names))


def load_segmenter(checkpoint: Path | str, device: torch.device | str = "cpu") -> Segmenter:
    """The model of a pretraining checkpoint: a `step-N.pt` file, or a pretrain --out folder
    (its newest checkpoint)."""
    path = Path(checkpoint)
    run_dir = None
    if path.is_dir():
        found = checkpoint_paths(path)
        if not found:
            raise UsageError(f"--checkpoint {path} holds no {CHECKPOINTS_DIR}/step-*.pt; point it at a pretrain "
                             "--out folder or a checkpoint file")
        run_dir, path = path, found[-1][1]
    elif path.is_file():
        if path.parent.name == CHECKPOINTS_DIR:
            run_dir = path.parent.parent
    else:
        raise UsageError(f"--checkpoint {path} does not exist")
    state = load_checkpoint(path)
    try:
        config = SegModelConfig(**state["config"]["model"])
    except Exception as err:  # pydantic's ValidationError, or a checkpoint without a model config
        raise UsageError(f"{path} holds no usable model configuration ({type(err).__name__})") from None
    model = MagicSegModel(config)
    load_weights(model, state["model"], path)
    model.to(device).eval()
    return Segmenter(model, path, int(state["step"]), run_dir)


class _Images(torch.utils.data.Dataset):
    """(sample, image [3,h,w] resized and CLIP-normalised, labels [H,W] at the original size)."""

    def __init__(self, dataset: EvalDataset, settings: SlideSettings):
        self.dataset = dataset
        self.settings = settings
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def __getitem__(self, i: int) -> tuple[Sample, torch.Tensor | None, torch.Tensor | str]:
        # A problem travels back as a message: an exception raised in a worker process would
        # reach the user wrapped in the worker's traceback instead of as one line.
        sample = self.dataset.samples[i]
        try:
            return (sample, *self._load(sample))
        except UsageError as err:
            return sample, None, str(err)

    def _load(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with Image.open(sample.image) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError) as err:
            raise UsageError(f"cannot read image {sample.image}: {err}") from None
        labels = self.dataset.read_labels(sample)
        if labels.shape != (rgb.height, rgb.width):
            raise UsageError(f"{sample.label} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                             f"{rgb.width}x{rgb.height}")
        h, w = self.settings.resized(rgb.height, rgb.width)
        rgb = rgb.resize((w, h), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - self.mean) / self.std, torch.from_numpy(labels)


@dataclass(frozen=True)
class EvalSettings:
    slide: SlideSettings
    bg_threshold: float = 0.5
    precision: Literal["fp32", "bf16"] = "fp32"
    num_workers: int = 2


def evaluate(
    segmenter: Segmenter,
    dataset: EvalDataset,
    settings: EvalSettings,
    *,
    unseen: Sequence[str] = (),
    save_predictions: Path | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> dict:
    """mIoU and friends of `segmenter` on `dataset`; predictions saved as label PNGs if asked.

    `on_image(done, total)` is called after each image. The returned dict holds the metrics
    (see `ConfusionMatrix.compute`), the settings, timings and library versions.
    """
    model = segmenter.model
    device = next(model.parameters()).device
    text = segmenter.text_embeddings(dataset.class_names).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if settings.precision == "bf16"
                else nullcontext())

    @torch.no_grad()
    def predict(windows: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model.predict(windows, text, tuple(windows.shape[-2:]))

    if save_predictions is not None:
        check_writable_dir(save_predictions)
    loader = torch.utils.data.DataLoader(
        _Images(dataset, settings.slide), batch_size=None, shuffle=False, num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )
    labels_of: dict[str, torch.Tensor] = {}

    def images():
        for sample, image, labels in loader:
            if image is None:
                raise UsageError(labels)
            labels_of[sample.id] = labels
            yield sample, image

    matrix = ConfusionMatrix(dataset.num_classes, IGNORE_LABEL, device)
    segmenter_ = SlidingWindowSegmenter(predict, settings.slide, device)
    start = time.perf_counter()
    done = 0
    for sample, logits in segmenter_.run(images()):
        target = labels_of.pop(sample.id).to(device)
        predicted = logits_to_labels(logits, tuple(target.shape), dataset.background, settings.bg_threshold)
        matrix.update(predicted, target)
        if save_predictions is not None:
            _save_png(save_predictions / f"{sample.id}.png", predicted)
        done += 1
        if on_image is not None:
            on_image(done, len(dataset.samples))
    seconds = time.perf_counter() - start

    result = matrix.compute(dataset.scored_names, unseen=unseen)
    return {
        "dataset": dataset.layout.name,
        "title": dataset.layout.title,
        "split": dataset.split,
        "root": str(dataset.root),
        "images": done,
        "skipped_hidden_files": dataset.skipped_hidden,
        "classes": dataset.num_classes,
        "background": dataset.background,
        "checkpoint": str(segmenter.checkpoint),
        "step": segmenter.step,
        **result,
        "settings": {**asdict(settings.slide), "bg_threshold": settings.bg_threshold,
                     "precision": settings.precision, "device": str(device)},
        "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 3) if seconds > 0 else None,
        "versions": library_versions(),
    }


def _save_png(path: Path, labels: torch.Tensor) -> None:
    with atomic_output(path, "wb", encoding=None) as f:
        f.write(encode_png(labels.to(torch.uint8).cpu().numpy()))
