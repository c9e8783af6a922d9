"""A finished (or, when asked, unfinished) run as exports read it: its shards, its categories.

Categories are numbered once per export: 1..N in the order of `--classes` when given, else
of the vocabulary the run was generated from (run.json keeps it), else of the class names
in its prompts, sorted. Runs of one vocabulary therefore share category ids.
"""

from __future__ import annotations

import io
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
    shard: str = ""  # the shard's file name, for messages

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def labels(self) -> np.ndarray:
        """The label map, [H, W] uint8; UsageError naming the sample and its shard when the PNG
        is damaged or not an 8-bit label map."""
        try:
            with Image.open(io.BytesIO(self.mask)) as image:
                image.load()
                if image.mode not in ("L", "P"):
                    raise ValueError(f"mode {image.mode}, not an 8-bit label map")
                return np.asarray(image)
        except Exception as err:  # PIL raises many types for damaged bytes (OSError, SyntaxError, ...)
            raise UsageError(f"the mask of sample {self.key} in shard {self.shard or '?'} cannot be read ({err}); "
                             "restore the shard from a copy, then export again (the export resumes)") from None


@dataclass(frozen=True)
class ShardRef:
    path: Path
    sha256: str  # as the manifest records it
    keys: tuple[str, ...] = ()  # as the manifest records them; () reads whatever the shard holds

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
    from magicseg_engine.pipeline import PROMPTS_FILE, RUN_FILE, dropped_keys, read_run_file
    from magicseg_engine.prompts import read_records

    data = Path(data)
    if not (data / RUN_FILE).is_file():
        raise UsageError(f"{data} holds no run (no {RUN_FILE}); pass a directory written by generate or masks")
    saved = read_run_file(data)
    masks = saved["config"].get("masks")
    if isinstance(masks, dict) and masks.get("source") == "none":
        raise UsageError(f"{data} was generated with --mask-source none and has no masks to export; annotate it "
                         f"first: magicseg-engine masks --data {shlex.quote(str(data))} "
                         f"--out {shlex.quote(str(data) + '-masks')} --mask-source detector, then export that run")
    records = read_records(data / PROMPTS_FILE)
    # Read-only, sizes checked: a run still being generated is left as it is, and each shard's
    # sha256 is checked as it is exported (reading the run twice would double the export's time).
    state = RunState.load(data, verify=False, repair=False)
    shards = tuple(ShardRef(data / SHARDS_DIR / s.name, s.sha256, s.keys) for s in state.shards)
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


def iter_pairs(shard: ShardRef, categories: Sequence[str] | None = None) -> Iterator[Pair]:
    """The pairs of one shard, checked against its sha256 first; UsageError for a damaged shard,
    a sample whose JSON lacks what the formats read (or, given `categories`, names a class
    outside them), or a sample without a mask (a --mask-source none run)."""
    from magicseg_engine.data.shards import iter_shard, sample_meta, shard_sha256

    if shard_sha256(shard.path) != shard.sha256:
        raise UsageError(f"shard {shard.path} does not match the sha256 its manifest line records: it changed "
                         "or is corrupted; restore it from a copy, then export again (the export resumes)")
    for sample in iter_shard(shard.path, shard.keys or None):
        key = sample["__key__"]
        meta = sample_meta(sample, shard.path)
        lacking = [m for m in ("pos.jpg", "neg.jpg") if m not in sample]
        if lacking:
            raise UsageError(f"sample {key} in shard {shard.path} has no {lacking[0]}; restore the shard from a copy, "
                             "then export again (the export resumes)")
        if "mask.png" not in sample:
            raise UsageError(f"sample {key} in {shard.name} has no mask (generated with --mask-source none); "
                             "annotate the run first: magicseg-engine masks --mask-source detector")
        problem = _meta_problem(meta, categories)
        if problem:
            raise UsageError(f"sample {key} in shard {shard.path}: its JSON {problem}; restore the shard from a copy, "
                             "then export again (the export resumes)")
        yield Pair(key, meta, sample["pos.jpg"], sample["neg.jpg"], sample["mask.png"], shard.name)


def _meta_problem(meta: dict, categories: Sequence[str] | None) -> str | None:
    """What the sample JSON lacks that the formats read (generate and masks always write it), or None."""
    if not all(isinstance(meta.get(k), str) for k in ("prompt", "negative_prompt")):
        return "has no prompt and negative_prompt"
    if len(meta["classes"]) > 254:  # labels are 8-bit: 0 background, 255 ignore
        return f"names {len(meta['classes'])} classes, more than a label map holds"
    if categories is not None:
        known = set(categories)
        unknown = [c for c in meta["classes"] if c not in known]
        if unknown:
            return f"names the class {unknown[0]!r}, which is not among the export's categories"
    masks = meta.get("masks")
    entries = masks.get("classes") if isinstance(masks, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                 for e in entries):
        return "has no list of mask classes"
    if categories is not None and any(e["name"] not in known for e in entries):
        return "names a mask class that is not among the export's categories"
    check = masks.get("counterfactual", {})
    if not isinstance(check, dict) or not all(isinstance(e.get("score", 1.0), (int, float)) for e in entries):
        return "has a damaged counterfactual check or mask score"
    return None
