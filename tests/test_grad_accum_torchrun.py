"""Gradient accumulation equals one batch as large as the accumulated micro-batches.

The focal term is a mean over non-ignored loss pixels, and crops of images smaller than the
crop are padded with ignore pixels, so micro-batches hold different numbers of pixels. A step
that averaged its micro-batches' means would weigh a padded micro-batch's pixels more than an
unpadded one's; the loop weighs each by its share of the step's pixels (and images) instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magicseg_engine.train.data import IGNORE_INDEX
from magicseg_engine.train.loop import checkpoint_paths, load_checkpoint, load_pretrain_preset
from magicseg_engine.train.model import MagicSegModel
from magicseg_engine.train.objective import (
    LossWeights,
    micro_batch_shares,
    pretraining_losses,
    remap_labels,
)

WORKER = Path(__file__).with_name("grad_accum_worker.py")


def test_shares_count_the_loss_grid_pixels_and_the_images():
    # Stride 4 reads the centre pixel (offset 2) of each 4x4 cell: a 16x16 mask has a 4x4 grid.
    full = torch.zeros(2, 16, 16, dtype=torch.int64)  # 2 images x 16 grid pixels, none ignored
    padded = torch.zeros(2, 16, 16, dtype=torch.int64)
    padded[:, 8:, :] = IGNORE_INDEX  # bottom half ignored: grid rows at 10 and 14, 8 of 16 per image
    padded[:, 7, :] = IGNORE_INDEX  # row 7 is between grid rows 6 and 10: changes nothing
    small = torch.zeros(1, 16, 16, dtype=torch.int64)  # an epoch's last, smaller batch
    shares = micro_batch_shares([full, padded, small], stride=4)
    # Pixels: 32, 16, 16 of 64. Images: 2, 2, 1 of 5.
    assert shares == [(32 / 64, 2 / 5), (16 / 64, 2 / 5), (16 / 64, 1 / 5)]
    assert micro_batch_shares([full], stride=4) == [(1.0, 1.0)]  # no accumulation: nothing changes
    # Every pixel ignored: the focal sums are zero anyway; the shares stay finite and even.
    ignored = torch.full((2, 16, 16), IGNORE_INDEX, dtype=torch.int64)
    assert micro_batch_shares([ignored, ignored], stride=4) == [(0.5, 0.5), (0.5, 0.5)]


def test_weighted_micro_batches_give_the_gradient_of_their_union():
    """In one process: two micro-batches with different ignore counts, weighted by their
    shares, against the two as one batch. Float32; the same sums in another order, so the
    gradients agree to rounding (rtol 1e-4 of each tensor's largest entry)."""
    config = load_pretrain_preset("tiny", {"candidates": 3}, {"decoder_dropout": 0.0})
    torch.manual_seed(0)
    model = MagicSegModel(config.model).train()
    size = config.model.image_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, size, size, generator=g)
    twins = torch.randn(4, 3, size, size, generator=g)
    mask = torch.randint(0, 3, (4, size, size), generator=g)
    mask[0, size // 2:] = IGNORE_INDEX  # the first micro-batch is half padding
    classes = [["a", "b"]] * 4
    vocab = {"a": 0, "b": 1, "c": 2}
    candidates = torch.tensor([[0, 1, 2]] * 4)
    text = torch.randn(3, config.model.embed_dim, generator=g)
    weights = LossWeights()

    def grads(parts):
        model.zero_grad(set_to_none=True)
        shares = micro_batch_shares([mask[p] for p in parts], config.loss_stride)
        for p, (pixel_share, image_share) in zip(parts, shares):
            labels = remap_labels(mask[p], classes[p], candidates[p], vocab)
            out = model(images[p], text[candidates[p]], twins=twins[p])
            loss = pretraining_losses(out, labels, weights, stride=config.loss_stride,
                                      pixel_share=pixel_share, image_share=image_share)["loss"]
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    union = grads([slice(0, 4)])
    accumulated = grads([slice(0, 2), slice(2, 4)])
    assert union.keys() == accumulated.keys()
    for name, g_union in union.items():
        scale = float(g_union.abs().max())
        assert float((accumulated[name] - g_union).abs().max()) <= 1e-4 * scale + 1e-9, name
    # The weighting is what makes them equal: the plain mean of the two means is measurably off.
    model.zero_grad(set_to_none=True)
    for p in (slice(0, 2), slice(2, 4)):
        labels = remap_labels(mask[p], classes[p], candidates[p], vocab)
        out = model(images[p], text[candidates[p]], twins=twins[p])
        (pretraining_losses(out, labels, weights, stride=config.loss_stride)["loss"] / 2).backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    worst = max(float((plain[n] - g).abs().max()) / float(g.abs().max()) for n, g in union.items())
    assert worst > 1e-2


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_paths(out)[-1][1])["model"]


@pytest.mark.slow
def test_grad_accum_2_equals_a_batch_twice_the_size_under_torchrun(tmp_path):
    """torchrun, 2 CPU processes on gloo: `grad_accum 2` x 2 images against 1 x 4 images per
    rank, two optimiser steps of the tiny model, from the same initial weights and data order.

    Tolerances. Both runs reduce the same float32 sums in different orders, so gradients agree
    to rounding: the pre-clipping gradient norm of every step within rtol 1e-5 (averaging the
    micro-batches' means instead was 3% off here). AdamW divides each update by the gradient's
    own size, so an entry whose true gradient is zero (an attention key bias: softmax ignores
    it) moves by rounding noise of up to lr per step; entries may therefore differ by at most
    1e-4 (measured 3.1e-5; averaging the means put entries up to 3.7e-3 apart), and the
    difference of the two runs' weights is under 1e-3 of how far the weights moved (measured
    1.2e-4; averaging the means gave 0.10).
    """
    from magicseg_engine.train.synthetic import write_synthetic_run

    data = tmp_path / "data"
    # 16 samples, 8 per rank: two steps of 4 images per rank are exactly one epoch, so both
    # runs see the same images in the same steps (no epoch boundary inside a step).
    write_synthetic_run(data, 16, size=64, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(WORKER), str(data), str(tmp_path / "out"), "2", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    accum, batch = tmp_path / "out" / "accum", tmp_path / "out" / "batch"
    for out in (accum, batch):
        assert load_checkpoint(checkpoint_paths(out)[-1][1])["world_size"] == 2
    steps = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (accum, batch)]
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == [1, 2]
    for a, b in zip(*steps):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        for part in ("loss", "focal", "dice", "counterfactual"):  # rank 0's logged values
            assert a[part] == pytest.approx(b[part], rel=1e-5, abs=1e-6)

    wa, wb = _weights(accum), _weights(batch)
    config = load_pretrain_preset("tiny", {}, {"decoder_dropout": 0.0})
    torch.manual_seed(config.seed)  # the loop's initial weights
    w0 = MagicSegModel(config.model).state_dict()
    diff = moved = 0.0
    for name, a in wa.items():
        if not a.is_floating_point():
            continue
        a64, b64 = a.double(), wb[name].double()
        assert float((a64 - b64).abs().max()) <= 1e-4, name
        diff += float(((a64 - b64) ** 2).sum())
        moved += float(((a64 - w0[name].double()) ** 2).sum())
    assert moved > 0
    assert np.sqrt(diff / moved) < 1e-3
