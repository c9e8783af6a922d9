"""Readers for the standard zero-shot segmentation benchmarks, in the layouts people already have.

Each reader turns a dataset root into a list of (image, label file) pairs and a class list,
and decodes a label PNG into evaluation labels: 0..C-1 for the C scored classes (with
background as class 0 where the dataset scores it) and IGNORE_LABEL for pixels no metric
counts. The layouts are those of the usual conversion scripts:

| dataset     | root holds                                                      | label values                  |
|-------------|-----------------------------------------------------------------|-------------------------------|
| voc         | JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{split}.txt | 0 background, 1..20, 255 border |
| context     | JPEGImages/, SegmentationClassContext/, ImageSets/SegmentationContext/{split}.txt | 0 unlabelled (ignored), 1..59 |
| coco-stuff  | images/{split}2017/*.jpg, annotations/{split}2017/*_labelTrainIds.png | 0..170, 255 unlabelled   |
| coco-object | images/{split}2017/*.jpg, annotations/{split}2017/*_instanceTrainIds.png | 0 background, 1..80, 255 |
| mmseg       | img_dir/{split}/*.jpg, ann_dir/{split}/*.png, classes.txt (background first) | 0 background, 1..N, 255 |

`mmseg` is the ADE20K-style layout of mmsegmentation's custom datasets, as `magicseg-engine
export --format mmseg` writes it; its class names come from its `classes.txt`.

VOC and COCO-Object score background as a class (the model predicts it by a threshold on its
top class score); PASCAL Context 59 and COCO-Stuff 171 leave unlabelled pixels out. A root
may also be a folder above the layout (`VOCdevkit/`, its parent, `coco_stuff164k/`'s parent).

Label PNGs hold the label values themselves: 8-bit grey ("L") or palette ("P", as VOC ships
them: the palette indices are the labels, the colours only show them). Any other mode (RGB
colour-coded labels, 16-bit) is refused in one line rather than guessed at.

What is read, and what is refused (UsageError, one line, before any inference):
- layouts with a split file read exactly the ids it lists (blank lines, surrounding spaces,
  CRLF line ends and a UTF-8 byte-order mark are allowed); an id listed twice, an unreadable or
  non-UTF-8 list, and a listed id without its image or label file are refused;
- layouts without one (COCO, mmseg) read every image in the image folder, each of which must
  have its label file, and every label file must have its image (a partial copy of either
  folder is refused, not scored on what is left); files of other names beside them (the raw
  COCO-Stuff maps next to `*_labelTrainIds.png`, notes, thumbnails) are left alone, and hidden
  files (names starting with "."; macOS's `._*` copies) are skipped and counted in
  `EvalDataset.skipped_hidden`;
- each image's and label's header is read when the dataset is loaded: a label of another mode,
  a label of another size than its image, and a file that is not an image are refused then;
  a label value beyond the classes and a file damaged past its header are refused when
  evaluation decodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from magicseg_engine.errors import UsageError
from magicseg_engine.vocab import load_vocabulary

IGNORE_LABEL = 255


@dataclass(frozen=True)
class Layout:
    """Where one benchmark keeps its files, and how its label values map to scored classes."""

    name: str
    title: str
    vocabulary: str  # the shipped class list, in label order ("" for layouts that carry their own)
    background: bool  # label 0 is background and is scored as class 0
    zero_is_ignored: bool  # label 0 is unlabelled: ignored, and labels shift down by one
    image_dir: str
    label_dir: str
    label_suffix: str
    image_suffix: str = ".jpg"
    split_file: str | None = None  # a list of ids; None: every image (each must have its label file)
    # Folders under a given root where the layout is also looked for.
    nested: tuple[str, ...] = ()
    # A file in the root naming the classes in label order, background first (replaces `vocabulary`).
    class_file: str | None = None

    def describe(self, split: str) -> str:
        parts = [self.image_dir.format(split=split) + "/", self.label_dir.format(split=split) + "/"]
        if self.split_file:
            parts.append(self.split_file.format(split=split))
        return ", ".join(parts)


LAYOUTS: dict[str, Layout] = {
    "voc": Layout(
        "voc", "PASCAL VOC 2012", "voc", background=True, zero_is_ignored=False,
        image_dir="JPEGImages", label_dir="SegmentationClass", label_suffix=".png",
        split_file="ImageSets/Segmentation/{split}.txt", nested=("VOC2012", "VOCdevkit/VOC2012"),
    ),
    "context": Layout(
        "context", "PASCAL Context 59", "context", background=False, zero_is_ignored=True,
        image_dir="JPEGImages", label_dir="SegmentationClassContext", label_suffix=".png",
        split_file="ImageSets/SegmentationContext/{split}.txt", nested=("VOC2010", "VOCdevkit/VOC2010"),
    ),
    "coco-stuff": Layout(
        "coco-stuff", "COCO-Stuff 171", "coco-stuff", background=False, zero_is_ignored=False,
        image_dir="images/{split}2017", label_dir="annotations/{split}2017", label_suffix="_labelTrainIds.png",
        nested=("coco_stuff164k", "coco"),
    ),
    "coco-object": Layout(
        "coco-object", "COCO-Object 80", "coco-object", background=True, zero_is_ignored=False,
        image_dir="images/{split}2017", label_dir="annotations/{split}2017", label_suffix="_instanceTrainIds.png",
        nested=("coco_stuff164k", "coco"),
    ),
    "mmseg": Layout(
        "mmseg", "mmsegmentation (img_dir/ann_dir)", "", background=True, zero_is_ignored=False,
        image_dir="img_dir/{split}", label_dir="ann_dir/{split}", label_suffix=".png", class_file="classes.txt",
    ),
}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class EvalDataset:
    """The samples of one split and the names of the scored classes, background first where scored."""

    layout: Layout
    root: Path
    split: str
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]  # the names given to the model (without background)
    skipped_hidden: int = 0  # hidden files (".*") in the image or label folder, never samples

    @property
    def background(self) -> bool:
        return self.layout.background

    @property
    def num_classes(self) -> int:
        """Classes the metric scores: background (where scored) plus the named classes."""
        return len(self.class_names) + int(self.background)

    @property
    def scored_names(self) -> list[str]:
        return (["background"] if self.background else []) + list(self.class_names)

    def read_labels(self, sample: Sample) -> np.ndarray:
        """[H, W] int64 evaluation labels of `sample`: 0..num_classes-1 or IGNORE_LABEL."""
        return decode_labels(sample.label, self.layout, len(self.class_names))


def _check_label_mode(path: Path, mode: str, layout: Layout) -> None:
    if mode not in ("L", "P"):
        raise UsageError(f"{path} has image mode {mode}; {layout.title} labels are 8-bit label PNGs "
                         "(grey or palette images holding the label values)")


def check_headers(samples: Sequence[Sample], layout: Layout) -> None:
    """Read each sample's image and label headers (not their pixels): UsageError for a file that
    is not an image, a label of another mode, or a label of another size than its image."""
    for sample in samples:
        try:
            with Image.open(sample.label) as label:
                mode, size = label.mode, label.size
        except (OSError, SyntaxError) as err:
            raise UsageError(f"cannot read label file {sample.label}: {err}") from None
        _check_label_mode(sample.label, mode, layout)
        try:
            with Image.open(sample.image) as image:
                image_size = image.size
        except (OSError, SyntaxError) as err:
            raise UsageError(f"cannot read image {sample.image}: {err}") from None
        if size != image_size:
            raise UsageError(f"{sample.label} is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}")


def decode_labels(path: Path, layout: Layout, named_classes: int) -> np.ndarray:
    """Evaluation labels of a label PNG; UsageError for a file that is not one of `layout`."""
    try:
        with Image.open(path) as image:
            _check_label_mode(path, image.mode, layout)
            raw = np.asarray(image).astype(np.int64)  # "P": the palette indices are the labels
    except (OSError, SyntaxError) as err:
        raise UsageError(f"cannot read label file {path}: {err}") from None
    labels = raw.copy()
    if layout.zero_is_ignored:
        labels = np.where(raw == 0, IGNORE_LABEL, raw - 1)
        labels[raw == IGNORE_LABEL] = IGNORE_LABEL
    scored = named_classes + int(layout.background)
    bad = (labels >= scored) & (labels != IGNORE_LABEL)
    if bad.any():
        raise UsageError(f"{path} holds label {int(raw[bad].max())}, beyond the {named_classes} classes of "
                         f"{layout.title}; check --dataset, or pass the matching --classes file")
    return labels


def find_root(layout: Layout, root: Path, split: str) -> Path:
    """The folder under `root` (itself or a known nesting) that holds `layout`; UsageError if none."""
    candidates = [root, *(root / n for n in layout.nested)]
    for folder in candidates:
        if _holds_layout(layout, folder, split):
            return folder
    if not root.is_dir():
        raise UsageError(f"--root {root} is not a folder; point it at a {layout.title} dataset")
    _refuse_run(root)
    # A layout whose split is missing is a different mistake from a wrong root.
    marker = layout.split_file or layout.image_dir
    for folder in candidates:
        wanted = folder / marker.format(split=split)
        labels_parent = (folder / layout.label_dir.format(split=split)).parent
        if not wanted.exists() and wanted.parent.is_dir() and labels_parent.is_dir():
            raise UsageError(f"{folder} has no {marker.format(split=split)}: there is no {split!r} split; "
                             "check --split")
    where = f" (or in its {', '.join(layout.nested)})" if layout.nested else ""
    raise UsageError(f"--root {root} is not a {layout.title} layout: expected {layout.describe(split)} in it{where}")


def _refuse_run(root: Path) -> None:
    """A generate run is not a dataset layout: say how to make one of it (it needs masks first)."""
    import json
    import shlex

    try:
        saved = json.loads((root / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    config = saved.get("config") if isinstance(saved, dict) else None
    masks = config.get("masks") if isinstance(config, dict) else None
    source = masks.get("source") if isinstance(masks, dict) else None
    quoted = shlex.quote(str(root))
    if source == "none":
        raise UsageError(f"--root {root} is a run generated with --mask-source none: it has no masks to score "
                         f"against; annotate it first (magicseg-engine masks --data {quoted} "
                         f"--out {shlex.quote(str(root) + '-masks')} --mask-source detector), export that run "
                         "with export --format mmseg, and evaluate the export with --dataset mmseg")
    raise UsageError(f"--root {root} is a run written by generate, not a dataset; export it first "
                     f"(magicseg-engine export --data {quoted} --format mmseg --out {shlex.quote(str(root) + '-mmseg')}) "
                     "and evaluate the export with --dataset mmseg")


def _text_lines(path: Path, what: str) -> list[str]:
    """The non-blank, stripped lines of a UTF-8 text file (a byte-order mark allowed)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}); {what} is one name per line") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _class_file_names(path: Path) -> tuple[str, ...]:
    """The named classes of a class file whose first line is the background."""
    if not path.is_file():
        raise UsageError(f"{path.parent} has no {path.name} (the class names, background first); pass --classes")
    return tuple(_text_lines(path, "a class file")[1:])


def _split_ids(path: Path) -> list[str]:
    """The ids a split file lists, each once."""
    ids = _text_lines(path, "a split file")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UsageError(f"{path} lists {i!r} more than once; each id is one sample")
        seen.add(i)
    return ids


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _holds_layout(layout: Layout, folder: Path, split: str) -> bool:
    if not (folder / layout.image_dir.format(split=split)).is_dir():
        return False
    if not (folder / layout.label_dir.format(split=split)).is_dir():
        return False
    return layout.split_file is None or (folder / layout.split_file.format(split=split)).is_file()


def load_dataset(name: str, root: Path | str, split: str = "val", class_names: Sequence[str] | None = None,
                 limit: int | None = None) -> EvalDataset:
    """The `split` of dataset `name` under `root`, checked to be complete before any work starts.

    `class_names` replaces the shipped names given to the model (synonyms, or a dataset of your
    own in one of these layouts); the label values must then index into it. `limit` keeps the
    first `limit` samples (in id order) for a quick look.
    """
    if name not in LAYOUTS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    folder = find_root(layout, Path(root), split)
    images = folder / layout.image_dir.format(split=split)
    labels = folder / layout.label_dir.format(split=split)
    hidden = 0
    if layout.split_file:
        ids = _split_ids(folder / layout.split_file.format(split=split))
        samples = [Sample(i, images / f"{i}{layout.image_suffix}", labels / f"{i}{layout.label_suffix}")
                   for i in ids]
    else:
        found = sorted(images.glob(f"*{layout.image_suffix}"))
        label_files = sorted(labels.glob(f"*{layout.label_suffix}"))
        hidden = sum(map(_hidden, found)) + sum(map(_hidden, label_files))
        samples = [Sample(p.name[: -len(layout.image_suffix)], p,
                          labels / (p.name[: -len(layout.image_suffix)] + layout.label_suffix))
                   for p in found if not _hidden(p)]
        wanted = {s.label.name for s in samples}
        orphans = [p for p in label_files if not _hidden(p) and p.name not in wanted]
        if orphans:
            image_name = orphans[0].name[: -len(layout.label_suffix)] + layout.image_suffix
            raise UsageError(f"{len(orphans)} {layout.title} {split} label files have no image (e.g. {orphans[0]} "
                             f"has no {images / image_name}); the dataset is incomplete")
    missing = [s for s in samples if not s.image.is_file() or not s.label.is_file()]
    if missing:
        first = missing[0].image if not missing[0].image.is_file() else missing[0].label
        raise UsageError(f"{len(missing)} of {len(samples)} {layout.title} {split} samples lack a file "
                         f"(e.g. {first}); the dataset is incomplete")
    if not samples:
        raise UsageError(f"{folder} holds no {layout.title} {split} samples")
    samples.sort(key=lambda s: s.id)
    if limit is not None:
        samples = samples[:limit]
    check_headers(samples, layout)
    if class_names is not None:
        names = tuple(class_names)
    elif layout.class_file:
        names = _class_file_names(folder / layout.class_file)
    else:
        names = load_vocabulary(layout.vocabulary).classes
    if not names:
        raise UsageError("the class list is empty")
    return EvalDataset(layout, folder, split, tuple(samples), tuple(names), skipped_hidden=hidden)
