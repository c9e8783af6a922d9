"""Sliding-window inference: whole images of any size through a model trained on square crops.

The protocol is the common one for CLIP-based segmenters: resize the image so its short side
is `short_side` (the long side capped at `max_long_side`), cut square `crop` windows every
`stride` pixels (the last window flush with the far edge), average the class logits where
windows overlap, and optionally add the horizontally flipped image's logits. With the usual
512 crops and stride 341 a 512 x 683 image takes two windows.

Windows of consecutive images share model batches, so a batch is full even when each image
has only a couple of windows; images come out in the order they went in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SlideSettings:
    short_side: int
    crop: int
    stride: int
    max_long_side: int | None = None  # None: 4 x short_side
    flip: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("short_side", "crop", "stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stride > self.crop:
            raise ValueError(f"stride {self.stride} exceeds the crop {self.crop}: pixels between windows would be lost")

    @classmethod
    def for_crop(cls, crop: int, **overrides: Any) -> SlideSettings:
        """The usual protocol for a model trained on `crop` squares: short side `crop`, stride 2/3 crop."""
        values = {"short_side": crop, "crop": crop, "stride": max(1, (2 * crop) // 3)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of `height` x `width` is resized to before windows are cut."""
        long_cap = self.max_long_side or 4 * self.short_side
        scale = min(self.short_side / min(height, width), long_cap / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side: every `stride`, the last flush with the end."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


@dataclass
class _Image:
    item: Any
    logits: torch.Tensor  # [K, h, w] running sum
    count: torch.Tensor  # [h, w] windows that covered each pixel
    pending: int


class SlidingWindowSegmenter:
    """Averaged class logits [K, h, w] for normalised images [3, h, w] of any size.

    `predict` maps a batch of windows [N, 3, crop, crop] to logits [N, K, crop, crop]. Windows
    that run past a small image are zero-padded (zero is the mean colour after normalisation)
    and the padding's logits dropped.
    """

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], settings: SlideSettings,
                 device: torch.device | str = "cpu"):
        self.predict = predict
        self.settings = settings
        self.device = torch.device(device)

    def run(self, images: Iterable[tuple[Any, torch.Tensor]]) -> Iterator[tuple[Any, torch.Tensor]]:
        """(item, image [3,h,w]) -> (item, mean logits [K,h,w]), in input order."""
        s = self.settings
        queue: deque[tuple[_Image, int, int, bool, torch.Tensor]] = deque()
        open_images: deque[_Image] = deque()
        for item, image in images:
            image = image.to(self.device, non_blocking=True)
            _, h, w = image.shape
            state = _Image(item, torch.empty(0), torch.zeros(h, w, device=self.device), 0)
            for y in window_starts(h, s.crop, s.stride):
                for x in window_starts(w, s.crop, s.stride):
                    window = image[:, y:y + s.crop, x:x + s.crop]
                    flips = (False, True) if s.flip else (False,)
                    for flip in flips:
                        queue.append((state, y, x, flip, window.flip(-1) if flip else window))
                        state.pending += 1
            open_images.append(state)
            while len(queue) >= s.batch_size:
                self._run_batch(queue)
                yield from self._finished(open_images)
        while queue:
            self._run_batch(queue)
        yield from self._finished(open_images)

    def _run_batch(self, queue: deque) -> None:
        s = self.settings
        batch = [queue.popleft() for _ in range(min(s.batch_size, len(queue)))]
        windows = torch.zeros(len(batch), 3, s.crop, s.crop, device=self.device)
        for i, (_, _, _, _, window) in enumerate(batch):
            windows[i, :, : window.shape[1], : window.shape[2]] = window
        logits = self.predict(windows).float()
        for (state, y, x, flip, window), out in zip(batch, logits):
            wh, ww = window.shape[1], window.shape[2]
            if flip:
                # The flipped window was padded on its right: undo the flip on the real part only.
                out = out[:, :wh, :ww].flip(-1)
            else:
                out = out[:, :wh, :ww]
            if state.logits.numel() == 0:
                state.logits = torch.zeros(out.shape[0], *state.count.shape, device=self.device)
            state.logits[:, y:y + wh, x:x + ww] += out
            state.count[y:y + wh, x:x + ww] += 1
            state.pending -= 1

    @staticmethod
    def _finished(open_images: deque[_Image]) -> Iterator[tuple[Any, torch.Tensor]]:
        while open_images and open_images[0].pending == 0:
            state = open_images.popleft()
            yield state.item, state.logits / state.count


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int], background: bool,
                     threshold: float) -> torch.Tensor:
    """[K, h, w] logits -> [H, W] int64 labels at `size` (the label map's size).

    Without background, each pixel takes its best class (0..K-1). With background, labels shift
    up by one and a pixel whose best class scores below `threshold` (sigmoid of its logit)
    becomes background, 0: the model scores each class on its own and has no background class.
    """
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    best, index = logits.max(dim=0)
    if not background:
        return index
    return torch.where(torch.sigmoid(best) > threshold, index + 1, torch.zeros_like(index))
