"""Generation on Ray Data: the single-process run's dataset, rendered by a pool of GPU actors.

The driver (the `generate --ray` process) keys every record, leaves out the keys the manifest
already holds, and cuts the rest into shards of whole batches. The shards become a Ray
dataset, one row each; `map_batches` hands them to a fixed pool of `ShardWorker` actors, each
with its models on its own GPU, at most `tasks_per_worker` at a time per actor. That queue is
the back-pressure between prompts and GPUs; inside an actor the sample sink's bounded queue
does the same between the GPU and JPEG encoding and writing. Actors write their shards
themselves, so images never travel through Ray; each returns one small row per shard.

Exactly once: a pair is finished when its shard is listed in the manifest. Ray restarts an
actor that dies and hands its unfinished shards to the pool again; the worker that takes one
first repairs what the dead one left (a temporary file is deleted, a shard renamed but not
listed is listed) and renders only the keys that are still missing. At the end the driver
checks that every requested key is finished.

Identical output: a shard holds `samples_per_shard // batch_size` whole batches, cut from the
same ordered list the single-process run walks, so every batch has the same pairs as there
and the images have the same bytes (on CPUs, with the same number of threads per process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from magicseg_engine.config import RunConfig
from magicseg_engine.distributed.cluster import ClusterResources, require_ray
from magicseg_engine.distributed.worker import ProgressBoard, ShardWorker
from magicseg_engine.errors import UsageError
from magicseg_engine.pipeline import ExecutionOptions, GenerationSummary, completed_keys, keyed_records
from magicseg_engine.prompts.records import PromptRecord

_COUNTS = ("written", "flagged", "dropped", "classes_not_found")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RayRunError(RuntimeError):
    """A worker failed for a reason other than bad input; finished shards are kept."""


@dataclass
class RayOptions:
    """How the run spreads over the cluster; none of it changes what a sample looks like."""

    workers: int
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    backend: str = "torch"
    engines: Path | None = None
    # Shards queued per actor: one rendering and one waiting, so a GPU never idles between
    # shards, and no more, so a slow actor does not sit on work the others could do.
    tasks_per_worker: int = 2


@dataclass
class WorkerStats:
    node: str
    pid: int
    shards: int = 0
    pairs: int = 0
    seconds: float = 0.0  # time spent rendering and writing its shards

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RaySummary:
    summary: GenerationSummary  # its seconds include connecting and the workers loading their models
    workers: dict[str, WorkerStats]
    render_seconds: float = 0.0  # from the first shard started to the last one finished, any worker

    @property
    def render_pairs_per_second(self) -> float:
        """The cluster's rate once workers were rendering: what more workers add to."""
        return self.summary.generated / self.render_seconds if self.render_seconds > 0 else 0.0


class RayProgress(Protocol):
    def start(self, done: int, total: int) -> None:
        """Once, before any work: pairs already on disk, pairs requested."""

    def pairs(self, worker: str, n: int) -> None:
        """`worker` rendered `n` more pairs (0 when it is first seen: models loaded, no batch yet)."""


def plan_shards(todo: Sequence[tuple[str, PromptRecord]], batch_size: int,
                samples_per_shard: int) -> list[list[tuple[str, PromptRecord]]]:
    """Cut `todo` into shards of whole batches: the batches are the single-process run's."""
    per_shard = max(1, samples_per_shard // batch_size) * batch_size
    return [list(todo[i:i + per_shard]) for i in range(0, len(todo), per_shard)]


def size_pool(resources: ClusterResources, workers: int | None, gpus_per_worker: float | None,
              cpus_per_worker: int) -> tuple[int, float]:
    """(workers, GPUs per worker) for this cluster; by default one worker per GPU, or CPU workers
    on a cluster without GPUs. A pool the cluster cannot hold is refused here rather than left
    waiting for resources that never come."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if cpus_per_worker < 1:
        raise UsageError(f"--cpus-per-worker must be at least 1, got {cpus_per_worker}")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.gpus >= 1 else 0.0
    if gpus_per_worker < 0:
        raise UsageError(f"--num-gpus-per-worker must be 0 (CPU workers) or more, got {gpus_per_worker:g}")
    if workers is None:
        by_gpu = int(resources.gpus // gpus_per_worker) if gpus_per_worker > 0 else None
        by_cpu = int(resources.cpus // cpus_per_worker)
        workers = max(1, min(n for n in (by_gpu, by_cpu) if n is not None))
    need_gpus, need_cpus = workers * gpus_per_worker, workers * cpus_per_worker
    if need_gpus > resources.gpus:
        raise UsageError(f"{workers} workers × {gpus_per_worker:g} GPUs need {need_gpus:g} GPUs; the Ray cluster has "
                         f"{resources.gpus:g}; lower --workers, or --num-gpus-per-worker 0 for CPU workers")
    if need_cpus > resources.cpus:
        raise UsageError(f"{workers} workers × {cpus_per_worker} CPUs need {need_cpus} CPUs; the Ray cluster has "
                         f"{resources.cpus:g}; lower --workers or --cpus-per-worker")
    return workers, gpus_per_worker


def generate_on_ray(out: Path, config: RunConfig, records: Sequence[PromptRecord], model_id: str,
                    options: RayOptions, progress: RayProgress | None = None) -> RaySummary:
    """Render every record's pair that the run in `out` does not hold yet, on the connected Ray cluster.

    `model_id` is what the workers' models will report (`generate.models.model_identity`);
    a worker whose weights differ refuses to render rather than write other keys.
    """
    ray = require_ray()
    start = time.perf_counter()
    keyed = keyed_records(model_id, records)
    done = completed_keys(out)  # verified against every shard's sha256, once, here
    todo = [(k, r) for k, r in keyed if k not in done]
    if progress:
        progress.start(len(keyed) - len(todo), len(keyed))
    execution = options.execution
    shards = plan_shards(todo, execution.batch_size, execution.samples_per_shard)
    workers: dict[str, WorkerStats] = {}
    totals = {"generated": 0, **{c: 0 for c in _COUNTS}}
    final_batch_size = execution.batch_size
    first_start, last_finish = float("inf"), 0.0
    if shards:
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(ray, board, progress, stop), name="ray-progress",
                                    daemon=True)
        if progress:
            follower.start()
        try:
            with contextlib.closing(_run(ray, out, config, model_id, options, shards, board)) as results:
                for row in results:
                    if row["error"]:
                        raise UsageError(row["error"])
                    stats = workers.setdefault(row["worker"], WorkerStats(row["node"], int(row["pid"])))
                    stats.shards += 1
                    stats.pairs += int(row["generated"])
                    stats.seconds += float(row["seconds"])
                    totals["generated"] += int(row["generated"])
                    for c in _COUNTS:
                        totals[c] += int(row[c])
                    final_batch_size = min(final_batch_size, int(row["final_batch_size"]))
                    if int(row["generated"]):
                        first_start = min(first_start, float(row["started"]))
                        last_finish = max(last_finish, float(row["finished"]))
        finally:
            stop.set()
            if follower.is_alive():
                follower.join(timeout=15)
            ray.kill(board)
    # Workers hold their writer lock only while they write a shard, so this load can also
    # repair what a killed worker left that no later shard of the run has repaired yet.
    finished = completed_keys(out, verify=False)
    missing = sum(1 for k, _ in keyed if k not in finished)
    if missing:
        raise RayRunError(f"{missing} of {len(keyed)} pairs are not in {out} after the Ray run; "
                          "run the same command with --resume to render them")
    summary = GenerationSummary(len(keyed), len(keyed) - len(todo), totals["generated"],
                                time.perf_counter() - start, final_batch_size,
                                **{c: totals[c] for c in _COUNTS})
    return RaySummary(summary, workers, max(0.0, last_finish - first_start))


def _run(ray, out: Path, config: RunConfig, model_id: str, options: RayOptions,
         shards: list[list[tuple[str, PromptRecord]]], board):
    """Result rows of the worker pool, one per shard, as they finish."""
    context = ray.data.DataContext.get_current()
    # The caller draws its own progress, per worker; Ray Data's bars and its notes about them
    # would interleave with it.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    rows = [{"shard": i, "records": json.dumps([r.model_dump(mode="json") for _, r in shard])}
            for i, shard in enumerate(shards)]
    execution = options.execution
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardWorker,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers,
                                           max_tasks_in_flight_per_actor=options.tasks_per_worker),
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        fn_constructor_kwargs={
            "out": str(Path(out).resolve()), "config": config.model_dump(mode="json"), "model_id": model_id,
            "batch_size": execution.batch_size, "samples_per_shard": execution.samples_per_shard,
            "encode_workers": execution.encode_workers, "jpeg_quality": execution.jpeg_quality,
            "channels_last": execution.channels_last, "attention": execution.attention,
            "backend": options.backend, "engines": str(options.engines) if options.engines else None,
            "use_gpu": options.gpus_per_worker > 0, "cpu_threads": options.cpus_per_worker, "board": board,
        },
    )
    iterator = iter(dataset.iter_rows())
    try:
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except ray.exceptions.RayError as err:
                raise RayRunError(f"a Ray worker failed ({_last_line(err)}); the shards finished so far are "
                                  "kept: run the same command with --resume") from None
            yield row
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops the pool when the caller leaves early


def _last_line(err: BaseException) -> str:
    """The remote exception's own line: Ray puts it last, after its traceback."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _follow(ray, board, progress: RayProgress, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Turn the board's per-worker counts into progress calls until `stop`, then once more."""
    seen: dict[str, int] = {}
    while True:
        stopping = stop.wait(interval_s)
        try:
            snapshot = ray.get(board.snapshot.remote(), timeout=10)
        except Exception:  # a busy or restarting cluster: the next poll catches up
            snapshot = {}
        for worker, info in sorted(snapshot.items()):
            delta = info["pairs"] - seen.get(worker, 0)
            if worker not in seen or delta:
                seen[worker] = info["pairs"]
                progress.pairs(worker, delta)
        if stopping:
            return
