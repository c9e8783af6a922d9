"""Zero-shot evaluation: metrics against torchmetrics, the sliding window against a plain loop,
the four benchmark layouts, the CLI end to end, and the shapes model scored through a layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.errors import UsageError
from magicseg_engine.evaluate.datasets import IGNORE_LABEL, LAYOUTS, load_dataset
from magicseg_engine.evaluate.inference import (
    SlideSettings,
    SlidingWindowSegmenter,
    logits_to_labels,
    window_starts,
)
from magicseg_engine.evaluate.metrics import ConfusionMatrix, harmonic_mean


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- metrics -------------------------------------------------------------------------------------

def test_hand_checked_confusion():
    prediction = torch.tensor([[0, 0, 1], [1, 1, 2]])
    target = torch.tensor([[0, 1, 1], [1, 255, 2]])
    m = ConfusionMatrix(3)
    m.update(prediction, target)
    r = m.compute(["a", "b", "c"])
    # a: TP 1, FP 1 (a pixel of b), FN 0 -> 1/2. b: TP 2, FN 1 -> 2/3 (the ignored pixel counts
    # nowhere). c: 1.
    assert r["iou"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 1.0})
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)
    assert r["mean_accuracy"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert r["pixels"] == 5


def test_absent_classes_have_no_iou_and_leave_the_mean_alone():
    m = ConfusionMatrix(4)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    r = m.compute()
    assert r["iou"]["2"] is None and r["iou"]["3"] is None
    assert r["miou"] == pytest.approx((0.5 + 0.5) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_torchmetrics_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    c = 7
    ours = ConfusionMatrix(c)
    jaccard = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="none")
    pixel_acc = MulticlassAccuracy(num_classes=c, ignore_index=255, average="micro")
    mean_acc = MulticlassAccuracy(num_classes=c, ignore_index=255, average="macro")
    for _ in range(4):
        # Class 6 never occurs in the targets and rarely in predictions: the mean must skip it
        # exactly as torchmetrics does.
        target = torch.randint(0, c - 1, (2, 9, 11), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.1] = 255
        prediction = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=c - 2),
                                 torch.randint(0, c - 1, target.shape, generator=g))
        ours.update(prediction, target)
        for metric in (jaccard, per_class, pixel_acc, mean_acc):
            metric.update(prediction, target)
    r = ours.compute()
    assert r["miou"] == pytest.approx(float(jaccard.compute()), abs=1e-6)
    expected = per_class.compute()
    for i in range(c - 1):
        assert r["iou"][str(i)] == pytest.approx(float(expected[i]), abs=1e-6)
    assert r["iou"][str(c - 1)] is None
    assert r["pixel_accuracy"] == pytest.approx(float(pixel_acc.compute()), abs=1e-6)
    # torchmetrics' macro accuracy counts a class that is predicted but never true as 0; the
    # benchmarks' mean accuracy leaves it out. They agree when no such class was predicted.
    if int(ours.matrix[:, c - 1].sum()) == 0:
        assert r["mean_accuracy"] == pytest.approx(float(mean_acc.compute()), abs=1e-6)


def test_seen_unseen_and_harmonic_mean():
    m = ConfusionMatrix(4)
    # background perfect; a perfect; b half; c never right.
    m.update(torch.tensor([0, 1, 2, 0, 3]), torch.tensor([0, 1, 2, 2, 0]))
    r = m.compute(["background", "a", "b", "c"], unseen=["b", "c"])
    assert r["iou"] == pytest.approx({"background": 1 / 3, "a": 1.0, "b": 0.5, "c": 0.0})
    assert r["seen_miou"] == pytest.approx(1.0)  # background is neither seen nor unseen
    assert r["unseen_miou"] == pytest.approx(0.25)
    assert r["harmonic_miou"] == pytest.approx(2 * 1.0 * 0.25 / 1.25)
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="not among"):
        m.compute(["background", "a", "b", "c"], unseen=["d"])


def test_labels_out_of_range_are_refused():
    m = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target labels"):
        m.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="predicted"):
        m.update(torch.tensor([5]), torch.tensor([1]))


# --- sliding window ------------------------------------------------------------------------------

def test_window_starts_cover_every_pixel_and_end_flush():
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]
    assert window_starts(1100, 512, 341) == [0, 341, 588]
    for length in range(1, 200):
        starts = window_starts(length, 32, 21)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + 32] = True
        assert covered.all()
        assert starts[-1] == max(0, length - 32)
        assert all(b - a <= 21 for a, b in zip(starts, starts[1:]))


def test_resize_keeps_the_ratio_and_caps_the_long_side():
    s = SlideSettings.for_crop(512)
    assert (s.short_side, s.crop, s.stride) == (512, 512, 341)
    assert s.resized(375, 500) == (512, 683)
    assert s.resized(100, 1000) == (205, 2048)  # long side capped at 4x the short side
    with pytest.raises(ValueError, match="exceeds the crop"):
        SlideSettings.for_crop(64, stride=65)


def _reference_slide(predict, image, settings):
    """The sliding window one window at a time, without batching."""
    _, h, w = image.shape
    total, count = None, torch.zeros(h, w)
    for y in window_starts(h, settings.crop, settings.stride):
        for x in window_starts(w, settings.crop, settings.stride):
            window = image[:, y:y + settings.crop, x:x + settings.crop]
            wh, ww = window.shape[1:]
            for flip in ((False, True) if settings.flip else (False,)):
                padded = torch.zeros(1, 3, settings.crop, settings.crop)
                padded[0, :, :wh, :ww] = window.flip(-1) if flip else window
                out = predict(padded)[0, :, :wh, :ww]
                out = out.flip(-1) if flip else out
                total = torch.zeros(out.shape[0], h, w) if total is None else total
                total[:, y:y + wh, x:x + ww] += out
                count[y:y + wh, x:x + ww] += 1
    return total / count


def _window_dependent(windows):
    """Logits that depend on the whole window, so stitching mistakes change the result."""
    scale = windows.mean(dim=(1, 2, 3), keepdim=True)
    return torch.cat([windows * scale, windows.roll(1, dims=-1)], dim=1)  # 6 "classes"


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_sliding_window_equals_one_window_at_a_time(flip, batch_size):
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((40, 75), (32, 32), (20, 50), (70, 33))]
    settings = SlideSettings(short_side=32, crop=32, stride=21, flip=flip, batch_size=batch_size)
    slider = SlidingWindowSegmenter(_window_dependent, settings)
    out = list(slider.run((i, image) for i, image in enumerate(images)))
    assert [i for i, _ in out] == [0, 1, 2, 3]  # input order, whatever the batching
    for (i, logits), image in zip(out, images):
        assert logits.shape == (6, *image.shape[1:])
        torch.testing.assert_close(logits, _reference_slide(_window_dependent, image, settings))


def test_identity_model_gives_back_the_image():
    image = torch.randn(3, 45, 77)
    settings = SlideSettings(short_side=32, crop=32, stride=13, flip=True, batch_size=5)
    [(_, logits)] = SlidingWindowSegmenter(lambda w: w, settings).run([("x", image)])
    torch.testing.assert_close(logits, image)


def test_background_is_a_threshold_on_the_best_class():
    logits = torch.tensor([[[3.0, -3.0], [0.1, -5.0]],
                           [[-2.0, 2.0], [-1.0, -4.0]]])  # [K=2, 2, 2]
    labels = logits_to_labels(logits, (2, 2), background=True, threshold=0.5)
    assert labels.tolist() == [[1, 2], [1, 0]]  # sigmoid(0.1) > 0.5 > sigmoid(-4)
    # sigmoid(3) = 0.95 passes 0.9, sigmoid(2) = 0.88 does not.
    assert logits_to_labels(logits, (2, 2), background=True, threshold=0.9).tolist() == [[1, 0], [0, 0]]
    assert logits_to_labels(logits, (2, 2), background=False, threshold=0.5).tolist() == [[0, 1], [0, 1]]
    assert logits_to_labels(logits, (4, 6), background=False, threshold=0.5).shape == (4, 6)


# --- dataset layouts -----------------------------------------------------------------------------

def _image(path: Path, h: int, w: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def _labels(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:  # VOC ships palette PNGs: the pixel values are palette indices
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    image.save(path)


SIZES = [(37, 50), (48, 30), (21, 21)]


def write_layout(root: Path, name: str, seed: int = 0, label_fn=None) -> dict[str, np.ndarray]:
    """A small dataset in `name`'s standard layout; returns the raw label maps by id.

    `label_fn(rng, h, w)` gives raw label values (as stored in the files); by default random
    values over the layout's range, with some ignore/unlabelled pixels."""
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[name]
    top = {"voc": 20, "context": 59, "coco-stuff": 170, "coco-object": 80}[name]
    raw = {}
    ids = [f"{1000 + i:06d}" for i in range(len(SIZES))]
    for i, (h, w) in zip(ids, SIZES):
        labels = label_fn(rng, h, w) if label_fn else rng.integers(0, top + 1, (h, w))
        if label_fn is None:
            labels[0, :] = 255
        raw[i] = labels
        _image(root / layout.image_dir.format(split="val") / f"{i}.jpg", h, w, rng)
        _labels(root / layout.label_dir.format(split="val") / f"{i}{layout.label_suffix}", labels,
                palette=name == "voc")
    if layout.split_file:
        split = root / layout.split_file.format(split="val")
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
    return raw


@pytest.mark.parametrize("name,classes,background", [
    ("voc", 21, True), ("context", 59, False), ("coco-stuff", 171, False), ("coco-object", 81, True)])
def test_each_layout_reads_ids_and_maps_labels(tmp_path, name, classes, background):
    raw = write_layout(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert [s.id for s in data.samples] == sorted(raw)
    assert data.num_classes == classes and data.background == background
    assert len(data.scored_names) == classes
    for sample in data.samples:
        labels = data.read_labels(sample)
        original = raw[sample.id]
        if name == "context":  # 0 is unlabelled; 1..59 become 0..58
            expected = np.where(original == 0, IGNORE_LABEL, original - 1)
            expected[original == 255] = IGNORE_LABEL
        else:
            expected = original
        np.testing.assert_array_equal(labels, expected)


def test_root_may_be_a_folder_above_the_layout(tmp_path):
    write_layout(tmp_path / "VOCdevkit" / "VOC2012", "voc")
    assert load_dataset("voc", tmp_path).root == tmp_path / "VOCdevkit" / "VOC2012"
    write_layout(tmp_path / "coco_stuff164k", "coco-stuff")
    assert load_dataset("coco-stuff", tmp_path).root == tmp_path / "coco_stuff164k"


def test_layout_mistakes_are_one_clear_line(tmp_path):
    write_layout(tmp_path / "voc", "voc")
    with pytest.raises(UsageError, match=r"not a PASCAL Context 59 layout: expected JPEGImages/, "
                                         r"SegmentationClassContext/"):
        load_dataset("context", tmp_path / "voc")
    with pytest.raises(UsageError, match="no 'train' split"):
        load_dataset("voc", tmp_path / "voc", split="train")
    with pytest.raises(UsageError, match="is not a folder"):
        load_dataset("voc", tmp_path / "nowhere")
    (tmp_path / "voc" / "SegmentationClass" / "001001.png").unlink()
    with pytest.raises(UsageError, match=r"1 of 3 PASCAL VOC 2012 val samples lack a file \(e.g. .*001001.png\)"):
        load_dataset("voc", tmp_path / "voc")


def test_a_generate_run_given_as_root_says_how_to_make_a_dataset_of_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"masks": {"source": "attention"}}}))
    with pytest.raises(UsageError, match=r"is a run written by generate, not a dataset; export it first "
                                         r"\(magicseg-engine export --data .* --format mmseg"):
        load_dataset("mmseg", run)


def test_labels_beyond_the_classes_name_the_fix(tmp_path):
    write_layout(tmp_path, "voc", label_fn=lambda rng, h, w: np.full((h, w), 3))
    data = load_dataset("voc", tmp_path, class_names=["a", "b"])
    with pytest.raises(UsageError, match=r"holds label 3, beyond the 2 classes.*--classes"):
        data.read_labels(data.samples[0])


# --- the command, end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model after two pretraining steps: untrained, but a real checkpoint."""
    from magicseg_engine.train.loop import load_pretrain_preset, pretrain
    from magicseg_engine.train.synthetic import write_synthetic_run

    base = tmp_path_factory.mktemp("eval-ckpt")
    write_synthetic_run(base / "data", 8, size=64, seed=3)
    config = load_pretrain_preset("tiny", {"steps": 2, "checkpoint_every": 2, "batch_size": 4})
    pretrain(config, base / "data", base / "out")
    return base / "out"


def _torchmetrics_miou(data, predictions: Path) -> tuple[float, torch.Tensor]:
    metric = MulticlassJaccardIndex(num_classes=data.num_classes, ignore_index=IGNORE_LABEL, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=data.num_classes, ignore_index=IGNORE_LABEL, average="none")
    for sample in data.samples:
        predicted = torch.from_numpy(np.array(Image.open(predictions / f"{sample.id}.png"))).long()
        target = torch.from_numpy(data.read_labels(sample))
        assert predicted.shape == target.shape
        metric.update(predicted, target)
        per_class.update(predicted, target)
    return float(metric.compute()), per_class.compute()


@pytest.mark.parametrize("name", ["voc", "context", "coco-stuff", "coco-object"])
def test_evaluate_runs_on_each_layout_and_matches_torchmetrics(checkpoint, tmp_path, name):
    write_layout(tmp_path / "data", name)
    out = tmp_path / "result.json"
    result = invoke("evaluate", "--checkpoint", checkpoint, "--dataset", name, "--root", tmp_path / "data",
                    "--json", out, "--save-predictions", tmp_path / "pred", "--workers", 0,
                    "--device", "cpu", "--stride", 24)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    data = load_dataset(name, tmp_path / "data")
    assert saved["images"] == 3 and saved["classes"] == data.num_classes and saved["step"] == 2
    assert list(saved["iou"]) == data.scored_names
    expected, per_class = _torchmetrics_miou(data, tmp_path / "pred")
    assert saved["miou"] == pytest.approx(expected, abs=1e-6)
    for i, name_ in enumerate(data.scored_names):
        if saved["iou"][name_] is not None:
            assert saved["iou"][name_] == pytest.approx(float(per_class[i]), abs=1e-6)
    assert "mIoU" in result.output


def test_evaluate_defaults_save_beside_the_checkpoint_and_report_seen_unseen(checkpoint, tmp_path):
    write_layout(tmp_path / "data", "voc")
    result = invoke("evaluate", "--checkpoint", checkpoint, "--dataset", "voc", "--root", tmp_path / "data",
                    "--unseen", "sheep,sofa, TV monitor", "--flip", "--workers", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((checkpoint / "eval" / "voc-val-step2.json").read_text())
    assert saved["unseen"] == ["sheep", "sofa", "tv monitor"]
    assert saved["harmonic_miou"] == pytest.approx(harmonic_mean(saved["seen_miou"], saved["unseen_miou"]))
    assert saved["settings"]["flip"] is True and saved["settings"]["crop"] == 64
    assert "hIoU" in result.output


@pytest.mark.parametrize("args,message", [
    (["--dataset", "context"], "is not a PASCAL Context 59 layout"),
    (["--dataset", "voc", "--unseen", "dragon"], "--unseen names 'dragon'"),
    (["--dataset", "voc", "--stride", "100"], "stride 100 exceeds the crop 64"),
    (["--dataset", "voc", "--crop", "60"], "not a multiple of the model's patch size 8"),
    (["--dataset", "voc", "--bg-threshold", "1.5"], "--bg-threshold 1.5"),
])
def test_evaluate_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, args, message):
    write_layout(tmp_path / "data", "voc")
    out = tmp_path / "result.json"
    result = invoke("evaluate", "--checkpoint", checkpoint, "--root", tmp_path / "data", "--json", out,
                    "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_evaluate_refuses_a_folder_without_checkpoints(tmp_path):
    write_layout(tmp_path / "data", "voc")
    result = invoke("evaluate", "--checkpoint", tmp_path, "--dataset", "voc", "--root", tmp_path / "data")
    assert result.exit_code == 2
    assert "holds no checkpoints/step-*.pt" in result.output


@pytest.mark.slow
def test_shapes_model_scores_well_through_a_benchmark_layout(shapes_model, tmp_path):
    """The pretrained shapes model, evaluated like a benchmark: held-out shape images written in
    the VOC layout with the model's vocabulary as --classes, at another size than trained."""
    from magicseg_engine.train.loop import checkpoint_paths, load_checkpoint
    from magicseg_engine.train.synthetic import render_sample

    vocabulary = load_checkpoint(checkpoint_paths(shapes_model)[-1][1])["vocabulary"]
    root = tmp_path / "VOC2012"
    rng = np.random.default_rng(7)
    ids = []
    for n in range(24):
        names = [vocabulary[i] for i in rng.choice(len(vocabulary), size=int(rng.integers(1, 3)), replace=False)]
        image, _, local = render_sample(rng, names, 96)
        labels = np.zeros_like(local)
        for j, name in enumerate(names, 1):
            labels[local == j] = vocabulary.index(name) + 1
        ids.append(f"shape{n:03d}")
        _image(root / "JPEGImages" / f"{ids[-1]}.jpg", 1, 1, rng)
        Image.fromarray(image).save(root / "JPEGImages" / f"{ids[-1]}.jpg", quality=95)
        _labels(root / "SegmentationClass" / f"{ids[-1]}.png", labels)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids))
    (tmp_path / "classes.txt").write_text("\n".join(vocabulary) + "\n")

    out = tmp_path / "shapes.json"
    result = invoke("evaluate", "--checkpoint", shapes_model, "--dataset", "voc", "--root", tmp_path,
                    "--classes", tmp_path / "classes.txt", "--json", out, "--device", "cpu", "--workers", 0)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["classes"] == len(vocabulary) + 1
    assert saved["miou"] > 0.5, saved["iou"]
    assert min(saved["iou"].values()) > 0.3, saved["iou"]
