"""A finished (or, when asked, unfinished) run as exports read it: its shards, its categories.

Categories are numbered once per export: 1..N in the order of `--classes` when given, else
of the vocabulary the run was generated from (run.json keeps it), else of the class names
in its prompts, sorted. Runs of one vocabulary therefore share category ids.
"""

from __future__ import annotations

import io
import json
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from magicseg_engine.errors import UsageError


@dataclass(frozen=True)
class Pair:
    """One finished sample of a run, as exports use it."""

    key: str
    meta: dict  # the sample's JSON
    positive: bytes  # JPEG
    negative: bytes  # JPEG
    mask: bytes  # label PNG: 0 background, i = meta["classes"][i - 1], 255 ignore

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def labels(self) -> np.ndarray:
        """The label map, [H, W] uint8."""
        with Image.open(io.BytesIO(self.mask)) as image:
            return np.asarray(image)


@dataclass(frozen=True)
class ShardRef:
    path: Path
    sha256: str  # as the manifest records it

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class RunSource:
    root: Path
    shards: tuple[ShardRef, ...]  # finished shards, in manifest order
    categories: tuple[str, ...]  # category i + 1 is categories[i]
    pairs_total: int  # pairs the run asked for
    pairs_finished: int
    pairs_dropped: int

    @property
    def complete(self) -> bool:
        return self.pairs_finished + self.pairs_dropped >= self.pairs_total

    def category_id(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.categories)}


def open_run(data: Path, *, partial: bool, classes: str | None = None) -> RunSource:
    """The run in `data`, checked before any export work: a run, with finished shards, finished
    unless `partial`, and every class it draws among the categories."""
    from magicseg_engine.data.shards import SHARDS_DIR, RunState
    from magicseg_engine.pipeline import PROMPTS_FILE, RUN_FILE, dropped_keys
    from magicseg_engine.prompts import read_records

    data = Path(data)
    if not (data / RUN_FILE).is_file():
        raise UsageError(f"{data} holds no run (no {RUN_FILE}); pass a directory written by generate or masks")
    saved = json.loads((data / RUN_FILE).read_text(encoding="utf-8"))
    if saved.get("config", {}).get("masks", {}).get("source") == "none":
        raise UsageError(f"{data} was generated with --mask-source none and has no masks to export; annotate it "
                         f"first: magicseg-engine masks --data {shlex.quote(str(data))} "
                         f"--out {shlex.quote(str(data) + '-masks')} --mask-source detector, then export that run")
    records = read_records(data / PROMPTS_FILE)
    # Read-only, sizes checked: a run still being generated is left as it is, and each shard's
    # sha256 is checked as it is exported (reading the run twice would double the export's time).
    state = RunState.load(data, verify=False, repair=False)
    shards = tuple(ShardRef(data / SHARDS_DIR / s.name, s.sha256) for s in state.shards)
    if not shards:
        raise UsageError(f"{data} has no finished shards yet; export it once generate has written some")
    finished, dropped = len(state.finished), len(dropped_keys(data))
    if finished + dropped < len(records) and not partial:
        raise UsageError(f"{data} is unfinished: {finished} of {len(records)} pairs are written; let generate "
                         "finish (--resume), or pass --partial to export the finished shards")
    drawn = sorted({c for r in records for c in r.classes})
    categories = _categories(saved, drawn, classes)
    missing = [c for c in drawn if c not in set(categories)]
    if missing:
        raise UsageError(f"--classes lacks {len(missing)} class(es) the run draws (e.g. {missing[0]!r}); "
                         "name the vocabulary the run was generated from")
    return RunSource(data, shards, categories, len(records), finished, dropped)


def _categories(saved: dict, drawn: Sequence[str], classes: str | None) -> tuple[str, ...]:
    if classes is not None:
        from magicseg_engine.vocab import load_vocabulary

        return tuple(load_vocabulary(classes).classes)
    if saved.get("vocabulary"):
        return tuple(saved["vocabulary"])
    return tuple(drawn)


def iter_pairs(shard: ShardRef) -> Iterator[Pair]:
    """The pairs of one shard, checked against its sha256 first; UsageError for a damaged shard or
    a sample without a mask (a --mask-source none run)."""
    from magicseg_engine.data.shards import iter_shard, shard_sha256

    if shard_sha256(shard.path) != shard.sha256:
        raise UsageError(f"shard {shard.path} does not match the sha256 its manifest line records: it changed "
                         "or is corrupted; restore it from a copy, then export again (the export resumes)")
    for sample in iter_shard(shard.path):
        key = sample["__key__"]
        if "mask.png" not in sample:
            raise UsageError(f"sample {key} in {shard.name} has no mask (generated with --mask-source none); "
                             "annotate the run first: magicseg-engine masks --mask-source detector")
        yield Pair(key, json.loads(sample["json"]), sample["pos.jpg"], sample["neg.jpg"], sample["mask.png"])
