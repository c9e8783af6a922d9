"""`magicseg-engine export`: a run's finished shards written in a format training code reads.

One shard at a time, so memory stays flat whatever the run's size. Each format writes a
shard's files, then the export's ledger (`.magicseg-export.json`) records the shard as done,
through a temporary file and a rename after `os.sync`; a killed export resumes at the first
shard the ledger lacks and redoes it whole, so its output is byte for byte what an
uninterrupted export writes. `export.json`, written last, says the export is complete; running
the export again after the run has finished more shards adds them.

A folder holding another export (other format, run, categories or options) or other files is
refused; so is a second export writing into the same folder at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from magicseg_engine.atomic import atomic_write_text, check_writable_dir
from magicseg_engine.errors import UsageError
from magicseg_engine.formats.source import Pair, RunSource, iter_pairs, open_run

FORMATS = ("coco", "mmseg", "hf")
LEDGER = ".magicseg-export.json"
LOCK = ".magicseg-export.lock"
DONE = "export.json"


@dataclass
class ExportState:
    """What the ledger keeps between shards: which are done, and each format's running counters."""

    shards_done: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


class Writer(Protocol):
    """A format: writes a shard's pairs (idempotently, from `state.counters`), then the final files."""

    def write_shard(self, name: str, pairs: Iterator[Pair], state: ExportState) -> None: ...

    def finish(self, state: ExportState) -> dict: ...


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    format: str
    shards: int
    shards_new: int
    totals: dict


@dataclass
class ExportJob:
    """An export checked against its inputs and its folder, nothing written yet: `run` writes it."""

    source: RunSource
    out: Path
    identity: dict
    writer: Writer

    def run(self, progress: Callable[[int, int], None] | None = None) -> ExportSummary:
        """Write the export. `progress(n, total)` is called first with the shards already
        exported, then with 1 per shard."""
        out, identity, writer, source = self.out, self.identity, self.writer, self.source
        with _locked(out):
            _remove_leftovers(out)
            state = _open_ledger(out, identity)
            todo = [s for s in source.shards if s.name not in set(state.shards_done)]
            if progress:
                progress(len(state.shards_done), len(source.shards))
            crash_after = int(os.environ.get(_CRASH_ENV, "0"))
            left = [crash_after]
            for shard in todo:
                pairs = iter_pairs(shard, source.categories)
                pairs = _crashing(pairs, left) if crash_after else pairs
                writer.write_shard(shard.name, pairs, state)
                os.sync()  # the shard's files reach the disk before the ledger says they are there
                state.shards_done.append(shard.name)
                _save_ledger(out, identity, state)
                if progress:
                    progress(1, len(source.shards))
            totals = writer.finish(state)
            os.sync()
            record = {**identity, "complete_run": source.complete, "shards": len(state.shards_done),
                      "pairs_in_run": source.pairs_total, **totals}
            atomic_write_text(out / DONE, json.dumps(record, indent=2, sort_keys=True) + "\n", site="export_final")
        return ExportSummary(out, identity["format"], len(state.shards_done), len(todo), totals)


def prepare_export(data: Path, out: Path, fmt: str, *, partial: bool = False, classes: str | None = None,
                   val_fraction: float = 0.05) -> ExportJob:
    """Every check of an export of the run in `data` to `out` as `fmt` (coco, mmseg or hf), before
    anything is written; UsageError, naming the problem, for what would fail."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction {val_fraction}: give a fraction in [0, 1)")
    source = open_run(Path(data), partial=partial, classes=classes)
    options = {"val_fraction": val_fraction} if fmt == "mmseg" else {}
    identity = {"format": fmt, "source": str(source.root.resolve()), "categories": list(source.categories),
                "options": options}
    out = Path(out)
    _check_folder(out, identity)
    return ExportJob(source, out, identity, _writer(fmt, out, source, val_fraction))


def export_run(data: Path, out: Path, fmt: str, *, partial: bool = False, classes: str | None = None,
               val_fraction: float = 0.05, progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Export the run in `data` to `out` as `fmt`; see the module docstring."""
    return prepare_export(data, out, fmt, partial=partial, classes=classes, val_fraction=val_fraction).run(progress)


# Tests of resumption: the process dies (as if SIGKILLed) after this many pairs of this call.
_CRASH_ENV = "MAGICSEG_EXPORT_CRASH_AFTER_PAIRS"


def _crashing(pairs: Iterator[Pair], left: list[int]) -> Iterator[Pair]:
    for pair in pairs:
        if left[0] == 0:
            os._exit(137)
        left[0] -= 1
        yield pair


def _writer(fmt: str, out: Path, source: RunSource, val_fraction: float) -> Writer:
    if fmt == "coco":
        from magicseg_engine.formats.coco import CocoWriter

        return CocoWriter(out, source)
    if fmt == "mmseg":
        from magicseg_engine.formats.mmseg import MmsegWriter

        return MmsegWriter(out, source, val_fraction)
    from magicseg_engine.formats.hf import HfWriter

    return HfWriter(out, source)


def _check_folder(out: Path, identity: dict) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    # A folder holding only what a killed export left before its first ledger is that export's.
    holds_files = out.is_dir() and any(p.name != LOCK and not _is_leftover(p) for p in out.iterdir())
    if holds_files and not (out / LEDGER).is_file():
        raise UsageError(f"{out} is not empty and holds no export; choose an empty or new folder")
    if (out / LEDGER).is_file():
        _open_ledger(out, identity)  # refuses another export's folder
    else:
        check_writable_dir(out.parent if not out.exists() else out)


def _is_leftover(path: Path) -> bool:
    """What a write killed half way leaves: a temporary file (atomic_output's `.{name}.{random}.tmp`,
    the hf writer's `.{shard}.parquet.tmp`), or the hf writer's staging folder `.dataset.*`."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith(".dataset."))


def _remove_leftovers(out: Path) -> None:
    """Delete what killed writes left in the export (called under its lock). A kill can come
    between the lock file and the first ledger, or inside any write; the resumed export writes
    every unfinished file again whole, so this only makes the folder what an uninterrupted
    export leaves."""
    import shutil

    found = [p for p in out.rglob(".*") if _is_leftover(p)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    check_writable_dir(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another export is writing to {out}; wait for it or choose another folder") from None
        yield
    finally:
        os.close(fd)


def _open_ledger(out: Path, identity: dict) -> ExportState:
    path = out / LEDGER
    if not path.is_file():
        state = ExportState()
        _save_ledger(out, identity, state)
        return state
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UsageError(f"{path} is damaged; remove {out} and export again") from None
    mine = {k: saved.get(k) for k in identity}
    if mine != identity:
        what = ", ".join(k for k in identity if saved.get(k) != identity[k])
        raise UsageError(f"{out} holds another export ({saved.get('format')} of {saved.get('source')}; differs in "
                         f"{what}); choose an empty folder")
    return ExportState(list(saved.get("shards_done", [])), dict(saved.get("counters", {})))


def _save_ledger(out: Path, identity: dict, state: ExportState) -> None:
    atomic_write_text(out / LEDGER, json.dumps({**identity, "shards_done": state.shards_done,
                                                "counters": state.counters}, indent=1, sort_keys=True) + "\n",
                      site="export_ledger")
