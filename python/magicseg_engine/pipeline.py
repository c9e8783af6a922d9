"""Compose the stages batch by batch: prompt records → paired images and masks → WebDataset shards.

The GPU (or CPU) thread only samples and does the device half of the masks; the masks' host
half (C++ clean-up, merge, boxes, coverage), JPEG/PNG encoding and shard writing run in a
background thread with a small pool of encoders, behind a bounded queue, so the next batch
denoises while the last one is finished and written, and a slow disk slows generation down
instead of filling memory. The run directory rules (new, resume, overwrite) live here too, so that every
command that writes a run — generate, masks — follows the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicseg_engine.atomic import atomic_output, check_writable_dir, fsync_dir, names_failed_writes, write_all
from magicseg_engine.config import RunConfig, library_versions, saved_run_config
from magicseg_engine.data.encoding import encode_jpeg, encode_png
from magicseg_engine.data.shards import (
    LOCKS_DIR,
    MANIFEST,
    SHARDS_DIR,
    ShardWriter,
    finished_keys,
    iter_samples,
    sample_key,
    sample_meta,
)
from magicseg_engine.engine.backends import BACKENDS, make_runners, make_sam_runners, with_attention_kernel
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.fast import FAST_LEVELS
from magicseg_engine.generate.models import load_diffusion, resolve_dtype
from magicseg_engine.generate.sampler import PairBatch, PairedSampler, SamplingSettings
from magicseg_engine.masks.annotate import DeviceAnnotations, MaskAnnotator, PairAnnotation
from magicseg_engine.masks.detector import build_detector
from magicseg_engine.masks.sam import SamRefiner, build_sam
from magicseg_engine.prompts.records import PromptRecord, read_records, write_records

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PROMPTS_FILE = "prompts.jsonl"
# Pairs that failed the counterfactual check and were dropped: finished, but in no shard.
DROPPED_FILE = "dropped.jsonl"


@dataclass
class ExecutionOptions:
    """How a run executes; none of it changes what a sample looks like."""

    device: str = "cpu"
    batch_size: int = 8
    samples_per_shard: int = 256
    encode_workers: int = 4
    jpeg_quality: int = 95
    writer_id: str = "0"
    # Read where the models are built (`build_sampler`): NHWC weights (None: on a GPU) and the
    # UNet's attention kernel ("auto": torch's choice).
    channels_last: bool | None = None
    attention: str = "auto"


@dataclass
class GenerationSummary:
    requested: int
    already_done: int
    generated: int
    seconds: float
    final_batch_size: int
    written: int = 0
    flagged: int = 0
    dropped: int = 0
    classes_not_found: int = 0

    @property
    def pairs_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


# --- run directory --------------------------------------------------------------------
#
# A run directory holds one run: run.json (its settings), prompts.jsonl (its pairs), shards/,
# .locks/ and manifest.jsonl (data/shards.py), dropped.jsonl. Starting a run, in a new
# directory or over an old run (--overwrite), takes four steps; a kill can stop the process
# between any two of them (each file is written through atomic_output: whole or absent, at worst
# a temporary file beside it), and every state it leaves is recognised by `open_run`:
#
# 1. run.json is written with the new settings and a "starting" entry naming the prompts (their
#    count and a hash of their ids). From here the directory holds the new run, being started;
#    an old run it held is given up, although its files are still there.
# 2. The old run's files are deleted: shards/, .locks/, manifest.jsonl, dropped.jsonl,
#    prompts.jsonl, temporary files of killed writes.
# 3. prompts.jsonl is written.
# 4. run.json is written again without "starting": the run is started, and only now can it
#    hold a finished pair.
#
# Killed before step 1, the directory is as it was (plus at most a temporary file): the old run,
# which --resume continues with its own flags, or no run, which --resume and --overwrite start.
# Killed after it, run.json says "starting": --resume with the same flags completes the start
# (all four steps again: nothing was rendered yet, so nothing is lost), --overwrite replaces it.
# Finishing a session adds its summary to run.json (atomically) and deletes the temporary files
# that killed writes of run.json and prompts.jsonl left.

STARTING = "starting"
# atomic_output's temporary files beside run.json and prompts.jsonl: `.{name}.{random}.tmp`.
_RUN_TEMP = re.compile(r"^\.(run\.json|prompts\.jsonl)\.[^.]+\.tmp$")
# All that a start killed before its run.json existed can leave in a directory that held no run:
# temporary files; and, from versions that wrote prompts.jsonl before run.json, the prompts and
# the list of dropped pairs. Nothing else is ever deleted by starting over without run.json.
_START_REMAINS = frozenset({PROMPTS_FILE, DROPPED_FILE})

# Crash tests: MAGICSEG_RUN_CRASH_AT="<point>[:<n>]" makes the process SIGKILL itself the n-th
# time (default: the first) it reaches <point>: start_marker_tmp, start_marked, start_clearing,
# start_cleared, start_prompts_tmp, start_prompts, start_commit_tmp, start_done (start_run's
# steps, "_tmp": the temporary file written, not yet renamed), finish_begin, finish_summary_tmp
# (record_summary). Unset in real runs.
RUN_CRASH_ENV = "MAGICSEG_RUN_CRASH_AT"
_run_crash_counts: dict[str, int] = {}


def _crash_point(point: str) -> None:
    name, _, nth = os.environ.get(RUN_CRASH_ENV, "").partition(":")
    if name != point:
        return
    _run_crash_counts[point] = _run_crash_counts.get(point, 0) + 1
    if _run_crash_counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _comparable(config: RunConfig) -> dict:
    return config.model_dump(mode="json")


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two nested dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _prompt_ids_digest(records: Sequence[PromptRecord]) -> str:
    """What a starting run.json records of its prompts: the ids name every field that makes a pair."""
    return hashlib.sha256("\n".join(r.id for r in records).encode("utf-8")).hexdigest()


def read_run_file(out: Path) -> dict | None:
    """The run.json of `out`, or None when there is none; UsageError when it is not a JSON object
    or an entry this package reads has the wrong type (a file edited by hand): whoever reads the
    returned dict may then trust those entries' types. Other entries are left as they are."""
    path = out / RUN_FILE
    try:
        saved = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep: damaged
        saved = None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} is not a JSON object; restore it from a copy, or pass --overwrite to replace the run")
    problem = _run_file_problem(saved)
    if problem:
        raise UsageError(f"{path}: {problem}; restore it from a copy, or pass --overwrite to replace the run")
    return saved


def _run_file_problem(saved: dict) -> str | None:
    """What is wrong with the entries of a run.json that the commands read, or None."""
    if not isinstance(saved.get("config"), dict):
        return '"config" is missing or not an object'
    if not isinstance(saved["config"].get("masks", {}), dict):
        return '"config.masks" is not an object'
    vocabulary = saved.get("vocabulary")
    if vocabulary is not None and not (isinstance(vocabulary, list) and all(isinstance(v, str) for v in vocabulary)):
        return '"vocabulary" is not a list of class names'
    for key, kind, name in ((STARTING, dict, "an object"), ("sessions", list, "a list"), ("balance", dict, "an object")):
        if key in saved and not isinstance(saved[key], kind):
            return f'"{key}" is not {name}'
    balance = saved.get("balance") or {}
    requested = balance.get("requested_pairs", 0)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        return '"balance.requested_pairs" is not a number of pairs'
    if not isinstance(balance.get("rounds", []), list):
        return '"balance.rounds" is not a list'
    return None


def _write_run_file(out: Path, saved: dict, crash: str) -> None:
    with atomic_output(out / RUN_FILE, site="run_file") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        _crash_point(crash)  # crash tests: the temporary file there, the rename not done


def _remove_temporary_files(out: Path) -> None:
    """Delete what killed writes of run.json and prompts.jsonl left; the caller is the only writer."""
    for name in os.listdir(out):
        if _RUN_TEMP.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)


def _start_remains(out: Path) -> list[str] | None:
    """The names in `out` (which has no run.json) if all of them are what an interrupted start
    leaves (see `_START_REMAINS`), else None: a directory of something else is never replaced."""
    names = sorted(os.listdir(out))
    if all(name in _START_REMAINS or _RUN_TEMP.match(name) for name in names):
        return names
    return None


def _check_same_settings(out: Path, saved: dict, config: RunConfig) -> None:
    ours = _comparable(config)
    theirs = saved_run_config(saved.get("config", {}))
    if theirs != ours:
        changed = _changed_fields(theirs, ours)
        # A run from before --weights-seed existed has the weights of its --seed: say which to pass.
        hint = (f"; its weights come from --weights-seed {theirs['weights_seed']}"
                if "weights_seed" in changed and isinstance(theirs.get("weights_seed"), int) else "")
        raise UsageError(f"--resume: the settings differ from the run in {out} ({', '.join(changed)}){hint}; "
                         "use the same flags, or --overwrite to start again")


def _saved_start_records(out: Path, starting: dict) -> list[PromptRecord] | None:
    """prompts.jsonl's records if they are the ones a starting run.json names, else None (not
    written yet, or still the old run's)."""
    try:
        held = read_records(out / PROMPTS_FILE)
    except (OSError, ValueError):
        return None
    if len(held) == starting.get("prompts") and _prompt_ids_digest(held) == starting.get("prompt_ids_sha256"):
        return held
    return None


@dataclass
class RunPlan:
    """What `open_run` decided: the records to render, and whether the directory must be (re)initialised."""

    records: list[PromptRecord]
    fresh: bool


def open_run(out: Path, config: RunConfig, records: Sequence[PromptRecord] | None,
             resume: bool, overwrite: bool) -> RunPlan:
    """Decide what to do with `out` without writing anything.

    A directory that already holds a run is reopened only with `resume` (and then its saved
    configuration and prompts must match) or replaced with `overwrite`; anything else is
    refused, so two different runs can never mix in one dataset. A run whose start was
    interrupted (see the protocol above) is started again by either flag, after one line that
    says so; `start_run` then completes or replaces it.
    """
    try:
        saved = read_run_file(out)
    except UsageError:
        if not overwrite:
            raise
        saved = {}  # unreadable: --overwrite replaces it like any run
    if saved is not None and overwrite:
        if STARTING in saved:
            log.warning("%s holds a run whose start was interrupted; replacing it", out)
        return _fresh_plan(records)
    if saved is not None and STARTING in saved:
        return _complete_start(out, config, records, saved, resume)
    if saved is not None:
        if not resume:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        _check_same_settings(out, saved, config)
        saved_records = read_records(out / PROMPTS_FILE)
        # A balanced run appends its top-up prompts after the requested ones.
        held = saved_records[: len(records)] if "balance" in saved and records is not None else saved_records
        if records is not None and [r.id for r in records] != [r.id for r in held]:
            raise UsageError(f"--resume: the prompts differ from the run in {out}; use the same flags or --overwrite")
        return RunPlan(saved_records, fresh=False)
    if out.is_dir() and any(out.iterdir()):
        remains = _start_remains(out)
        if remains is None:
            raise UsageError(f"{out} is not empty and holds no run; choose an empty or new directory")
        if not (resume or overwrite):
            raise UsageError(f"{out} holds only what an interrupted start left ({', '.join(remains)}); "
                             "pass --resume or --overwrite to start the run again")
        if records is None:
            raise UsageError(f"--resume: the start of the run in {out} was interrupted before its {RUN_FILE} was "
                             "written, so its settings are unknown; pass the flags that started it with --resume")
        log.warning("%s holds what an interrupted start left (%s) and no %s; starting the run again",
                    out, ", ".join(remains), RUN_FILE)
    return _fresh_plan(records)


def _fresh_plan(records: Sequence[PromptRecord] | None) -> RunPlan:
    if records is None:
        raise UsageError("no prompts: pass --classes with --num-pairs, or --prompts")
    return RunPlan(list(records), fresh=True)


def _complete_start(out: Path, config: RunConfig, records: Sequence[PromptRecord] | None,
                    saved: dict, resume: bool) -> RunPlan:
    """--resume of a run whose start was interrupted: the same settings and prompts start it again."""
    if not resume:
        raise UsageError(f"{out} holds a run whose start was interrupted; pass --resume to complete its start "
                         "or --overwrite to replace it")
    _check_same_settings(out, saved, config)
    starting = saved[STARTING] if isinstance(saved[STARTING], dict) else {}
    if records is None:
        records = _saved_start_records(out, starting)
        if records is None:
            raise UsageError(f"--resume: the start of the run in {out} was interrupted before its prompts were "
                             "saved; pass the flags that started it with --resume, or --overwrite")
    elif len(records) != starting.get("prompts") or _prompt_ids_digest(records) != starting.get("prompt_ids_sha256"):
        raise UsageError(f"--resume: the prompts differ from the run in {out}; use the same flags or --overwrite")
    log.warning("%s holds a run whose start was interrupted (%s says %r); completing its start",
                out, RUN_FILE, STARTING)
    return RunPlan(list(records), fresh=True)


def start_run(out: Path, config: RunConfig, records: Sequence[PromptRecord],
              vocabulary: Sequence[str] | None = None, extra: dict | None = None) -> None:
    """Initialise `out` for a new run, removing the files of a run it held before.

    Follows the four steps above, so a kill anywhere leaves a directory `open_run` recognises.
    `vocabulary` (the class list the prompts drew from, in its label order) is kept in run.json,
    so that exports number categories the same way in every run of that vocabulary; completing
    an interrupted start without one (a bare --resume) keeps the one its first try saved.
    `extra` holds more run.json entries that belong to the run from its start (the --balance
    record): they are written with the marker, so no kill can leave a started run without them.
    """
    check_writable_dir(out)
    records = list(records)
    saved = {"config": _comparable(config), "versions": library_versions()}
    if vocabulary is None:
        with contextlib.suppress(UsageError):
            before = read_run_file(out) or {}
            if (STARTING in before and saved_run_config(before.get("config")) == saved["config"]
                    and "vocabulary" in before):
                vocabulary = before["vocabulary"]
    if vocabulary is not None:
        saved["vocabulary"] = list(vocabulary)
    saved.update(extra or {})
    # 1. The marker: from here a kill leaves a run that --resume completes.
    starting = {"prompts": len(records), "prompt_ids_sha256": _prompt_ids_digest(records)}
    _write_run_file(out, {**saved, STARTING: starting}, "start_marker_tmp")
    _crash_point("start_marked")
    # 2. The old run's files. The shards go first: they are most of the data, and once the
    # manifest is gone nothing could tell a reader which of them were finished.
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    _crash_point("start_clearing")
    shutil.rmtree(out / LOCKS_DIR, ignore_errors=True)
    for name in (MANIFEST, DROPPED_FILE, PROMPTS_FILE):
        (out / name).unlink(missing_ok=True)
    _remove_temporary_files(out)
    fsync_dir(out)  # the deletions are durable before run.json says the run has started
    _crash_point("start_cleared")
    # 3. The prompts; the generator lets a crash test stop inside the write.
    write_records(out / PROMPTS_FILE, _then_crash(records, "start_prompts_tmp"))
    _crash_point("start_prompts")
    # 4. The commit: run.json without the marker.
    _write_run_file(out, saved, "start_commit_tmp")
    _crash_point("start_done")


def _then_crash(records: list[PromptRecord], point: str):
    yield from records
    _crash_point(point)


def record_summary(out: Path, summary: GenerationSummary, extra: dict) -> None:
    """Finish a session: add its timings to run.json without touching its configuration, and
    delete the temporary files killed writes of run.json or prompts.jsonl left."""
    _crash_point("finish_begin")
    path = out / RUN_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.setdefault("sessions", []).append({
        "requested": summary.requested, "already_done": summary.already_done,
        "generated": summary.generated, "seconds": round(summary.seconds, 3),
        "pairs_per_second": round(summary.pairs_per_second, 4),
        "final_batch_size": summary.final_batch_size, "written": summary.written,
        "flagged": summary.flagged, "dropped": summary.dropped,
        "classes_not_found": summary.classes_not_found, **extra,
    })
    _write_run_file(out, saved, "finish_summary_tmp")
    _remove_temporary_files(out)


# --- encoding and writing --------------------------------------------------------------

def encode_attention(maps: torch.Tensor) -> bytes:
    """One pair's maps [2, C, h, w] as float16 .npy: enough to annotate again without the UNet."""
    buf = BytesIO()
    np.save(buf, maps.detach().to("cpu", torch.float16).numpy())
    return buf.getvalue()


def decode_attention(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(BytesIO(data), allow_pickle=False).astype(np.float32))


def dropped_keys(out: Path) -> set[str]:
    path = out / DROPPED_FILE
    if not path.exists():
        return set()
    keys = set()
    unreadable = 0
    for line in path.read_bytes().splitlines():
        try:
            key = json.loads(line)["key"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            key = None
        if isinstance(key, str):
            keys.add(key)
        elif line.strip():
            # A torn last line, or one damaged or edited: that pair is not taken as dropped, so it
            # is rendered (and judged) again, which loses nothing.
            unreadable += 1
    if unreadable:
        log.warning("%s: %d line(s) are not a dropped pair's record and were ignored", path, unreadable)
    return keys


def log_dropped(out: Path, key: str, reason: str) -> None:
    path = out / DROPPED_FILE
    with names_failed_writes(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        line = (json.dumps({"key": key, "reason": reason}) + "\n").encode()
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # The last line was torn (a full disk took part of it): end it, so that this line
            # stays readable; `dropped_keys` skips the torn one, whose pair is judged again.
            line = b"\n" + line
        write_all(fd, line, site="dropped", path=path)
        with names_failed_writes(path):
            os.fsync(fd)
    finally:
        os.close(fd)


# Tests of --balance: "CLASS:FRACTION" drops that fraction of the pairs showing CLASS (chosen by key),
# as if the counterfactual check had failed them.
DROP_CLASS_ENV = "MAGICSEG_TEST_DROP_CLASS"


def _dropped_by_test_hook(key: str, meta: dict) -> bool:
    spec = os.environ.get(DROP_CLASS_ENV)
    if not spec:
        return False
    name, fraction = spec.rsplit(":", 1)
    return name in meta.get("classes", ()) and int(key[:8], 16) / 2**32 < float(fraction)


class PairWriter:
    """The one place that decides what a pair's sample holds and whether it is kept."""

    def __init__(self, writer: ShardWriter, drop_failed: bool):
        self.writer = writer
        self.drop_failed = drop_failed
        # classes_not_found: classes with neither attention (no tokens in the prompt) nor a box.
        self.counts = {"written": 0, "flagged": 0, "dropped": 0, "classes_not_found": 0}

    def write(self, key: str, meta: dict, pos_jpg: bytes, neg_jpg: bytes,
              note: PairAnnotation | None = None, attention: bytes | None = None) -> None:
        files = {"pos.jpg": pos_jpg, "neg.jpg": neg_jpg}
        if note is not None and _dropped_by_test_hook(key, meta):
            log_dropped(self.writer.run_dir, key, f"dropped by {DROP_CLASS_ENV} (a test hook)")
            self.counts["dropped"] += 1
            return
        if note is not None:
            self.counts["classes_not_found"] += sum(not c["found"] for c in note.classes)
            meta = {**meta, "masks": note.metadata()}
            if attention is not None or note.maps is not None:
                files["attn.npy"] = attention if attention is not None else encode_attention(note.maps)
            files["mask.png"] = encode_png(note.label_map)
            if not note.counterfactual["passed"]:
                if self.drop_failed:
                    log_dropped(self.writer.run_dir, key, note.counterfactual["reason"])
                    self.counts["dropped"] += 1
                    return
                self.counts["flagged"] += 1
        files["json"] = json.dumps(meta, sort_keys=True).encode()
        self.writer.add(key, files)
        self.counts["written"] += 1


@dataclass
class PendingAnnotations:
    """A batch's masks with the device half done; `finish` does the host half, on any thread."""

    annotator: MaskAnnotator
    part: DeviceAnnotations
    maps: torch.Tensor  # [B, 2, C, h, w] on the CPU: each pair's slice goes into its sample as attn.npy

    def finish(self) -> list[PairAnnotation]:
        notes = self.annotator.finish(self.part)
        for note, pair_maps, names in zip(notes, self.maps, self.part.classes):
            note.maps = pair_maps[:, : len(names)]
        return notes


class SampleSink:
    """Finishes masks, encodes batches and hands them to the shard writer, off the sampling thread."""

    def __init__(self, pairs: PairWriter, workers: int, jpeg_quality: int, max_pending: int = 2):
        self.pairs = pairs
        self.quality = jpeg_quality
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="encode")
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def submit(self, items: list[tuple[str, dict]], batch: PairBatch,
               annotations: list[PairAnnotation] | PendingAnnotations | None = None) -> None:
        """Queue one batch; blocks when `max_pending` batches are already waiting.

        Pending annotations are finished on the writer thread, before the batch is written;
        an error there, as in encoding, is raised by the next `submit` or by `close`."""
        self.raise_if_failed()
        self.queue.put((items, batch, annotations))

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(*job)
            except BaseException as err:  # surfaced on the sampling thread
                self.error = err

    def _write(self, items: list[tuple[str, dict]], batch: PairBatch,
               annotations: list[PairAnnotation] | PendingAnnotations | None) -> None:
        # PIL releases the GIL while it compresses, so the pool encodes in parallel, and
        # meanwhile this thread finishes the masks (the C++ clean-up releases it too).
        pos_jobs = self.pool.map(lambda im: encode_jpeg(im, self.quality), batch.positives)
        neg_jobs = self.pool.map(lambda im: encode_jpeg(im, self.quality), batch.negatives)
        if isinstance(annotations, PendingAnnotations):
            t0 = time.perf_counter()
            annotations = annotations.finish()
            batch.timings["masks_host_s"] = time.perf_counter() - t0
        pos, neg = list(pos_jobs), list(neg_jobs)
        for i, (key, meta) in enumerate(items):
            self.pairs.write(key, meta, pos[i], neg[i], annotations[i] if annotations else None)

    def raise_if_failed(self) -> None:
        """Raise the writer thread's error, if it had one (it writes nothing after it)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown()
        self.raise_if_failed()


# --- the run ---------------------------------------------------------------------------

def mask_source(config: RunConfig) -> str:
    """What made a sample's mask, as recorded in its JSON: e.g. "attention+sam", "detector"."""
    m = config.masks
    if m.source == "none":
        return "none"
    return f"{m.source}+sam" if m.refine_with_sam else m.source


def sample_metadata(record: PromptRecord, key: str, model_id: str, config: RunConfig,
                    dtype: torch.dtype | None = None) -> dict:
    """A sample's JSON. `dtype` is the one the sampler ran in, which can differ from the requested
    --dtype (float32 on a CPU without bfloat16 instructions): the record says what was done."""
    d = config.diffusion
    ran = str(dtype).removeprefix("torch.") if dtype is not None else d.dtype
    return {
        "key": key, "prompt_id": record.id, "classes": list(record.classes),
        "prompt": record.prompt, "negative_prompt": record.negative_prompt, "seed": record.seed,
        "model": model_id, "preset": config.preset, "steps": d.steps, "guidance": d.guidance,
        "scheduler": d.scheduler, "size": [d.height, d.width], "dtype": ran,
        **({"dtype_requested": d.dtype} if ran != d.dtype else {}),
        "shared_noise": not d.independent_noise, "mask_source": mask_source(config),
    }


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def build_sampler(config: RunConfig, device: str | torch.device, backend: str = "torch",
                  engines: Path | None = None, channels_last: bool | None = None,
                  attention: str = "auto") -> PairedSampler:
    """Load the run's diffusion models and wrap them in a paired sampler running on `backend`.

    `channels_last` (NHWC UNet and VAE weights) defaults to on for a GPU. `attention` holds the
    UNet's attention to one kernel of torch's scaled_dot_product_attention ("auto": its choice).
    Neither changes what a sample shows; `bench tune` measures what each buys.
    """
    check_model_settings(config)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    d = config.diffusion
    if d.fast not in FAST_LEVELS:
        raise UsageError(f"--fast {d.fast} is not a fast level; choose one of {', '.join(map(str, sorted(FAST_LEVELS)))}")
    if d.fast and backend != "torch":
        raise UsageError(f"--fast runs the UNet's own blocks in eager torch, which --backend {backend} does not; "
                         "use --backend torch, or --fast 0")
    device = torch.device(device)
    dtype = resolve_dtype(d.dtype, device)
    models = load_diffusion(d, device, dtype, seed=config.weights_seed, channels_last=channels_last)
    settings = SamplingSettings(height=d.height, width=d.width, steps=d.steps, guidance=d.guidance,
                                scheduler=d.scheduler, independent_noise=d.independent_noise, fast=d.fast)
    latent_shape = (models.latent_channels, d.height // models.vae_scale_factor, d.width // models.vae_scale_factor)
    runners = make_runners(backend, models, engines, latent_shape, capture=config.masks.source != "none")
    runners = with_attention_kernel(runners, models, attention)
    return PairedSampler(models, settings, device, dtype, runners=runners)


@dataclass
class MaskStage:
    """Attention capture during sampling and the annotator that turns its maps into masks."""

    capture: AttentionCapture
    annotator: MaskAnnotator

    def run(self, sampler: PairedSampler, records: Sequence[PromptRecord]) -> tuple[PairBatch, PendingAnnotations]:
        """Sample a batch with capture on and do the device half of its masks; the host half
        (`PendingAnnotations.finish`) is left to the caller, `SampleSink` off this thread."""
        classes = [tuple(r.classes) for r in records]
        self.capture.set_prompts([r.prompt for r in records], classes)
        with self.capture.installed():
            pairs = sampler([r.prompt for r in records], [r.negative_prompt for r in records],
                            [r.seed for r in records], hook=self.capture)
        t0 = time.perf_counter()
        maps = self.capture.maps()
        part = self.annotator.on_device(pairs.positives, maps, classes)
        pending = PendingAnnotations(self.annotator, part, maps.cpu())
        pairs.timings["masks_s"] = time.perf_counter() - t0
        return pairs, pending


def check_model_settings(config: RunConfig) -> None:
    """Settings that are valid alone but wrong together; checked before any model loads."""
    m = config.masks
    if "detector" in m.source and not m.detector_model:
        raise UsageError(f"--mask-source {m.source} needs --detector-model (a Grounding DINO folder or hub id)")
    if m.source != "none" and m.refine_with_sam and config.diffusion.weights == "pretrained" and not config.sam.checkpoint:
        # Random SAM weights on real images would write plausible-looking but meaningless masks.
        raise UsageError("real diffusion weights need real SAM weights: pass --sam-checkpoint "
                         "(a segment-anything .pth) or --no-sam")


def build_annotator(config: RunConfig, device: str | torch.device, dtype: torch.dtype, backend: str = "torch",
                    engines: Path | None = None, *, checked: bool = True) -> MaskAnnotator:
    """The mask annotator of the run, its SAM on `backend` (exported backends read `engines`).

    `checked=False` skips `check_model_settings`: for measurements that pair random SAM or
    detector weights with trained diffusion weights on purpose, and say so in their results.
    """
    if checked:
        check_model_settings(config)
    refiner = None
    if config.masks.refine_with_sam:
        from magicseg_engine.engine.build import sam_identity

        sam = build_sam(config.sam.model_type, config.sam.checkpoint, device=device, dtype=dtype,
                        seed=config.weights_seed)
        refiner = SamRefiner(sam, runners=make_sam_runners(backend, sam, sam_identity(config), engines))
    detector = None
    if "detector" in config.masks.source:
        detector = build_detector(config.masks.detector_model, device=device, seed=config.weights_seed,
                                  box_threshold=config.masks.box_threshold,
                                  text_threshold=config.masks.text_threshold)
    return MaskAnnotator(config.masks, refiner, detector)


def build_mask_stage(config: RunConfig, sampler: PairedSampler, engines: Path | None = None) -> MaskStage | None:
    """The run's mask stage on the sampler's backend, or None when masks are off."""
    if config.masks.source == "none":
        return None
    if config.masks.self_attention_power and sampler.runners.backend not in ("torch", "compile"):
        raise UsageError(f"self-attention refinement of the masks needs the UNet's processors, which "
                         f"--backend {sampler.runners.backend} does not run; use --backend torch or compile")
    capture = AttentionCapture(sampler.models.unet, sampler.models.tokenizer, steps=config.masks.capture_steps,
                               factors=config.masks.attention_factors,
                               self_attention_power=config.masks.self_attention_power)
    sampler.runners.attach_capture(capture)
    return MaskStage(capture, build_annotator(config, sampler.device, sampler.dtype, sampler.runners.backend, engines))


def keyed_records(model_id: str, records: Sequence[PromptRecord]) -> list[tuple[str, PromptRecord]]:
    """Each record with its sample key, in order."""
    return [(sample_key(model_id, r.prompt, r.negative_prompt, r.seed), r) for r in records]


def completed_keys(out: Path, *, verify: bool = True) -> set[str]:
    """Keys never to render again: pairs in finished shards, and pairs dropped by the counterfactual check."""
    return set(finished_keys(out, verify=verify)) | dropped_keys(out)


@dataclass
class RenderResult:
    generated: int
    final_batch_size: int
    counts: dict[str, int]  # PairWriter.counts


def render_pairs(writer: ShardWriter, config: RunConfig, todo: Sequence[tuple[str, PromptRecord]],
                 sampler: PairedSampler, options: ExecutionOptions, masks: MaskStage | None = None,
                 on_batch: Callable[[int], None] | None = None) -> RenderResult:
    """Render `todo`'s (key, record) pairs in order, `options.batch_size` at a time, into `writer`.

    The one rendering loop: a single-process run calls it once for the whole run, a Ray worker
    once per shard it is handed, so both make the same batches from the same records. A CUDA
    out-of-memory error halves the batch and retries it. `on_batch(n)` follows every batch.
    """
    device = sampler.device
    model_id = sampler.models.model_id
    batch_size = max(1, options.batch_size)
    generated = 0
    pair_writer = PairWriter(writer, config.masks.drop_failed_pairs)
    sink = SampleSink(pair_writer, options.encode_workers, options.jpeg_quality)
    try:
        i = 0
        while i < len(todo):
            sink.raise_if_failed()  # a failed write (a full disk) stops the run before the next batch
            chunk = todo[i:i + batch_size]
            try:
                if masks is not None:
                    pairs, annotations = masks.run(sampler, [r for _, r in chunk])
                else:
                    annotations = None
                    pairs = sampler([r.prompt for _, r in chunk], [r.negative_prompt for _, r in chunk],
                                    [r.seed for _, r in chunk])
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not _is_out_of_memory(err) or batch_size == 1:
                    raise
                batch_size //= 2
                log.warning("out of memory at batch size %d; going on with %d", batch_size * 2, batch_size)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            items = [(k, sample_metadata(r, k, model_id, config, sampler.dtype)) for k, r in chunk]
            sink.submit(items, pairs, annotations)
            i += len(chunk)
            generated += len(chunk)
            if on_batch:
                on_batch(len(chunk))
    finally:
        sink.close()
    return RenderResult(generated, batch_size, dict(pair_writer.counts))


def generate_pairs(out: Path, config: RunConfig, records: Sequence[PromptRecord], sampler: PairedSampler,
                   options: ExecutionOptions,
                   progress: Callable[[int, int], None] | None = None,
                   masks: MaskStage | None = None) -> GenerationSummary:
    """Render every record's pair that the run does not hold yet and write it to shards.

    `progress(done, total)` is called once with the work already on disk and after every batch.
    """
    start = time.perf_counter()
    keyed = keyed_records(sampler.models.model_id, records)
    done = completed_keys(out)
    todo = [(k, r) for k, r in keyed if k not in done]
    already = len(keyed) - len(todo)
    if progress:
        progress(already, len(keyed))
    with ShardWriter(out, options.samples_per_shard, options.writer_id) as writer:
        rendered = render_pairs(writer, config, todo, sampler, options, masks,
                                on_batch=(lambda n: progress(n, len(keyed))) if progress else None)
    return GenerationSummary(len(keyed), already, rendered.generated, time.perf_counter() - start,
                             rendered.final_batch_size, **rendered.counts)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the run to stop (`stop_on_signals`); `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Stop on the first SIGINT or SIGTERM as on Ctrl-C, by raising `Interrupted` in the main thread.

    The rendering loop then unwinds cleanly: the batch being sampled is abandoned whole, the
    batches already handed to the writer thread are written, the open shard is finished and
    listed, and nothing else is started. Unhandled, SIGTERM would end the process at once, which
    the run survives too but loses the open shard's samples. A second signal while the first is
    handled ends the process at once: waiting longer on a stuck writer helps nobody, and the run
    directory survives an abrupt end like any kill.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received: list[int] = []

    def handler(signum, frame):
        if received:
            os._exit(128 + signum)
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- annotating an existing run again ------------------------------------------------------------

def _decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def _decoded(sample: dict, member: str, decode: Callable[[bytes], object]):
    """`decode` of one member of a source sample; a damaged member is one line naming it and its shard."""
    try:
        return decode(sample[member])
    except Exception as err:  # PIL and numpy raise many types for damaged bytes
        raise UsageError(f"{member} of sample {sample['__key__']} in shard {sample.get('__url__', '?')} cannot be "
                         f"decoded ({type(err).__name__}: {str(err)[:120]}); restore the shard from a copy") from None


def _pair_maps(data: bytes) -> torch.Tensor:
    maps = decode_attention(data)
    if maps.ndim != 4 or maps.shape[0] != 2:
        raise ValueError(f"maps of shape {tuple(maps.shape)}, not [2, classes, h, w]")
    return maps


def _same_shapes(arrays: list, what: str, batch: list[dict]) -> list:
    if len({tuple(a.shape[-2:]) if what == "maps" else a.shape for a in arrays}) > 1:
        raise UsageError(f"the {what} of samples {batch[0]['__key__']} and {batch[-1]['__key__']} (shard "
                         f"{batch[-1].get('__url__', '?')}) differ in size; a run's pairs all have one size")
    return arrays


def _stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Pairs' [2, C_i, h, w] maps padded with zero maps to [B, 2, max C_i, h, w]."""
    c_max = max(m.shape[1] for m in maps)
    out = torch.zeros(len(maps), 2, c_max, *maps[0].shape[-2:])
    for i, m in enumerate(maps):
        out[i, :, : m.shape[1]] = m
    return out


def reannotate_run(source: Path, out: Path, config: RunConfig, annotator: MaskAnnotator,
                   options: ExecutionOptions, progress: Callable[[int, int], None] | None = None) -> GenerationSummary:
    """Write `source`'s finished pairs into `out` with new masks, reusing their images and the
    attention maps stored at generation time; pairs `out` already holds are skipped.

    Pairs without maps (generated with --mask-source none) take the detector route alone,
    which reads the images only; the attention routes refuse them.
    """
    start = time.perf_counter()
    total = len(finished_keys(source))
    done = finished_keys(out) | dropped_keys(out)
    if progress:
        progress(len(done), total)
    generated = 0
    with ShardWriter(out, options.samples_per_shard, options.writer_id) as writer:
        pair_writer = PairWriter(writer, config.masks.drop_failed_pairs)

        def annotate(batch: list[dict]) -> None:
            metas = [sample_meta(s) for s in batch]
            classes = [tuple(m["classes"]) for m in metas]
            positives = np.stack(_same_shapes([_decoded(s, "pos.jpg", _decode_rgb) for s in batch], "images", batch))
            if all("attn.npy" in s for s in batch):
                maps = _stack_maps(_same_shapes([_decoded(s, "attn.npy", _pair_maps) for s in batch],
                                                "maps", batch)).to(options.device)
                notes = annotator(positives, maps, classes)
            else:
                negatives = np.stack(_same_shapes([_decoded(s, "neg.jpg", _decode_rgb) for s in batch], "images",
                                                  batch))
                notes = annotator(positives, None, classes, negatives=negatives)
            for sample, meta, note in zip(batch, metas, notes):
                meta["mask_source"] = mask_source(config)
                pair_writer.write(sample["__key__"], meta, sample["pos.jpg"], sample["neg.jpg"], note,
                                  attention=sample.get("attn.npy"))
            if progress:
                progress(len(batch), total)

        batch: list[dict] = []
        for sample in iter_samples(source):
            key = sample["__key__"]
            if key in done:
                continue
            for needed in ("pos.jpg", "neg.jpg", "json"):
                if needed not in sample:
                    raise UsageError(f"{source}: sample {key} has no {needed}; this is not a run written by generate")
            if "attn.npy" not in sample and config.masks.source != "detector":
                raise UsageError(f"{source}: sample {key} holds no attention maps (generated with --mask-source none), "
                                 f"which --mask-source {config.masks.source} reads; use --mask-source detector, "
                                 "which needs only the images, or generate it again with masks on")
            batch.append(sample)
            if len(batch) == options.batch_size:
                annotate(batch)
                generated += len(batch)
                batch = []
        if batch:
            annotate(batch)
            generated += len(batch)
    return GenerationSummary(total, len(done), generated, time.perf_counter() - start, options.batch_size,
                             **pair_writer.counts)
