"""The shapes world's SAM: its loss, resumable training, and what the shipped weights do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import load_preset, shipped_sam_path
from magicseg_engine.masks.sam import SamRefiner, build_sam
from magicseg_engine.world.sam import SamTrainConfig, draw_batch, sam_loss, train_world_sam, truth_prompts
from magicseg_engine.world.shapes import World

SHORT = dict(steps=4, batch=2, warmup=1, checkpoint_every=1)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_sam_loss_learns_from_the_best_of_the_masks_only():
    target = torch.zeros(8, 8)
    target[2:6, 2:6] = 1
    right = torch.where(target > 0, 8.0, -8.0)
    wrong = -right
    # The loss of a set holding one right mask is that mask's, whatever the others are,
    # once the IoU predictions are right too (1 for the right mask, 0 for the inverted one).
    both = sam_loss(torch.stack([wrong, right]), torch.tensor([0.0, 1.0]), target)
    alone = sam_loss(right[None], torch.tensor([1.0]), target)
    assert both == pytest.approx(float(alone), abs=1e-6)
    assert sam_loss(wrong[None], torch.tensor([0.0]), target) > both + 1.0
    # A wrong IoU prediction costs its squared error.
    off = sam_loss(right[None], torch.tensor([0.5]), target)
    assert float(off - alone) == pytest.approx(0.25, abs=1e-6)


def test_prompts_come_from_the_footprint_as_the_mask_stage_makes_them():
    world = World()
    images, labels, counts = draw_batch(world, 6, np.random.default_rng(0))
    assert images.shape == (6, world.size, world.size, 3) and all(1 <= k <= 2 for k in counts)
    cfg = SamTrainConfig(map_noise=0.0)
    config = load_preset("shapes").masks
    prompts, valid = truth_prompts(labels, counts, cfg, torch.Generator().manual_seed(0),
                                   config.positive_points, config.negative_points)
    for b, k in enumerate(counts):
        for i in range(k):
            assert valid[b, i]
            ys, xs = np.nonzero(labels[b] == i + 1)
            x0, y0, x1, y1 = prompts.boxes[b, i].tolist()
            # A box from the map at latent resolution: coarse, but around the object.
            assert x0 <= xs.mean() <= x1 and y0 <= ys.mean() <= y1
            positive = prompts.points[b, i][prompts.point_labels[b, i] == 1]
            px, py = positive[0].round().long().tolist()
            assert labels[b, min(py, world.size - 1), min(px, world.size - 1)] == i + 1


@pytest.mark.slow
def test_training_resumes_to_the_same_weights_and_writes_a_sam_checkpoint(tmp_path, tiny_sam):
    whole = tmp_path / "whole"
    info = train_world_sam(whole, SamTrainConfig(**SHORT), World())
    assert info["train"]["steps"] == 4

    cut = tmp_path / "cut"

    def stop(done, total, loss):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_world_sam(cut, SamTrainConfig(**SHORT), World(), progress=stop)
    with pytest.raises(Exception, match="--resume"):
        train_world_sam(cut, SamTrainConfig(**SHORT), World())
    with pytest.raises(Exception, match="other settings"):
        train_world_sam(cut, SamTrainConfig(**{**SHORT, "lr": 1e-2}), World(), resume=True)
    train_world_sam(cut, SamTrainConfig(**SHORT), World(), resume=True)

    a = build_sam("tiny", whole / "sam_tiny_shapes.pth")
    b = build_sam("tiny", cut / "sam_tiny_shapes.pth")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.mask_decoder.iou_prediction_head.layers[0].weight,
                           tiny_sam.mask_decoder.iou_prediction_head.layers[0].weight)  # build_sam("tiny")


def test_train_world_sam_command_refuses_bad_settings_before_writing(tmp_path):
    out = tmp_path / "sam"
    result = invoke("train-world-sam", "--out", out, "--steps", 0)
    assert result.exit_code == 2 and "steps" in result.output and "Traceback" not in result.output
    assert not out.exists()
    result = invoke("train-world-sam", "--out", out, "--resume", "--overwrite")
    assert result.exit_code == 2 and "exclude" in result.output


def _mean_iou(sam, images, labels, counts, prompts) -> float:
    refined = SamRefiner(sam)(images, prompts.boxes, prompts.points, prompts.point_labels)
    ious = []
    for b, k in enumerate(counts):
        for i in range(k):
            mask, truth = refined.masks[b, i].numpy(), labels[b] == i + 1
            ious.append((mask & truth).sum() / max(1, (mask | truth).sum()))
    return float(np.mean(ious))


def test_the_shipped_sam_outlines_world_objects_that_random_sam_does_not(tiny_sam):
    """Prompted from noisy latent-resolution footprints, as the mask stage prompts it, on scenes
    it never saw (another seed than training's), the shipped SAM recovers the objects."""
    assert load_preset("shapes").sam.checkpoint == str(shipped_sam_path())
    images, labels, counts = draw_batch(World(), 48, np.random.default_rng(12345))
    config = load_preset("shapes").masks
    prompts, _ = truth_prompts(labels, counts, SamTrainConfig(), torch.Generator().manual_seed(12345),
                               config.positive_points, config.negative_points)
    trained = _mean_iou(build_sam("tiny", shipped_sam_path()), images, labels, counts, prompts)
    random = _mean_iou(tiny_sam, images, labels, counts, prompts)  # build_sam("tiny", seed=0)
    assert trained >= 0.9, (trained, random)  # 0.98 measured
    assert random <= 0.3, (trained, random)  # 0.12 measured


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_missing_or_damaged_world_sam_is_one_clear_line_and_nothing_written(tmp_path, damage):
    bad = tmp_path / "sam_tiny_shapes.pth"
    if damage == "garbage":
        bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "run"
    result = invoke("generate", "--preset", "shapes", "--classes", "shapes", "--num-pairs", 2, "--out", out,
                    "--device", "cpu", "--sam-checkpoint", bad)
    assert result.exit_code == 2, result.output
    assert "SAM checkpoint" in result.output and "train-world-sam" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
