"""The Ray Data actor that renders shards: models loaded once, the single-process loop per shard.

Each actor is one `ShardWriter` writer id for its whole life (the process id plus a random
suffix, so ids never clash across nodes and a shard name says which process wrote it). It
is handed one shard's records at a time and, per shard:

1. opens a `ShardWriter`, whose load repairs what dead writers left (deletes their temporary
   files, lists their renamed but unlisted shards) and reads the finished keys;
2. drops the records whose keys are finished or dropped, so a shard retried after a worker
   died, or after it was written but before Ray heard back, renders only what is missing;
3. renders the rest with `pipeline.render_pairs`, the loop the single-process run uses, and
   closes the writer, which makes the shard durable and lists it in the manifest.

So the manifest is the only state shared between workers, and a pair is finished exactly when
its shard is listed there, whichever worker wrote it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from magicseg_engine.data.shards import ShardWriter
from magicseg_engine.errors import UsageError

# Columns of every row a worker returns, one row per shard it was handed.
RESULT_COLUMNS = ("shard", "worker", "node", "pid", "requested", "skipped", "generated", "seconds", "started",
                  "finished", "final_batch_size", "written", "flagged", "dropped", "classes_not_found", "error")


def new_writer_id() -> str:
    """`p{pid}_{6 hex}`: unique across nodes and restarts, and fits ShardWriter's 32 characters."""
    return f"p{os.getpid()}_{secrets.token_hex(3)}"


class ProgressBoard:
    """Pairs rendered per worker, told by the workers after every batch and read by the driver.

    Ray runs it as a small actor (no CPU reserved); workers call it without waiting for an
    answer, so a slow driver never slows the GPUs.
    """

    def __init__(self) -> None:
        self.workers: dict[str, dict] = {}

    def hello(self, worker: str, node: str, pid: int) -> None:
        self.workers.setdefault(worker, {"node": node, "pid": pid, "pairs": 0})

    def add(self, worker: str, pairs: int) -> None:
        self.workers[worker]["pairs"] += pairs

    def snapshot(self) -> dict[str, dict]:
        return {w: dict(v) for w, v in self.workers.items()}


class ShardWorker:
    """A Ray Data `map_batches` callable class: rows in are shards to render, rows out are results."""

    def __init__(self, out: str, config: dict, model_id: str, batch_size: int, samples_per_shard: int,
                 encode_workers: int, jpeg_quality: int, backend: str, engines: str | None,
                 use_gpu: bool, cpu_threads: int, board=None, channels_last: bool | None = None,
                 attention: str = "auto") -> None:
        import torch

        from magicseg_engine.config import RunConfig
        from magicseg_engine.pipeline import ExecutionOptions, build_mask_stage, build_sampler

        # CPU results depend on the number of intra-op threads (reductions split differently),
        # so every worker uses the count it reserved from Ray, whatever the node has.
        torch.set_num_threads(max(1, cpu_threads))
        self.out = Path(out)
        self.writer_id = new_writer_id()
        self.node = socket.gethostname()
        self.board = board
        self.problem: str | None = None
        self.config = RunConfig.model_validate(config)
        # Ray hides every GPU but the one it gave this actor, so it is always cuda:0 here.
        device = "cuda" if use_gpu else "cpu"
        self.options = ExecutionOptions(device=device, batch_size=batch_size, samples_per_shard=samples_per_shard,
                                        encode_workers=encode_workers, jpeg_quality=jpeg_quality,
                                        writer_id=self.writer_id, channels_last=channels_last, attention=attention)
        try:
            if use_gpu and not torch.cuda.is_available():
                raise UsageError(f"Ray gave worker {self.writer_id} on {self.node} a GPU but torch sees none there; "
                                 "install a CUDA build of torch on that node")
            self.sampler = build_sampler(self.config, device, backend, Path(engines) if engines else None,
                                         channels_last=channels_last, attention=attention)
            self.masks = build_mask_stage(self.config, self.sampler, Path(engines) if engines else None)
            if self.sampler.models.model_id != model_id:
                # Sample keys hash the model id: a node with other weights would write other keys.
                raise UsageError(
                    f"worker {self.writer_id} on {self.node} loaded weights {self.sampler.models.model_id!r}, "
                    f"not the run's {model_id!r}; give every node the same model files at the same path "
                    "(a shared filesystem)")
        except UsageError as err:
            # Raised here, Ray would only report that the actor died; the driver reads it from a row.
            self.problem = str(err)
        if board is not None:
            board.hello.remote(self.writer_id, self.node, os.getpid())

    def __call__(self, batch: dict):
        from magicseg_engine.prompts.records import PromptRecord

        for shard, text in zip(batch["shard"], batch["records"]):
            records = [PromptRecord.model_validate(r) for r in json.loads(str(text))]
            yield _as_batch(self.render_shard(int(shard), records))

    def render_shard(self, shard: int, records: list) -> dict:
        """Render the records of one shard that the run does not hold yet; one result row."""
        from magicseg_engine.pipeline import dropped_keys, keyed_records, render_pairs

        row = {"shard": shard, "worker": self.writer_id, "node": self.node, "pid": os.getpid(), "requested": 0,
               "skipped": 0, "generated": 0, "seconds": 0.0, "started": time.time(), "finished": time.time(),
               "final_batch_size": self.options.batch_size,
               "written": 0, "flagged": 0, "dropped": 0, "classes_not_found": 0, "error": self.problem or ""}
        if self.problem:
            return row
        start = time.perf_counter()
        keyed = keyed_records(self.sampler.models.model_id, records)
        # verify=False: the driver checked every shard's sha256 before scheduling; here, per
        # shard, sizes are enough to see what other workers finished since.
        with ShardWriter(self.out, self.options.samples_per_shard, self.writer_id, verify=False) as writer:
            done = set(writer.state.finished) | dropped_keys(self.out)
            todo = [(k, r) for k, r in keyed if k not in done]
            report = None
            if self.board is not None:
                report = lambda n: self.board.add.remote(self.writer_id, n)  # noqa: E731
            rendered = render_pairs(writer, self.config, todo, self.sampler, self.options, self.masks,
                                    on_batch=report)
        # A batch size halved on out-of-memory stays halved for the next shards.
        self.options.batch_size = rendered.final_batch_size
        row.update(requested=len(keyed), skipped=len(keyed) - len(todo), generated=rendered.generated,
                   seconds=time.perf_counter() - start, finished=time.time(),
                   final_batch_size=rendered.final_batch_size,
                   **rendered.counts)
        return row


def _as_batch(row: dict) -> dict:
    # map_batches wants columns; one shard gives a one-row batch.
    return {name: [row[name]] for name in RESULT_COLUMNS}
