"""generate --ray: same keys and bytes as one process, each pair exactly once after a worker is killed."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.data.shards import MANIFEST, ShardWriter, finished_keys, iter_samples
from magicseg_engine.distributed import RayOptions, generate_on_ray, plan_shards, size_pool
from magicseg_engine.distributed.cluster import ClusterResources
from magicseg_engine.distributed.worker import ShardWorker
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import model_identity
from magicseg_engine.pipeline import ExecutionOptions, generate_pairs, keyed_records, start_run
from magicseg_engine.prompts import build_prompts
from magicseg_engine.vocab import load_vocabulary

TINY = load_preset("tiny")
CLI = str(Path(sys.executable).with_name("magicseg-engine"))


def records(num, seed=0):
    config = TINY.prompts.model_copy(update={"seed": seed})
    return build_prompts(config, vocab=load_vocabulary("voc"), num=num).records


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def samples(out):
    """key -> every file of the sample, as bytes."""
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in iter_samples(out)}


def shard_member_keys(out):
    """Keys of every sample in every shard file on disk, listed or not, with repeats."""
    keys = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")]
    return keys


# --- planning and sizing: no Ray needed ----------------------------------------------------------

def test_shards_hold_whole_batches_in_the_single_process_order():
    todo = list(range(11))
    assert plan_shards(todo, batch_size=2, samples_per_shard=5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    # Every batch the single-process loop makes (todo[i:i+3]) lies inside one shard.
    shards = plan_shards(todo, batch_size=3, samples_per_shard=7)
    assert shards == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert plan_shards(todo, batch_size=8, samples_per_shard=2) == [todo[:8], todo[8:]]  # a batch is never split
    assert plan_shards([], batch_size=2, samples_per_shard=4) == []


def test_pool_defaults_to_one_worker_per_gpu_and_refuses_what_the_cluster_lacks():
    gpus = ClusterResources(cpus=64, gpus=8, nodes=2)
    assert size_pool(gpus, None, None, 1) == (8, 1.0)
    assert size_pool(gpus, None, 0.5, 1) == (16, 0.5)
    assert size_pool(ClusterResources(cpus=2, gpus=0, nodes=1), None, None, 1) == (2, 0.0)
    with pytest.raises(UsageError, match="need 12 GPUs; the Ray cluster has 8"):
        size_pool(gpus, 12, 1, 1)
    with pytest.raises(UsageError, match="need 4 CPUs; the Ray cluster has 2"):
        size_pool(ClusterResources(cpus=2, gpus=0, nodes=1), 2, 0, 2)
    with pytest.raises(UsageError, match="--workers must be at least 1"):
        size_pool(gpus, 0, 1, 1)


# --- bad input: one line, exit 2, nothing written -------------------------------------------------

def test_without_ray_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    out = tmp_path / "run"
    result = invoke("generate", "--ray", "--classes", "voc", "--num-pairs", 2, "--out", out)
    assert result.exit_code == 2, result.output
    assert "pip install 'magicseg-engine[ray]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--workers", 2], "--workers: only with --ray"),
    (["--ray-address", "10.0.0.1:6379", "--num-gpus-per-worker", 1], "--ray-address, --num-gpus-per-worker: only with --ray"),
    (["--ray", "--device", "cpu"], "--device is for a single-process run"),
])
def test_ray_flags_out_of_place_are_refused(tmp_path, args, message):
    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 2, "--out", out, *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not out.exists()


def _generate_with_address(out, address, timeout_s):
    cmd = [CLI, "generate", "--ray", "--ray-address", address, "--ray-timeout", str(timeout_s),
           "--classes", "voc", "--num-pairs", "2", "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_an_unreachable_ray_address_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc, _ = _generate_with_address(tmp_path / "run", f"127.0.0.1:{port}", 20)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach the Ray head at 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_head_that_never_answers_is_given_up_after_the_timeout(tmp_path):
    with socket.socket() as silent:  # accepts TCP connections, says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        proc, _ = _generate_with_address(tmp_path / "run", f"127.0.0.1:{port}", 3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"could not join the Ray cluster at 127.0.0.1:{port} within 3 s" in proc.stderr
    assert not (tmp_path / "run").exists()


# --- the worker's shard logic, in this process ----------------------------------------------------

@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A ShardWorker built here, without Ray. It pins torch to one thread, as Ray workers run."""
    threads = torch.get_num_threads()
    model_id = model_identity(TINY.diffusion, "cpu", seed=TINY.seed)
    built = ShardWorker(out=str(tmp_path_factory.mktemp("unused")), config=TINY.model_dump(mode="json"),
                        model_id=model_id, batch_size=2, samples_per_shard=6, encode_workers=2, jpeg_quality=95,
                        backend="torch", engines=None, use_gpu=False, cpu_threads=1)
    assert built.problem is None, built.problem
    # The coordinator's key for a model equals the key of the model the worker loaded.
    assert built.sampler.models.model_id == model_id
    yield built
    torch.set_num_threads(threads)


def test_a_worker_builds_its_models_with_the_runs_layout_and_attention_kernel(tmp_path):
    model_id = model_identity(TINY.diffusion, "cpu", seed=TINY.seed)
    common = dict(out=str(tmp_path), config=TINY.model_dump(mode="json"), model_id=model_id, batch_size=2,
                  samples_per_shard=6, encode_workers=1, jpeg_quality=95, backend="torch", engines=None,
                  use_gpu=False, cpu_threads=1)
    threads = torch.get_num_threads()
    try:
        nhwc = ShardWorker(**common, channels_last=True, attention="math")
        assert nhwc.problem is None and nhwc.sampler.models.channels_last
        assert (nhwc.options.channels_last, nhwc.options.attention) == (True, "math")
        # This CPU has no memory-efficient kernel: the worker reports it as a problem row, not a crash.
        lacking = ShardWorker(**common, attention="efficient")
        assert "--attention efficient" in lacking.problem
    finally:
        torch.set_num_threads(threads)


def test_a_retried_shard_renders_only_the_pairs_no_shard_holds(tmp_path, worker):
    recs = records(6)
    start_run(tmp_path, TINY, recs)
    keyed = keyed_records(worker.sampler.models.model_id, recs)
    # A worker that died after renaming its shard into place but before listing it in the
    # manifest: the shard holds the first batch, the manifest nothing.
    with ShardWriter(tmp_path, 100, "p1_dead00") as dead:
        for key, _ in keyed[:2]:
            dead.add(key, {"json": b"{}", "pos.jpg": b"x", "neg.jpg": b"x"})
    (tmp_path / MANIFEST).write_bytes(b"")
    worker.out = tmp_path
    row = worker.render_shard(0, recs)
    assert row["error"] == ""
    assert (row["requested"], row["skipped"], row["generated"]) == (6, 2, 4)
    assert sorted(shard_member_keys(tmp_path)) == sorted(k for k, _ in keyed)  # each once
    assert finished_keys(tmp_path) == {k for k, _ in keyed}
    # Handed the same shard again (Ray retries a shard whose result it never got): nothing to do.
    again = worker.render_shard(0, recs)
    assert (again["skipped"], again["generated"]) == (6, 0)
    assert sorted(shard_member_keys(tmp_path)) == sorted(k for k, _ in keyed)


def test_a_worker_with_other_weights_refuses_to_render(tmp_path, worker, monkeypatch):
    import magicseg_engine.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build_sampler", lambda *a, **k: worker.sampler)
    monkeypatch.setattr(pipeline, "build_mask_stage", lambda *a, **k: worker.masks)
    other = ShardWorker(out=str(tmp_path), config=TINY.model_dump(mode="json"), model_id="another-model@123",
                        batch_size=2, samples_per_shard=6, encode_workers=1, jpeg_quality=95, backend="torch",
                        engines=None, use_gpu=False, cpu_threads=1)
    row = other.render_shard(0, records(2))
    assert "not the run's 'another-model@123'" in row["error"] and "same path" in row["error"]
    assert row["generated"] == 0 and not (tmp_path / "shards").exists()


# --- on a local Ray instance ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'magicseg-engine[ray]'")
    # Two CPUs, one per worker: the machine this runs on may have no more.
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


_TEMP_SHARD = re.compile(r"^\.magicseg-p(?P<pid>\d+)_[0-9a-f]+-\d+\.tar\..+\.tmp$")


class KillWorkerMidShard(threading.Thread):
    """SIGKILLs the first Ray worker seen with a shard open (its temporary file exists).

    The worker's writer id starts with its process id, which the temporary file's name carries.
    """

    def __init__(self, shards_dir: Path):
        super().__init__(daemon=True)
        self.shards_dir = shards_dir
        self.killed: int | None = None
        self.left_temp = False  # the dead worker's shard stayed a temporary file: it died mid-shard
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name in os.listdir(self.shards_dir) if self.shards_dir.is_dir() else []:
                m = _TEMP_SHARD.match(name)
                if m and self._is_ray_worker(int(m["pid"])):
                    os.kill(int(m["pid"]), signal.SIGKILL)
                    self.killed = int(m["pid"])
                    self._wait_gone(self.killed)
                    self.left_temp = (self.shards_dir / name).exists()
                    return
            time.sleep(0.01)

    @staticmethod
    def _is_ray_worker(pid: int) -> bool:
        try:
            return b"ray::" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    @classmethod
    def _wait_gone(cls, pid: int) -> None:
        """Until the process has stopped running (a zombie has no command line left)."""
        deadline = time.monotonic() + 5
        while cls._is_ray_worker(pid) and time.monotonic() < deadline:
            time.sleep(0.001)


@pytest.mark.slow
def test_two_workers_one_killed_mid_shard_give_each_pair_once_with_single_process_bytes(tmp_path, worker, local_ray):
    recs = records(12)
    model_id = worker.sampler.models.model_id
    expected = {k for k, _ in keyed_records(model_id, recs)}
    execution = ExecutionOptions(batch_size=2, samples_per_shard=6, encode_workers=2)

    # The single-process run, with one thread as each Ray worker has.
    single = tmp_path / "single"
    start_run(single, TINY, recs)
    generate_pairs(single, TINY, recs, worker.sampler, execution, masks=worker.masks)

    out = tmp_path / "ray"
    start_run(out, TINY, recs)
    killer = KillWorkerMidShard(out / "shards")
    killer.start()
    try:
        result = generate_on_ray(out, TINY, recs, model_id, RayOptions(workers=2, execution=execution))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no worker was seen with a shard open"
    assert killer.left_temp, "the worker finished its shard before the kill landed"
    assert killer.killed not in {w.pid for w in result.workers.values()}  # it never finished a shard

    # Exactly the requested pairs, each in one shard once; the killed worker's shard left nothing torn.
    assert sorted(shard_member_keys(out)) == sorted(expected)
    manifest = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert sorted(k for entry in manifest for k in entry["keys"]) == sorted(expected)
    assert not list(out.rglob("*.tmp"))
    assert result.summary.requested == 12 and result.summary.already_done == 0
    assert result.summary.generated == 12  # the killed shard was in no manifest line, so it was redone

    # Same keys, same bytes (images, masks, attention maps, metadata) as the single-process run.
    got, want = samples(out), samples(single)
    assert set(got) == set(want) == expected
    for key in want:
        assert got[key] == want[key], key

    # Resuming finds everything done and starts no worker.
    again = generate_on_ray(out, TINY, recs, model_id, RayOptions(workers=2, execution=execution))
    assert (again.summary.generated, again.summary.already_done) == (0, 12)
    assert not again.workers
    assert sorted(shard_member_keys(out)) == sorted(expected)


@pytest.mark.slow
def test_generate_ray_command_writes_a_resumable_run(tmp_path, local_ray):
    out = tmp_path / "run"
    base = ["generate", "--ray", "--workers", 1, "--num-gpus-per-worker", 0, "--classes", "voc", "--num-pairs", 4,
            "--seed", 2, "--batch-size", 2, "--samples-per-shard", 2, "--out", out, "--attention", "math"]
    result = invoke(*base)
    assert result.exit_code == 0, result.output
    assert "4 pairs generated on 1 Ray worker," in result.stderr and "pairs/s" in result.stderr
    assert len(finished_keys(out)) == 4 and len(list((out / "shards").glob("*.tar"))) == 2
    session = json.loads((out / "run.json").read_text())["sessions"][-1]
    assert session["ray"] is True and session["workers"] == 1 and session["generated"] == 4
    assert session["attention"] == "math" and session["channels_last"] is False  # CPU workers: NCHW
    # The run is an ordinary run: a single-process resume finds nothing left to do.
    result = invoke(*base[:1], *base[6:], "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "0 pairs generated, 4 were already done" in result.stderr


@pytest.mark.slow
def test_on_ray_the_driver_owns_the_balance_schedule(tmp_path, local_ray):
    """--balance with --ray: the driver counts, draws the top-up prompts and hands them to the pool."""
    out = tmp_path / "run"
    result = invoke("generate", "--ray", "--workers", 1, "--num-gpus-per-worker", 0, "--classes", "voc",
                    "--num-pairs", 4, "--seed", 2, "--batch-size", 2, "--samples-per-shard", 2, "--out", out,
                    "--no-sam", "--drop-failed-pairs", "--max-counterfactual-coverage", 0.0, "--balance")
    assert result.exit_code == 0, result.output
    balance = json.loads((out / "run.json").read_text())["balance"]
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert balance["rounds"] and len(records) == 4 + sum(r["pairs"] for r in balance["rounds"]) <= 6
    dropped = (out / "dropped.jsonl").read_text().splitlines() if (out / "dropped.jsonl").exists() else []
    assert len(finished_keys(out)) + len(dropped) == len(records)  # the top-ups were rendered on Ray
    assert balance["short"] and "classes still short" in result.stderr
