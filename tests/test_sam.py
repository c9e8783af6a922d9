"""SAM: model builds per type, checkpoints, and batched refinement against SamPredictor one prompt at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from magicseg_engine.errors import UsageError
from magicseg_engine.masks.sam import RefinedMasks, SamRefiner, build_sam, choose_masks

# Counted from segment_anything's registry builds (the published architectures).
FULL_SIZE_PARAMETERS = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}


# The tiny models' matrices are a few KB: one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_sam):
    # The shared tiny SAM (conftest.py): these tests only run it and save its weights; the first
    # one checks it is still exactly build_sam("tiny", seed=0), frozen and in eval mode.
    return tiny_sam


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _usage_error(model_type: str, checkpoint) -> str:
    with pytest.raises(UsageError) as info:
        build_sam(model_type, checkpoint=checkpoint)
    message = str(info.value)
    # The CLI prints it as one line.
    assert "\n" not in message
    assert model_type in message
    return message


def _prompts(seed: int, n_images: int, n_classes: int, height: int, width: int, n_points: int = 3):
    """Random images and prompts covering every layout a class can have.

    Per (image, class), cycling so each image mixes layouts: box and points; points only;
    box only; box and points with padding; nothing at all.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, height, width, 3), dtype=np.uint8)
    x0 = rng.uniform(0, width * 0.5, (n_images, n_classes))
    y0 = rng.uniform(0, height * 0.5, (n_images, n_classes))
    x1 = x0 + rng.uniform(4, width * 0.5, (n_images, n_classes))
    y1 = y0 + rng.uniform(4, height * 0.5, (n_images, n_classes))
    boxes = torch.tensor(np.stack([x0, y0, x1, y1], -1), dtype=torch.float32)
    points = torch.tensor(
        np.stack([rng.uniform(0, width, (n_images, n_classes, n_points)),
                  rng.uniform(0, height, (n_images, n_classes, n_points))], -1),
        dtype=torch.float32,
    )
    labels = torch.tensor(rng.integers(0, 2, (n_images, n_classes, n_points)), dtype=torch.int64)
    labels[..., 0] = 1  # attention peaks always give at least one positive point
    for b in range(n_images):
        for c in range(n_classes):
            layout = (b + c) % 5
            if layout == 1:
                boxes[b, c] = -1
                labels[b, c, -1] = -1
            elif layout == 2:
                labels[b, c] = -1
            elif layout == 3:
                labels[b, c, 1:] = -1
            elif layout == 4:
                boxes[b, c] = -1
                labels[b, c] = -1
    return images, boxes, points, labels


def _has_prompt(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (boxes != -1).any(-1) | (labels != -1).any(-1)


def _assert_same(batched: RefinedMasks, reference: RefinedMasks) -> None:
    assert batched.masks.shape == reference.masks.shape
    inter = (batched.masks & reference.masks).flatten(2).sum(-1)
    union = (batched.masks | reference.masks).flatten(2).sum(-1)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union, dtype=torch.float))
    assert iou.min() > 0.99, iou
    torch.testing.assert_close(batched.scores, reference.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.agreement, reference.agreement, atol=1e-3, rtol=0)


# --- building -----------------------------------------------------------------------------


def test_tiny_is_seeded_and_leaves_the_global_rng_alone(tiny):
    before = torch.get_rng_state()
    again = build_sam("tiny", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert _states_equal(tiny, again)
    assert not _states_equal(tiny, build_sam("tiny", seed=1))
    assert not tiny.training
    assert not any(p.requires_grad for p in tiny.parameters())
    assert tiny.image_encoder.img_size == 128
    # Zero-initialised position tables are drawn too, so a random encoder still sees position.
    assert tiny.image_encoder.pos_embed.abs().sum() > 0


@pytest.mark.parametrize("model_type", sorted(FULL_SIZE_PARAMETERS))
def test_full_size_architectures_on_the_meta_device(model_type):
    sam = build_sam(model_type, device="meta")
    assert all(p.is_meta for p in sam.parameters())
    assert sum(p.numel() for p in sam.parameters()) == FULL_SIZE_PARAMETERS[model_type]
    assert sam.image_encoder.img_size == 1024


def test_unknown_model_type():
    with pytest.raises(UsageError, match="vit_h"):
        build_sam("vit_x")


def test_half_precision_image_encoder_runs_with_float32_prompts():
    sam = build_sam("tiny", dtype=torch.bfloat16)
    assert sam.image_encoder.patch_embed.proj.weight.dtype is torch.bfloat16
    assert sam.mask_decoder.iou_token.weight.dtype is torch.float32
    images, boxes, points, labels = _prompts(3, 2, 3, 40, 56)
    refiner = SamRefiner(sam)
    _assert_same(refiner(images, boxes, points, labels), refiner.refine_one_by_one(images, boxes, points, labels))


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    loaded = build_sam("tiny", checkpoint=str(path), seed=7)  # the file wins over the seed
    assert _states_equal(tiny, loaded)
    assert torch.equal(loaded.pixel_mean, tiny.pixel_mean) and torch.equal(loaded.pixel_std, tiny.pixel_std)
    assert not any(p.requires_grad for p in loaded.parameters())
    images, boxes, points, labels = _prompts(4, 2, 2, 32, 32)
    a, b = SamRefiner(tiny)(images, boxes, points, labels), SamRefiner(loaded)(images, boxes, points, labels)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)


def _full_size_file(model_type: str, path: Path) -> Path:
    # Every tensor a zero-strided view of one element: the right keys and shapes for a
    # full-size checkpoint in a few kilobytes.
    state = build_sam(model_type, device="meta").state_dict()
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}, path)
    return path


def test_full_size_checkpoint_loads_and_wrong_size_is_named(tmp_path):
    vit_b = _full_size_file("vit_b", tmp_path / "sam_vit_b.pth")
    sam = build_sam("vit_b", checkpoint=vit_b)
    assert sum(p.numel() for p in sam.parameters()) == FULL_SIZE_PARAMETERS["vit_b"]
    message = _usage_error("vit_h", vit_b)
    assert "holds a vit_b model" in message and "768 wide, 12 blocks" in message


def test_tiny_checkpoint_given_as_full_size(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    for model_type in ("vit_b", "vit_h"):
        assert "holds a tiny model" in _usage_error(model_type, path)


def test_unreadable_checkpoints(tiny, tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "noise.pth").write_bytes(os.urandom(4096))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    edited = tiny.state_dict()
    del edited["mask_decoder.iou_token.weight"]
    torch.save(edited, tmp_path / "edited.pth")

    assert "does not exist" in _usage_error("tiny", tmp_path / "missing.pth")
    assert "is a folder" in _usage_error("tiny", tmp_path)
    assert "truncated or corrupt" in _usage_error("tiny", tmp_path / "truncated.pth")
    assert "empty or truncated" in _usage_error("tiny", tmp_path / "empty.pth")
    assert "cannot read" in _usage_error("tiny", tmp_path / "noise.pth")
    assert "not a state dict" in _usage_error("tiny", tmp_path / "list.pth")
    assert "1 weights missing" in _usage_error("tiny", tmp_path / "edited.pth")
    # The official file name for the type asked for points users at what to download.
    assert "sam_vit_h_4b8939.pth" in _usage_error("vit_h", tmp_path / "missing.pth")


# --- refinement ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 80), (72, 40)])
def test_batched_refinement_matches_one_prompt_at_a_time(tiny, size):
    height, width = size
    images, boxes, points, labels = _prompts(0, 5, 4, height, width)
    # Chunks of 2 do not divide 5 images: the last encoder call is short.
    refiner = SamRefiner(tiny, image_batch_size=2)
    _assert_same(refiner(images, boxes, points, labels), refiner.refine_one_by_one(images, boxes, points, labels))

    rng = np.random.default_rng(1)
    attention = torch.tensor(rng.random((5, 4, height, width)) < 0.4)
    batched = refiner(images, boxes, points, labels, attention)
    _assert_same(batched, refiner.refine_one_by_one(images, boxes, points, labels, attention))
    # Random weights still make masks of every kind: the comparison is not between empty masks.
    prompted = _has_prompt(boxes, labels)
    coverage = batched.masks.float().mean((2, 3))[prompted]
    assert coverage.min() > 0.01 and coverage.max() < 0.99
    assert (batched.agreement[prompted] > 0).all()


def test_outputs_shapes_dtypes_and_unprompted_classes(tiny):
    images, boxes, points, labels = _prompts(2, 3, 4, 40, 64)
    result = SamRefiner(tiny)(torch.from_numpy(images), boxes, points, labels)
    assert result.masks.shape == (3, 4, 40, 64) and result.masks.dtype is torch.bool
    assert result.scores.shape == (3, 4) and result.scores.dtype is torch.float32
    assert result.agreement.shape == (3, 4) and result.agreement.dtype is torch.float32
    prompted = _has_prompt(boxes, labels)
    assert (~prompted).any() and prompted.any()
    assert not result.masks[~prompted].any()
    assert (result.scores[~prompted] == 0).all() and (result.agreement == 0).all()
    assert (result.scores[prompted] != 0).all()
    # A torch tensor and a numpy array of the same images give the same masks.
    assert torch.equal(SamRefiner(tiny)(images, boxes, points, labels).masks, result.masks)


def test_empty_batches_and_boxes_without_points(tiny):
    refiner = SamRefiner(tiny)
    none = refiner(np.zeros((0, 32, 48, 3), np.uint8), torch.zeros(0, 3, 4), torch.zeros(0, 3, 2, 2),
                   torch.zeros(0, 3, 2, dtype=torch.long))
    assert none.masks.shape == (0, 3, 32, 48) and none.scores.shape == (0, 3)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    boxes = torch.tensor([2.0, 3.0, 30.0, 20.0]).expand(2, 2, 4)
    args = (images, boxes, torch.zeros(2, 2, 0, 2), torch.zeros(2, 2, 0, dtype=torch.long))
    _assert_same(refiner(*args), refiner.refine_one_by_one(*args))


def test_bad_inputs_are_rejected(tiny):
    images, boxes, points, labels = _prompts(0, 2, 2, 32, 32)
    refiner = SamRefiner(tiny)
    with pytest.raises(ValueError, match="uint8"):
        refiner(images.astype(np.float32), boxes, points, labels)
    with pytest.raises(ValueError, match="boxes"):
        refiner(images, boxes[:1], points, labels)
    with pytest.raises(ValueError, match="point_labels"):
        refiner(images, boxes, points, labels + 2)
    with pytest.raises(ValueError, match="attention_masks"):
        refiner(images, boxes, points, labels, torch.zeros(2, 2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError):
        SamRefiner(tiny, agreement_weight=1.5)


def test_choice_rule_on_hand_made_masks():
    # Candidates covering 1, 9 and 0 of the 10 attention pixels: agreements 0.1, 0.9, 0.
    attention = torch.ones(1, 1, 10, dtype=torch.bool)
    candidates = torch.zeros(1, 3, 1, 10, dtype=torch.bool)
    candidates[0, 0, 0, :1] = True
    candidates[0, 1, 0, :9] = True
    iou_pred = torch.tensor([[0.9, 0.5, 0.4]])
    choice, agreement = choose_masks(iou_pred, candidates, attention, 0.5)
    torch.testing.assert_close(agreement, torch.tensor([[0.1, 0.9, 0.0]]))
    assert choice.tolist() == [1]  # 0.5, 0.7, 0.2
    assert choose_masks(iou_pred, candidates, attention, 0.0)[0].tolist() == [0]
    # Both empty: no overlap to reward.
    empty = choose_masks(iou_pred, torch.zeros_like(candidates), torch.zeros_like(attention), 1.0)
    assert (empty[1] == 0).all() and empty[0].tolist() == [0]


def test_attention_agreement_changes_the_choice(tiny):
    from segment_anything import SamPredictor

    images, boxes, points, labels = _prompts(5, 3, 4, 48, 64)
    predictor = SamPredictor(tiny)
    # The first prompt whose highest-rated candidate is not its only distinct one: point the
    # attention mask at another candidate and it must win under agreement weight 0.5.
    for b in range(len(images)):
        predictor.set_image(images[b])
        for c in range(boxes.shape[1]):
            valid = labels[b, c] != -1
            box = boxes[b, c].numpy() if (boxes[b, c] != -1).any() else None
            if not valid.any() and box is None:
                continue
            masks, iou, _ = predictor.predict(
                point_coords=points[b, c][valid].numpy() if valid.any() else None,
                point_labels=labels[b, c][valid].numpy() if valid.any() else None,
                box=box,
            )
            best = int(np.argmax(iou))
            other = int(np.argmin(iou))
            if (masks[other] != masks[best]).any() and masks[other].any():
                break
        else:
            continue
        break
    else:
        pytest.fail("no prompt with distinct candidates")

    attention = torch.zeros(len(images), boxes.shape[1], 48, 64, dtype=torch.bool)
    attention[b, c] = torch.from_numpy(masks[other])
    by_agreement = SamRefiner(tiny, agreement_weight=0.5)(images, boxes, points, labels, attention)
    assert torch.equal(by_agreement.masks[b, c], torch.from_numpy(masks[other]))
    assert by_agreement.agreement[b, c] == 1.0
    assert by_agreement.scores[b, c] == pytest.approx(float(iou[other]), abs=1e-5)

    for result in (
        SamRefiner(tiny, agreement_weight=0.0)(images, boxes, points, labels, attention),
        SamRefiner(tiny)(images, boxes, points, labels),
    ):
        assert torch.equal(result.masks[b, c], torch.from_numpy(masks[best]))
        assert result.scores[b, c] == pytest.approx(float(iou.max()), abs=1e-5)
