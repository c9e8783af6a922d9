"""The evaluation readers on small samples made to each benchmark's published layout and encoding.

Samples here follow the datasets as distributed (or as the usual mmsegmentation conversion
scripts write them), not the readers' own assumptions; each spec fact used is stated where it
is used. Then odd files: stray and hidden files, wrong image modes, mismatched sizes, missing
halves of pairs, broken split files. Each is read, skipped and counted, or refused in one line
(UsageError; exit code 2 from the command).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.errors import UsageError
from magicseg_engine.evaluate.datasets import IGNORE_LABEL, load_dataset
from magicseg_engine.evaluate.inference import SlideSettings
from magicseg_engine.evaluate.run import EvalSettings, Segmenter, evaluate
from magicseg_engine.train.loop import load_pretrain_preset
from magicseg_engine.train.model import MagicSegModel


def voc_colormap() -> list[int]:
    """PASCAL VOC's palette, as its devkit builds it (VOClabelcolormap): the bits of label i
    are dealt to the red, green and blue channels in turn, from the top bit down. Label 1 is
    (128, 0, 0), 15 (person) (192, 128, 128), 255 (void) (224, 224, 192)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_jpeg(path: Path, h: int, w: int, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, quality=90)


def write_png(path: Path, values: np.ndarray, mode: str = "L", palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), "L")
    if mode == "P":
        image = Image.frombytes("P", image.size, image.tobytes())  # the values are the indices
        image.putpalette(palette)
    image.save(path)


# --- PASCAL VOC 2012 ------------------------------------------------------------------------------

VOC_IDS = ["2007_000033", "2007_000042", "2008_000005"]


def make_voc(root: Path) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 as distributed: JPEGImages/{id}.jpg for every image of every task (far
    more than are segmented), SegmentationClass/{id}.png for the segmented ones as 8-bit palette
    PNGs (index 0 background, 1..20 the classes from aeroplane to tvmonitor, 255 'void' drawn
    along object borders, in the devkit's colour map), SegmentationObject/{id}.png (instance
    numbers, not classes), and ImageSets/Segmentation/{train,val,trainval}.txt, one id a line."""
    voc = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for n, i in enumerate(VOC_IDS):
        h, w = 30 + 4 * n, 40
        raw = np.zeros((h, w), np.uint8)
        raw[5:20, 8:30] = 15  # a person
        raw[4, 8:30] = raw[20, 8:30] = 255  # its void border
        raw[22:, :10] = 1 + n  # aeroplane, bicycle, bird
        raw[0, 0] = 20  # tvmonitor, the last class
        labels[i] = raw
        write_jpeg(voc / "JPEGImages" / f"{i}.jpg", h, w, seed=n)
        write_png(voc / "SegmentationClass" / f"{i}.png", raw, "P", voc_colormap())
        instances = np.where(raw == 15, 1, np.where(raw == 255, 255, 0))  # object numbers
        write_png(voc / "SegmentationObject" / f"{i}.png", instances, "P", voc_colormap())
    write_jpeg(voc / "JPEGImages" / "2007_000027.jpg", 20, 20, seed=9)  # a detection-only image
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("\n".join(VOC_IDS) + "\n")
    (sets / "train.txt").write_text("2007_000027\n")  # no label: never read for val
    return labels


def test_voc_palette_pngs_give_their_indices(tmp_path):
    labels = make_voc(tmp_path)
    data = load_dataset("voc", tmp_path)  # the folder above VOCdevkit/ is accepted
    assert data.root == tmp_path / "VOCdevkit" / "VOC2012"
    assert [s.id for s in data.samples] == VOC_IDS  # the split list, not every JPEG
    # 21 scored classes: background first, then the 20 in the devkit's order.
    assert data.num_classes == 21 and data.scored_names[:3] == ["background", "aeroplane", "bicycle"]
    assert data.scored_names[15] == "person" and data.scored_names[20] == "tv monitor"
    for sample in data.samples:
        got = data.read_labels(sample)
        raw = labels[sample.id]
        # The palette indices, not the colours: person (192, 128, 128) is 15, void 255 is ignored.
        np.testing.assert_array_equal(got, np.where(raw == 255, IGNORE_LABEL, raw))
        assert got[10, 10] == 15 and got[4, 10] == IGNORE_LABEL and got[0, 0] == 20


def test_voc_split_file_written_on_windows_is_read(tmp_path):
    make_voc(tmp_path)
    val = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    # A byte-order mark, CRLF line ends, stray spaces and a blank line.
    val.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(f" {i} ".encode() for i in VOC_IDS) + b"\r\n\r\n")
    assert [s.id for s in load_dataset("voc", tmp_path).samples] == VOC_IDS


def test_voc_grey_label_pngs_read_the_same(tmp_path):
    """Converted copies (SegmentationClassAug and the like) store the same values as 8-bit grey."""
    labels = make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i, raw in labels.items():
        write_png(voc / "SegmentationClass" / f"{i}.png", raw, "L")
    data = load_dataset("voc", tmp_path)
    for sample in data.samples:
        raw = labels[sample.id]
        np.testing.assert_array_equal(data.read_labels(sample), np.where(raw == 255, IGNORE_LABEL, raw))


# --- PASCAL Context 59 ------------------------------------------------------------------------------

def make_context(root: Path) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2010 after mmsegmentation's pascal_context converter: JPEGImages/{id}.jpg,
    SegmentationClassContext/{id}.png as 8-bit grey with 0 for everything outside the 59 classes
    and 1..59 the classes in alphabetical order (aeroplane ... wood), and
    ImageSets/SegmentationContext/{train,val}.txt. The 59-class benchmark ignores 0."""
    voc = root / "VOCdevkit" / "VOC2010"
    ids = ["2008_000002", "2008_000003"]
    labels = {}
    for n, i in enumerate(ids):
        raw = np.zeros((24, 32), np.uint8)
        raw[:8] = 47  # sky
        raw[8:16] = 37  # person
        raw[16:, :16] = 1  # aeroplane
        raw[16:, 16:] = 59 if n == 0 else 0  # wood, or outside the 59
        labels[i] = raw
        write_jpeg(voc / "JPEGImages" / f"{i}.jpg", 24, 32, seed=n)
        write_png(voc / "SegmentationClassContext" / f"{i}.png", raw)
    sets = voc / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("\n".join(ids) + "\n")
    return labels


def test_context_59_ignores_zero_and_shifts_the_classes(tmp_path):
    labels = make_context(tmp_path)
    data = load_dataset("context", tmp_path)
    assert data.num_classes == 59 and not data.background
    names = [n.replace(" ", "") for n in data.scored_names]
    assert names == sorted(names)  # the 59 are in alphabetical order
    assert names[0] == "aeroplane" and names[36] == "person" and names[46] == "sky" and names[58] == "wood"
    for sample in data.samples:
        raw = labels[sample.id]
        got = data.read_labels(sample)
        np.testing.assert_array_equal(got, np.where(raw == 0, IGNORE_LABEL, raw.astype(np.int64) - 1))
        assert data.scored_names[got[10, 0]] == "person" and data.scored_names[got[0, 0]] == "sky"


# --- COCO-Stuff 164k and COCO-Object ---------------------------------------------------------------

COCO_IDS = ["000000000139", "000000000285", "000000000632"]


def make_coco(root: Path, suffix: str, values: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """coco_stuff164k as mmsegmentation lays it out: images/val2017/{12-digit id}.jpg (COCO holds
    some greyscale JPEGs: one here is), annotations/val2017/{id}.png the released stuffthingmaps
    (0..181 with gaps, 255 unlabelled), and beside each the converted map: {id}_labelTrainIds.png
    (COCO-Stuff 171: 0..79 things, 80..170 stuff, 255 unlabelled) or {id}_instanceTrainIds.png
    (COCO-Object: 0 background, 1..80 things, 255 ignored)."""
    coco = root / "coco_stuff164k"
    labels = {}
    for n, i in enumerate(COCO_IDS):
        h, w = 26 + n, 34
        raw = values[i] if values else np.zeros((h, w), np.uint8)
        labels[i] = raw
        write_jpeg(coco / "images" / "val2017" / f"{i}.jpg", *raw.shape, seed=n, mode="L" if n == 1 else "RGB")
        write_png(coco / "annotations" / "val2017" / f"{i}{suffix}", raw)
        # The raw stuffthingmap: values up to 181, which no converted map holds.
        write_png(coco / "annotations" / "val2017" / f"{i}.png", np.full(raw.shape, 181))
    return labels


def _stuff_values() -> dict[str, np.ndarray]:
    out = {}
    for n, i in enumerate(COCO_IDS):
        raw = np.full((26 + n, 34), 255, np.uint8)  # unlabelled
        raw[:10] = 0  # person, the first thing
        raw[10:20, :17] = 80  # banner, the first stuff class
        raw[10:20, 17:] = 170  # wood, the last
        raw[20:, :5] = 79  # toothbrush, the last thing
        out[i] = raw
    return out


def test_coco_stuff_171_reads_label_train_ids_beside_the_raw_maps(tmp_path):
    labels = make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    data = load_dataset("coco-stuff", tmp_path)
    assert [s.id for s in data.samples] == COCO_IDS
    assert data.num_classes == 171 and not data.background
    assert data.scored_names[0] == "person" and data.scored_names[79] == "toothbrush"
    assert data.scored_names[80] == "banner" and data.scored_names[170] == "wood"
    for sample in data.samples:
        assert sample.label.name.endswith("_labelTrainIds.png")
        np.testing.assert_array_equal(data.read_labels(sample), labels[sample.id])  # 255 stays ignored


def test_coco_object_scores_background_and_80_things(tmp_path):
    values = {}
    for n, i in enumerate(COCO_IDS):
        raw = np.zeros((26 + n, 34), np.uint8)  # background: stuff and unlabelled alike
        raw[5:15, 5:15] = 1  # person
        raw[15:20, 20:30] = 80  # toothbrush
        raw[0, :] = 255
        values[i] = raw
    labels = make_coco(tmp_path, "_instanceTrainIds.png", values)
    data = load_dataset("coco-object", tmp_path)
    assert data.num_classes == 81 and data.background
    assert data.scored_names[:2] == ["background", "person"] and data.scored_names[80] == "toothbrush"
    for sample in data.samples:
        np.testing.assert_array_equal(data.read_labels(sample), labels[sample.id])


# --- evaluation reads the images too: greyscale JPEGs, sizes, modes ---------------------------------

@pytest.fixture(scope="module")
def segmenter():
    """An untrained tiny model: what is scored does not matter here, only what is read."""
    config = load_pretrain_preset("tiny")
    torch.manual_seed(0)
    return Segmenter(MagicSegModel(config.model).eval(), Path("untrained.pt"), 0, None)


def _settings(segmenter) -> EvalSettings:
    return EvalSettings(SlideSettings.for_crop(segmenter.model.config.image_size), num_workers=0)


def test_coco_greyscale_images_are_evaluated(tmp_path, segmenter):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    data = load_dataset("coco-stuff", tmp_path)
    assert Image.open(data.samples[1].image).mode == "L"
    result = evaluate(segmenter, data, _settings(segmenter))
    assert result["images"] == 3 and result["skipped_hidden_files"] == 0
    # Every labelled pixel was scored: 255 is left out, nothing else.
    expected = sum(int((data.read_labels(s) != IGNORE_LABEL).sum()) for s in data.samples)
    assert result["pixels"] == expected


def test_a_label_of_another_size_than_its_image_is_one_line(tmp_path, segmenter):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    label = tmp_path / "coco_stuff164k" / "annotations" / "val2017" / f"{COCO_IDS[2]}_labelTrainIds.png"
    good = label.read_bytes()
    write_png(label, np.zeros((27, 34)))  # its image is 28 x 34
    message = r"_labelTrainIds.png is 34x27 but its image is 34x28$"
    with pytest.raises(UsageError, match=message):  # found from the headers, before any inference
        load_dataset("coco-stuff", tmp_path)
    # A file changed after loading is caught when it is decoded, with the same line.
    label.write_bytes(good)
    data = load_dataset("coco-stuff", tmp_path)
    write_png(label, np.zeros((27, 34)))
    with pytest.raises(UsageError, match=message):
        evaluate(segmenter, data, _settings(segmenter))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "I;16", "1"])
def test_labels_in_other_modes_are_refused_not_guessed(tmp_path, mode):
    """A VOC label re-saved as colours (RGB), with alpha, 16-bit or 1-bit holds no label values."""
    make_voc(tmp_path)
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{VOC_IDS[0]}.png"
    good = path.read_bytes()
    with Image.open(path) as image:
        converted = image.convert("RGB").convert(mode) if mode != "I;16" else Image.new("I;16", image.size)
    converted.save(path)
    message = rf"{VOC_IDS[0]}.png has image mode {mode}; PASCAL VOC 2012 labels are 8-bit label PNGs"
    with pytest.raises(UsageError, match=message):
        load_dataset("voc", tmp_path)
    path.write_bytes(good)
    data = load_dataset("voc", tmp_path)
    converted.save(path)
    with pytest.raises(UsageError, match=message):
        data.read_labels(data.samples[0])


def _damage(path: Path, damage: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not an image": b"hello"}[damage])


@pytest.mark.parametrize("damage", ["empty", "truncated", "not an image"])
def test_damaged_labels_are_one_line(tmp_path, damage):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    _damage(tmp_path / "coco_stuff164k" / "annotations" / "val2017" / f"{COCO_IDS[0]}_labelTrainIds.png", damage)
    message = r"cannot read label file .*_labelTrainIds.png"
    if damage != "truncated":  # no header to read
        with pytest.raises(UsageError, match=message):
            load_dataset("coco-stuff", tmp_path)
        return
    data = load_dataset("coco-stuff", tmp_path)  # the header is whole; the pixels are not
    with pytest.raises(UsageError, match=message):
        data.read_labels(data.samples[0])


@pytest.mark.parametrize("damage", ["empty", "truncated", "not an image"])
def test_damaged_images_are_one_line(tmp_path, segmenter, damage):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    _damage(tmp_path / "coco_stuff164k" / "images" / "val2017" / f"{COCO_IDS[1]}.jpg", damage)
    message = rf"cannot read image .*{COCO_IDS[1]}.jpg"
    if damage != "truncated":
        with pytest.raises(UsageError, match=message):
            load_dataset("coco-stuff", tmp_path)
        return
    data = load_dataset("coco-stuff", tmp_path)
    with pytest.raises(UsageError, match=message):
        evaluate(segmenter, data, _settings(segmenter))


# --- stray and missing files ------------------------------------------------------------------------

def test_stray_files_are_left_alone_and_hidden_ones_counted(tmp_path):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    folder = tmp_path / "coco_stuff164k"
    images, annotations = folder / "images" / "val2017", folder / "annotations" / "val2017"
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (images / "Thumbs.db").write_bytes(b"\0")
    (images / "README.txt").write_text("val2017\n")
    (images / f"._{COCO_IDS[0]}.jpg").write_bytes(b"\0\5\26\7")  # macOS's resource copy of an image
    (annotations / f"._{COCO_IDS[0]}_labelTrainIds.png").write_bytes(b"\0\5\26\7")
    (annotations / "notes.md").write_text("converted with mmseg\n")
    data = load_dataset("coco-stuff", tmp_path)
    assert [s.id for s in data.samples] == COCO_IDS
    assert data.skipped_hidden == 2


def test_an_image_without_its_label_is_one_line(tmp_path):
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    (tmp_path / "coco_stuff164k" / "annotations" / "val2017" / f"{COCO_IDS[1]}_labelTrainIds.png").unlink()
    with pytest.raises(UsageError, match=rf"1 of 3 COCO-Stuff 171 val samples lack a file \(e.g. .*"
                                         rf"{COCO_IDS[1]}_labelTrainIds.png\); the dataset is incomplete"):
        load_dataset("coco-stuff", tmp_path)


def test_a_label_without_its_image_is_one_line(tmp_path):
    """A partial copy of the images is not scored on what is left."""
    make_coco(tmp_path, "_labelTrainIds.png", _stuff_values())
    (tmp_path / "coco_stuff164k" / "images" / "val2017" / f"{COCO_IDS[2]}.jpg").unlink()
    with pytest.raises(UsageError, match=rf"1 COCO-Stuff 171 val label files have no image \(e.g. .*"
                                         rf"{COCO_IDS[2]}_labelTrainIds.png has no .*{COCO_IDS[2]}.jpg\)"):
        load_dataset("coco-stuff", tmp_path)


@pytest.mark.parametrize("content,message", [
    (b"2007_000033\n2007_000042\n2007_000033\n", r"lists '2007_000033' more than once"),
    (b"2007_000033\n\xff\xfe2007\n", r"val.txt is not UTF-8 text \(byte 12\)"),
    (b"2007_000033.jpg\n", r"1 of 1 PASCAL VOC 2012 val samples lack a file \(e.g. .*2007_000033.jpg.jpg\)"),
    (b"\n \n", r"holds no PASCAL VOC 2012 val samples"),
])
def test_broken_split_files_are_one_line(tmp_path, content, message):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_dataset("voc", tmp_path)


def test_mmseg_class_file_that_is_not_text_is_one_line(tmp_path):
    root = tmp_path / "export"
    write_jpeg(root / "img_dir" / "val" / "a.jpg", 8, 8, seed=0)
    write_png(root / "ann_dir" / "val" / "a.png", np.zeros((8, 8)))
    (root / "classes.txt").write_bytes(b"background\n\xc3\x28dog\n")
    with pytest.raises(UsageError, match=r"classes.txt is not UTF-8 text"):
        load_dataset("mmseg", root)


# --- the command: exit code 2 and one line -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint file of an untrained tiny model, as pretrain writes it (no training needed)."""
    from magicseg_engine.train.loop import CHECKPOINT_FORMAT, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt")
    config = load_pretrain_preset("tiny")
    torch.manual_seed(0)
    state = {"format": CHECKPOINT_FORMAT, "step": 1, "config": config.model_dump(mode="json"),
             "vocabulary": ["a"], "model": MagicSegModel(config.model).state_dict()}
    return save_checkpoint(out, 1, state, keep=1)


@pytest.mark.parametrize("break_it,message", [
    (lambda voc: (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000033\n"),
     "more than once"),
    (lambda voc: Image.new("RGB", (40, 30)).save(voc / "SegmentationClass" / "2007_000033.png"),
     "has image mode RGB"),
    (lambda voc: write_png(voc / "SegmentationClass" / "2007_000042.png", np.zeros((10, 10))),
     "is 10x10 but its image is 40x34"),
    (lambda voc: (voc / "JPEGImages" / "2008_000005.jpg").unlink(), "lack a file"),
])
def test_evaluate_command_refuses_in_one_line(tmp_path, checkpoint, break_it, message):
    make_voc(tmp_path / "data")
    break_it(tmp_path / "data" / "VOCdevkit" / "VOC2012")
    out = tmp_path / "result.json"
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--dataset", "voc",
                                      "--root", str(tmp_path / "data"), "--json", str(out), "--workers", "0",
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_evaluate_command_reads_the_published_voc_layout(tmp_path, checkpoint):
    make_voc(tmp_path / "data")
    out = tmp_path / "result.json"
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--dataset", "voc",
                                      "--root", str(tmp_path / "data"), "--json", str(out), "--workers", "0",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["images"] == 3 and saved["classes"] == 21
    voc = load_dataset("voc", tmp_path / "data")
    assert saved["pixels"] == sum(int((voc.read_labels(s) != IGNORE_LABEL).sum()) for s in voc.samples)
