"""Hugging Face `datasets` export: Parquet shards in `data/` and the saved dataset in `dataset/`.

One row per pair:

=====================  ====================================================================
column                 what
=====================  ====================================================================
key                    the sample key
image, negative, mask  Image features: the positive and negative JPEGs as generated, the
                       label PNG (0 background, i = classes[i - 1], 255 ignore)
classes                Sequence(ClassLabel) over the export's categories, in mask order
prompt,                the two prompts
negative_prompt
counterfactual_passed  whether the negative passed the counterfactual check
meta                   the sample's JSON, whole
=====================  ====================================================================

`datasets.load_from_disk(OUT / "dataset")` reads the saved dataset, and
`load_dataset("parquet", data_files=str(OUT / "data" / "*.parquet"))` the same rows. A
shard's rows become `data/{shard}.parquet` as it is exported; the saved dataset is built
from those files at the end (memory-mapped Arrow, not held in memory).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from magicseg_engine.atomic import fault_point, names_failed_writes
from magicseg_engine.errors import UsageError
from magicseg_engine.formats.source import Pair, RunSource

DATA_DIR = "data"
DATASET_DIR = "dataset"


def require_datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("the hf export needs the datasets package: pip install 'magicseg-engine[export]'") from None
    datasets.disable_progress_bars()  # the export shows its own
    return datasets


def features(categories):
    datasets = require_datasets()
    return datasets.Features({
        "key": datasets.Value("string"),
        "image": datasets.Image(),
        "negative": datasets.Image(),
        "mask": datasets.Image(),
        "classes": datasets.Sequence(datasets.ClassLabel(names=list(categories))),
        "prompt": datasets.Value("string"),
        "negative_prompt": datasets.Value("string"),
        "counterfactual_passed": datasets.Value("bool"),
        "meta": datasets.Value("string"),
    })


class HfWriter:
    def __init__(self, out: Path, source: RunSource):
        self.out = out
        self.source = source
        self.features = features(source.categories)  # refuses a missing `datasets` before any write

    def write_shard(self, name: str, pairs: Iterator[Pair], state) -> None:
        datasets = require_datasets()
        ids = self.source.category_id()
        rows: dict[str, list] = {column: [] for column in self.features}
        for pair in pairs:
            rows["key"].append(pair.key)
            for column, data in (("image", pair.positive), ("negative", pair.negative), ("mask", pair.mask)):
                rows[column].append({"bytes": data, "path": None})
            rows["classes"].append([ids[c] - 1 for c in pair.classes])
            rows["prompt"].append(pair.meta["prompt"])
            rows["negative_prompt"].append(pair.meta["negative_prompt"])
            rows["counterfactual_passed"].append(bool(pair.meta.get("masks", {}).get("counterfactual", {})
                                                      .get("passed")))
            rows["meta"].append(json.dumps(pair.meta, sort_keys=True))
        data_dir = self.out / DATA_DIR
        data_dir.mkdir(exist_ok=True)
        table = datasets.Dataset.from_dict(rows, features=self.features)
        tmp = data_dir / f".{name}.parquet.tmp"
        final = data_dir / f"{Path(name).stem}.parquet"
        try:
            with names_failed_writes(final, str(tmp)):
                table.to_parquet(str(tmp))
                fault_point("export_data", final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a resumed export writes the shard again whole
            raise
        tmp.replace(final)
        state.counters["rows"] = state.counters.get("rows", 0) + len(rows["key"])

    def finish(self, state) -> dict:
        datasets = require_datasets()
        files = [str(self.out / DATA_DIR / f"{Path(name).stem}.parquet") for name in state.shards_done]
        final = self.out / DATASET_DIR
        with tempfile.TemporaryDirectory(prefix=".dataset.", dir=self.out) as tmp:
            # The Arrow cache lives in the export, not in the user's home, and goes with it.
            table = datasets.Dataset.from_parquet(files, features=self.features, cache_dir=str(Path(tmp) / "cache"))
            # datasets derives the fingerprint from the temporary cache path, which differs on
            # every run; one from the rows themselves makes the saved dataset the same bytes
            # whenever the same run is exported, interrupted or not.
            table = datasets.Dataset(table.data, info=table.info, split=table.split,
                                     fingerprint=_content_fingerprint(files))
            staged = Path(tmp) / "saved"
            with names_failed_writes(final):
                table.save_to_disk(str(staged))
                fault_point("export_final", final)
            rows = len(table)
            del table
            if final.exists():
                shutil.rmtree(final)
            staged.replace(final)
        return {"rows": rows, "parquet": f"{DATA_DIR}/*.parquet", "dataset": DATASET_DIR}


def _content_fingerprint(files: list[str]) -> str:
    """16 hex digits of the sha256 of the Parquet files, in order: what the saved dataset holds."""
    import hashlib

    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
