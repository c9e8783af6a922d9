"""mmsegmentation export: the ADE20K-style folders its custom datasets read.

    img_dir/{train,val}/{key}.jpg     the positive images, as generated (not re-encoded)
    ann_dir/{train,val}/{key}.png     8-bit label maps: 0 background, i = classes.txt line i, 255 ignore
    classes.txt                       background, then the export's categories, one per line

The shards' label maps number classes per sample; here they are renumbered to the export's
category list, so one value means one class in every file. The split is by key (a pair is
in val when the first 32 bits of its key, as a fraction, fall below the val fraction), so it
is the same in every export of the run and never moves a pair between splits. Counterfactual
negatives are not exported: no label map describes them.

8-bit maps with 255 as ignore hold at most 254 categories; larger vocabularies are refused
(export coco or hf, whose class ids have no such bound).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from magicseg_engine.atomic import atomic_write_text, write_file
from magicseg_engine.data.encoding import encode_png
from magicseg_engine.errors import UsageError
from magicseg_engine.formats.source import Pair, RunSource

CLASSES_FILE = "classes.txt"
MAX_CATEGORIES = 254
IGNORE = 255


def split_of(key: str, val_fraction: float) -> str:
    return "val" if int(key[:8], 16) / 2**32 < val_fraction else "train"


class MmsegWriter:
    def __init__(self, out: Path, source: RunSource, val_fraction: float):
        if len(source.categories) > MAX_CATEGORIES:
            raise UsageError(f"mmseg label maps are 8-bit with 255 as ignore, so they hold at most {MAX_CATEGORIES} "
                             f"classes; this export has {len(source.categories)}: export coco or hf instead")
        self.out = out
        self.source = source
        self.ids = source.category_id()
        self.val_fraction = val_fraction

    def write_shard(self, name: str, pairs: Iterator[Pair], state) -> None:
        counts = {split: state.counters.get(split, 0) for split in ("train", "val")}
        for pair in pairs:
            split = split_of(pair.key, self.val_fraction)
            images, labels = self.out / "img_dir" / split, self.out / "ann_dir" / split
            images.mkdir(parents=True, exist_ok=True)
            labels.mkdir(parents=True, exist_ok=True)
            # Per-sample label i + 1 -> the category id of the sample's i-th class; 0 and 255 stay.
            lut = np.full(256, IGNORE, dtype=np.uint8)
            lut[0] = 0
            for i, c in enumerate(pair.classes):
                lut[i + 1] = self.ids[c]
            write_file(images / f"{pair.key}.jpg", pair.positive, site="export_data")
            write_file(labels / f"{pair.key}.png", encode_png(lut[pair.labels()]), site="export_data")
            counts[split] += 1
        state.counters.update(counts)

    def finish(self, state) -> dict:
        atomic_write_text(self.out / CLASSES_FILE, "\n".join(["background", *self.source.categories]) + "\n",
                          site="export_final")
        return {"train": state.counters.get("train", 0), "val": state.counters.get("val", 0),
                "classes": CLASSES_FILE, "num_classes": len(self.source.categories) + 1}
