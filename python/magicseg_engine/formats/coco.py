"""COCO instances export: `annotations/instances.json` and the images beside it in `images/`.

Every positive image has one annotation per class present in its mask (the mask routes give
one mask per class per image, so an instance is a class's region in one image), with the
mask as compressed RLE, its area and box taken from the mask, the category id of the export's
category list, and the mask score. Each counterfactual negative is an image too, with no
annotation, marked `"counterfactual": true` and pointing at its positive
(`counterfactual_of`), with the categories its prompt removed; the positive points back
(`counterfactual_image_id`) and says whether the pair passed the counterfactual check.
Category ids are plain integers, so any number of classes fits (labels in the shards are
8-bit per sample: up to 254 classes in one image, any number across the run).

Image and annotation ids count up in shard order from 1; a shard's entries go to
`.parts/{shard}.json` as it is exported, and `instances.json` is assembled from the parts
at the end, one part in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from magicseg_engine.atomic import atomic_output, write_file
from magicseg_engine.formats.source import Pair, RunSource

PARTS = ".parts"


class CocoWriter:
    def __init__(self, out: Path, source: RunSource):
        self.out = out
        self.source = source
        self.ids = source.category_id()

    def write_shard(self, name: str, pairs: Iterator[Pair], state) -> None:
        from magicseg_engine.ops import rle_encode

        images_dir, parts = self.out / "images", self.out / PARTS
        images_dir.mkdir(exist_ok=True)
        parts.mkdir(exist_ok=True)
        next_image = state.counters.get("next_image_id", 1)
        next_annotation = state.counters.get("next_annotation_id", 1)
        images, annotations = [], []
        for pair in pairs:
            labels = pair.labels()
            h, w = labels.shape
            pos_id, neg_id = next_image, next_image + 1
            next_image += 2
            check = pair.meta.get("masks", {}).get("counterfactual", {})
            for suffix, data in ((".jpg", pair.positive), (".neg.jpg", pair.negative)):
                write_file(images_dir / f"{pair.key}{suffix}", data, site="export_data")
            removed = sorted({self.ids[c] for c in pair.classes})
            images.append({"id": pos_id, "file_name": f"{pair.key}.jpg", "height": h, "width": w,
                           "magicseg_key": pair.key, "prompt": pair.meta["prompt"], "counterfactual": False,
                           "counterfactual_image_id": neg_id, "counterfactual_passed": bool(check.get("passed"))})
            images.append({"id": neg_id, "file_name": f"{pair.key}.neg.jpg", "height": h, "width": w,
                           "magicseg_key": pair.key, "prompt": pair.meta["negative_prompt"], "counterfactual": True,
                           "counterfactual_of": pos_id, "removed_category_ids": removed})
            present = [(i + 1, c) for i, c in enumerate(pair.meta["masks"]["classes"]) if (labels == i + 1).any()]
            if not present:
                continue
            masks = np.stack([labels == label for label, _ in present])
            for (label, info), mask, rle in zip(present, masks, rle_encode(masks)):
                rows, cols = np.nonzero(mask)
                x0, y0 = int(cols.min()), int(rows.min())
                annotations.append({
                    "id": next_annotation, "image_id": pos_id, "category_id": self.ids[info["name"]],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask.sum()), "bbox": [x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0],
                    "iscrowd": 0, "score": float(info.get("score", 1.0)),
                })
                next_annotation += 1
        with atomic_output(parts / f"{name}.json", site="export_data") as f:
            json.dump({"images": images, "annotations": annotations}, f)
        state.counters.update(next_image_id=next_image, next_annotation_id=next_annotation)

    def finish(self, state) -> dict:
        parts = [self.out / PARTS / f"{name}.json" for name in state.shards_done]
        (self.out / "annotations").mkdir(exist_ok=True)
        counts = {"images": 0, "annotations": 0}
        header = {
            # No date: the same run exports to the same bytes.
            "info": {"description": f"magicseg-engine export of {self.source.root.name}"},
            "licenses": [],
            "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in self.ids.items()],
        }
        with atomic_output(self.out / "annotations" / "instances.json", site="export_final") as f:
            f.write(json.dumps(header)[:-1])  # the object stays open for the two lists
            for field in ("images", "annotations"):
                f.write(f', "{field}": [')
                first = True
                for part in parts:
                    for entry in json.loads(part.read_text(encoding="utf-8"))[field]:
                        f.write(("" if first else ", ") + json.dumps(entry))
                        first = False
                        counts[field] += 1
                f.write("]")
            f.write("}")
        return {"images": counts["images"], "annotations": counts["annotations"],
                "pairs": counts["images"] // 2, "instances": "annotations/instances.json"}
