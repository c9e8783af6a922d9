"""Kill anywhere: SIGKILL `magicseg-engine generate` at random instants until its run completes, then
check that the run holds each requested pair exactly once and nothing else. `--command` kills
`masks`, `export`, `pretrain` or `generate --ray` the same way instead (see "Other commands").

    python benchmarks/soak.py --kills 50 --pairs 6 --seed 0 --out /tmp/soak --json soak.json
    python benchmarks/soak.py --kills 500 --pairs 12 --seed 1 --out /tmp/soak-long --json soak-long.json
    python benchmarks/soak.py --command masks --kills 20 --pairs 6 --out /tmp/soak-masks --json soak-masks.json

Each attempt is `magicseg-engine generate --preset tiny --classes voc --num-pairs P --batch-size 2
--samples-per-shard 3 --device cpu --out DIR/run --resume`: small shards, so that shards finish
often, each spanning two batches, so that a shard is open while a batch renders. It is SIGKILLed
after a delay drawn from a seeded RNG: mostly uniform between the process's start and an upper
bound adapted to what the run has left (the observed time to load plus the observed time per
pair, times the pairs left), some very early (while it loads). Starting or replacing a run takes
under 10 ms, too short for timed kills to hit often, so until the run is started some delays are
drawn around the observed end of loading, and some kills come 0-15 ms after the run folder first
changes (in a started run that first change is the session's summary, so those kills hit the
finish). Then it is resumed with `--resume`, until the kills are spent and a last attempt runs to
the end. A run that completes before the kills are spent is checked and replaced by the next
round, `--overwrite` with the next seed, so overwrites are killed as well; a `--resume` refused
because the overwrite was killed before it replaced run.json (the old run is intact) is answered
with `--overwrite` again, as a user would.

Every completed run is checked: run.json started (not "starting") with the round's settings,
prompts.jsonl the round's prompts, exactly the requested samples (each key once: none lost, none
duplicated, none from an earlier round), every shard read completely by `tarfile` and `webdataset`,
the manifest consistent with the shard files (names, sizes, sha256, keys in order), and no
temporary file left in the run folder. The JSON (--json) records the kills, their phases (seen from
the run folder after each kill), the samples lost and duplicated (both must be 0) and the time.

--spawn fork (the default) starts each attempt by forking a helper process that imported the
engine once (torch, diffusers, transformers: about 8 s of imports on a 2-core machine), so an
attempt costs what the run itself does; each attempt is still its own process, running the CLI
exactly as the console script does, and killed with SIGKILL. --spawn exec runs the console script
itself for every attempt (its imports included): the same kills at about ten times the cost.

Other commands share the launchers and the kill timing; each has its own folder, resume and check:

- masks: a finished tiny run (generated once, uninterrupted) annotated again into a new run
  folder, `--resume` after each kill; rounds alternate `--max-counterfactual-coverage`, which
  every sample's JSON records, and replace each other with `--overwrite`. Checked: run.json and
  prompts.jsonl, every source pair exactly once and annotated by this round, its images the
  source's bytes, the shard and manifest checks above, nothing left over.
- export: the same command run again after each kill (an export resumes so); rounds cycle
  coco, mmseg and hf, each compared file by file with an uninterrupted export (byte-identical,
  nothing missing or left over).
- pretrain: `--resume` after each kill (without it when the kill came before the run wrote
  anything, as the refusal says); rounds alternate plain steps and `--grad-accum 2 --workers 1`.
  Checked against an uninterrupted run: every checkpoint kept bitwise (weights, optimiser,
  schedule, loader position), the metrics of every step once with the same losses, the other
  files byte-identical, nothing left over.
- ray: `generate --ray --workers 2` on a local Ray instance per attempt; attempts take turns at
  a worker SIGKILLed with its shard open and then the driver, a worker alone (the driver goes
  on), and the driver alone. The fork helper adopts and kills what a dead driver leaves running.
  Completed runs get the generate check.

Kills are timed mostly from the attempt's first write in its folder (where loading ends),
log-uniform over the work it has left; rounds that differ (formats, settings) share the kills.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TOP_LEVEL = {"run.json", "prompts.jsonl", "manifest.jsonl", "shards", ".locks", "dropped.jsonl"}
PHASES = ("loading", "first_batch", "before_run_json", "overwrite_before_run_json", "starting", "started",
          "shard_open", "between_shards", "finishing")


# --- attempts: one process each ------------------------------------------------------------------

def _wait_or_kill(poll, kill, start: float, delay: float | None, timeout: float, watch: str | None = None,
                  after_change: float | None = None, side=None) -> tuple[bool, bool]:
    """Wait for the process to end, or SIGKILL it: `delay` seconds after `start`, or, with
    `after_change`, that long after the directory `watch` first changes (an entry created,
    renamed or deleted). `side`, when given, is called on every turn of the wait (it kills a
    Ray worker when one has a shard open) and may return a time to kill the process at.
    Returns (kill sent, timed out)."""
    deadline = start + (delay if delay is not None else timeout)
    first = _dir_state(watch) if after_change is not None else None
    triggered = False
    while poll() is None:
        now = time.monotonic()
        if side is not None:
            at = side()  # a Ray worker was killed: the driver follows at `at`
            if at is not None and not triggered:
                triggered, deadline = True, min(deadline, at)
        if after_change is not None and not triggered and _dir_state(watch) != first:
            triggered, deadline = True, min(deadline, now + after_change)
        if now >= deadline:
            kill()
            return True, delay is None and not triggered
        time.sleep(0.001 if after_change is not None or side is not None else min(0.002, deadline - now))
    return False, False


def _dir_state(path: str | None) -> tuple | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, TypeError):
        return None
    return st.st_ino, st.st_mtime_ns


class ExecLauncher:
    """Each attempt runs the console script: imports and all."""

    def __init__(self) -> None:
        script = Path(sys.executable).with_name("magicseg-engine")
        self.command = [str(script)] if script.exists() else [shutil.which("magicseg-engine") or "magicseg-engine"]

    def run(self, argv: list[str], log: Path, delay: float | None, timeout: float, watch: str | None = None,
            after_change: float | None = None, kill_worker_in: str | None = None, worker_delay: float = 0.0,
            driver_after: float | None = None) -> dict:
        with open(log, "wb") as f:
            wall, start = time.time(), time.monotonic()
            proc = subprocess.Popen(self.command + argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            worker = WorkerKiller(Path(kill_worker_in), start + worker_delay, driver_after) if kill_worker_in else None
            sent, timed_out = _wait_or_kill(proc.poll, proc.kill, start, delay, timeout, watch, after_change,
                                            side=worker.poll if worker else None)
            code = proc.wait()
        reply = {"code": code, "killed": sent and code == -signal.SIGKILL, "timed_out": timed_out,
                 "elapsed": time.monotonic() - start, "wall_start": wall}
        if worker is not None:
            reply["worker_killed"], reply["worker_left_temp"] = worker.killed, worker.left_temp
        return reply

    def close(self) -> None:
        pass


class ForkLauncher:
    """Each attempt is forked from a helper that imported the engine once (`zygote`): the modules
    in `warm`, or those a tiny generate needs. With `reap`, the helper also adopts what an attempt
    leaves running when it dies (Ray's processes, which outlive a SIGKILLed driver) and kills it
    before answering, so no attempt leaks processes into the next."""

    def __init__(self, warm: tuple[str, ...] | None = None, reap: bool = False) -> None:
        argv = [sys.executable, __file__, "--zygote"]
        if warm is not None:
            argv += ["--warm", ",".join(warm)]
        if reap:
            argv.append("--reap")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._reply(timeout=600)
        self.threads = ready["threads"]

    def _reply(self, timeout: float) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError("the soak helper process does not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the soak helper process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, argv: list[str], log: Path, delay: float | None, timeout: float, watch: str | None = None,
            after_change: float | None = None, kill_worker_in: str | None = None,
            worker_delay: float = 0.0, driver_after: float | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "delay": delay, "timeout": timeout,
                                          "watch": watch, "after_change": after_change,
                                          "kill_worker_in": kill_worker_in, "worker_delay": worker_delay,
                                          "driver_after": driver_after}) + "\n")
        return self._reply(timeout=timeout + 60)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Modules a tiny generate imports, some lazily (diffusers' and transformers' classes): imported
# once in the helper, never run there, so every forked attempt starts with them loaded and no
# thread or device state from the helper.
_WARM_MODULES = ("magicseg_engine.cli", "magicseg_engine.pipeline", "magicseg_engine.balance", "magicseg_engine.prompts",
                 "magicseg_engine.vocab", "magicseg_engine.generate.models", "magicseg_engine.masks.annotate",
                 "magicseg_engine.masks.sam", "magicseg_engine.masks.detector", "magicseg_engine.engine.build",
                 "segment_anything", "segment_anything.modeling", "open_clip.tokenizer", "webdataset")
_WARM_NAMES = {"diffusers": ("AutoencoderKL", "UNet2DConditionModel", "DDIMScheduler", "DPMSolverMultistepScheduler",
                             "EulerDiscreteScheduler", "UniPCMultistepScheduler"),
               "transformers": ("CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection")}


def zygote(warm: tuple[str, ...] | None = None, reap: bool = False) -> None:
    """The fork helper: import, then for each request line fork one attempt, kill it on time, answer."""
    import importlib

    for name in _WARM_MODULES if warm is None else warm:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # optional: the attempt imports it itself if it needs it
    for name, attrs in _WARM_NAMES.items():
        module = importlib.import_module(name)
        for attr in attrs:
            getattr(module, attr, None)
    if reap:
        _become_subreaper()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    print(json.dumps({"ready": True, "threads": threads}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        wall, start = time.time(), time.monotonic()
        pid = os.fork()
        if pid == 0:
            _attempt(req["argv"], log)
        os.close(log)
        status: list[int] = []

        def poll() -> int | None:
            if not status:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status.append(st)
            return status[0] if status else None

        worker = WorkerKiller(Path(req["kill_worker_in"]), start + req.get("worker_delay", 0.0),
                              req.get("driver_after")) if req.get("kill_worker_in") else None
        sent, timed_out = _wait_or_kill(poll, lambda: os.kill(pid, signal.SIGKILL), start, req["delay"], req["timeout"],
                                        req["watch"], req["after_change"], side=worker.poll if worker else None)
        if not status:
            status.append(os.waitpid(pid, 0)[1])
        code = os.waitstatus_to_exitcode(status[0])
        reply = {"code": code, "killed": sent and code == -signal.SIGKILL, "timed_out": timed_out,
                 "elapsed": time.monotonic() - start, "wall_start": wall}
        if worker is not None:
            reply["worker_killed"] = worker.killed
            reply["worker_left_temp"] = worker.left_temp
        if reap:
            reply["reaped"] = _reap_orphans()
        print(json.dumps(reply), flush=True)


# Ray's worker processes write shards as `.magicseg-p{pid}_{hex}-{seq}.tar.{random}.tmp`: the
# writer id starts with the process id (distributed/worker.py), so the file names the worker.
_RAY_TEMP_SHARD = re.compile(r"^\.magicseg-p(?P<pid>\d+)_[0-9a-f]+-\d+\.tar\..+\.tmp$")


class WorkerKiller:
    """SIGKILLs one Ray worker, the first seen with a shard open (its temporary shard exists)
    after `not_before`. The attempt goes on, unless `driver_after` is given: `poll` then returns
    the time to kill the driver, that many seconds after the worker."""

    def __init__(self, shards_dir: Path, not_before: float, driver_after: float | None = None) -> None:
        self.shards_dir, self.not_before, self.driver_after = shards_dir, not_before, driver_after
        self.killed: int | None = None
        self.left_temp = False
        self._next = 0.0

    def poll(self) -> float | None:
        now = time.monotonic()
        if self.killed is not None:
            return None if self.driver_after is None else self._killed_at + self.driver_after
        if now < max(self.not_before, self._next):
            return None
        self._next = now + 0.01  # listing the folder every 10 ms is plenty for a shard that takes seconds
        try:
            names = os.listdir(self.shards_dir)
        except FileNotFoundError:
            return
        for name in names:
            m = _RAY_TEMP_SHARD.match(name)
            if m and _is_ray_worker(int(m["pid"])):
                os.kill(int(m["pid"]), signal.SIGKILL)
                self.killed, self._killed_at = int(m["pid"]), time.monotonic()
                deadline = time.monotonic() + 5
                while _is_ray_worker(self.killed) and time.monotonic() < deadline:
                    time.sleep(0.001)
                self.left_temp = (self.shards_dir / name).exists()
                return None
        return None


def _is_ray_worker(pid: int) -> bool:
    try:
        return b"ray::" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _become_subreaper() -> None:
    """Orphans of this process's descendants become its children (Linux), so they can be reaped."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _reap_orphans(grace_s: float = 10.0) -> int:
    """Wait up to `grace_s` for what the attempt left running to exit by itself (a local Ray
    instance shuts down once its driver is gone), then SIGKILL the rest, descendants first;
    each is a process this helper started, adopted back. Returns how many were killed."""
    me = os.getpid()
    deadline = time.monotonic() + grace_s
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        left = _children(me)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    killed = 0
    todo = list(left)
    order: list[int] = []
    while todo:  # every descendant, parents before children
        pid = todo.pop()
        order.append(pid)
        todo += _children(pid)
    for pid in reversed(order):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    for pid in left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    return killed


def _attempt(argv: list[str], log: int) -> None:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        from magicseg_engine.cli import app

        app(args=argv, prog_name="magicseg-engine")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# --- the run folder, seen from outside ------------------------------------------------------------

@dataclass
class Snapshot:
    run_json: dict | None
    finished: int
    shard_names: tuple[str, ...]
    temps: tuple[str, ...]
    signature: tuple

    @property
    def seed(self) -> int | None:
        return (self.run_json or {}).get("config", {}).get("seed")

    @property
    def starting(self) -> bool:
        return self.run_json is not None and "starting" in self.run_json

    @property
    def sessions(self) -> int:
        return len((self.run_json or {}).get("sessions", []))


def snapshot(run: Path) -> Snapshot:
    if not run.is_dir():
        return Snapshot(None, 0, (), (), ())
    try:
        run_json = json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run_json = None
    finished, names = 0, []
    for line in _manifest_lines(run):
        finished += len(line["keys"])
        names.append(line["shard"])
    files = []
    for p in run.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file():
            files.append((str(p.relative_to(run)), st.st_size, st.st_mtime_ns))
    files.sort()
    temps = tuple(name for name, _, _ in files if name.endswith(".tmp"))
    return Snapshot(run_json, finished, tuple(names), temps, tuple(files))


def _manifest_lines(run: Path) -> list[dict]:
    path = run / "manifest.jsonl"
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # a torn last line (no newline) is not a shard yet
    return [json.loads(line) for line in lines if line.strip()]


def phase_of(before: Snapshot, after: Snapshot, seed: int, pairs: int, elapsed: float, load_s: float) -> str:
    """Where the killed attempt was, as far as the run folder tells (and, before it wrote
    anything, its time alive against the time loading takes)."""
    if after.signature == before.signature:
        # Imports, models and resume checks; or, in a resumed run, its first batch (a shard file
        # appears when the first batch is written).
        return "loading" if elapsed < load_s else "first_batch"
    if after.run_json is None:
        return "before_run_json"
    if after.starting:
        return "starting"
    if after.seed != seed:
        return "overwrite_before_run_json"
    if after.finished >= pairs:
        return "finishing"
    if any(t.startswith("shards/") for t in after.temps):
        return "shard_open"
    return "between_shards" if after.finished else "started"


# --- what a completed run must hold ------------------------------------------------------------

def expected_keys(seed: int, pairs: int) -> tuple[list[str], list[str]]:
    """The sample keys and prompt ids `generate --preset tiny --classes voc --num-pairs pairs --seed seed`
    renders, computed from the settings alone."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.data.shards import sample_key
    from magicseg_engine.generate.models import model_identity
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("tiny", {"seed": seed, "prompts": {"seed": seed}})
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=pairs).records
    # Random weights come from their own seed (0 unless --weights-seed), not the sampling seed.
    model_id = model_identity(config.diffusion, "cpu", seed=config.weights_seed)
    return [sample_key(model_id, r.prompt, r.negative_prompt, r.seed) for r in records], [r.id for r in records]


def check_run(run: Path, seed: int, pairs: int) -> dict:
    """Every promise about a completed run; `problems` lists what broke them (empty: none)."""
    keys, prompt_ids = expected_keys(seed, pairs)
    problems: list[str] = []
    saved = json.loads((run / "run.json").read_text(encoding="utf-8"))
    if "starting" in saved:
        problems.append("run.json still says starting")
    if saved.get("config", {}).get("seed") != seed:
        problems.append(f"run.json holds seed {saved.get('config', {}).get('seed')}, not {seed}")
    held_ids = [json.loads(line)["id"] for line in (run / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    if held_ids != prompt_ids:
        problems.append("prompts.jsonl does not hold the run's prompts")

    def names_its_key(sample) -> None:
        if json.loads(sample["json"]).get("key") != sample["__key__"]:
            problems.append(f"sample {sample['__key__']}'s JSON names another key")

    shard_problems, found = check_shards(run, names_its_key)
    problems += shard_problems
    lines = _manifest_lines(run)
    dropped = set()
    if (run / "dropped.jsonl").exists():
        dropped = {json.loads(x)["key"] for x in (run / "dropped.jsonl").read_text().splitlines() if x.strip()}
    counts = Counter(found)
    wanted = set(keys) - dropped
    lost = sorted(wanted - set(counts))
    duplicated = sum(n - 1 for n in counts.values())
    foreign = sorted(set(counts) - set(keys))
    if lost:
        problems.append(f"{len(lost)} samples lost")
    if duplicated:
        problems.append(f"{duplicated} samples duplicated")
    if foreign:
        problems.append(f"{len(foreign)} samples not of this run")
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp"))
    leftovers += sorted(set(os.listdir(run)) - TOP_LEVEL)
    if leftovers:
        problems.append(f"left over in the run folder: {leftovers}")
    return {"seed": seed, "samples": len(found), "shards": len(lines), "dropped": len(dropped),
            "lost": len(lost), "duplicated": duplicated, "foreign": len(foreign), "problems": problems}


# --- the soak ----------------------------------------------------------------------------------

@dataclass
class Estimates:
    """What one attempt costs, learned as the soak goes: seconds to load, seconds per pair."""

    load_s: float
    pair_s: float = 0.3
    loads: list[float] = field(default_factory=list)

    def upper(self, pairs_left: int) -> float:
        """A little more than the attempt needs to finish (loading, the pairs left, then checking
        the shards and the summary, which take a few tenths of a second): most kills land before
        it does; the rest let an attempt finish, which checks the run and starts the next round
        (without that margin, a run with nothing left to render would be killed in loading over
        and over)."""
        return 1.2 * (self.load_s + pairs_left * self.pair_s) + 0.5

    def load_spread(self) -> float:
        """How much loading varies between attempts (at least 10 ms, at most 0.3 s)."""
        if len(self.loads) < 3:
            return 0.3
        return min(0.3, max(0.01, statistics.pstdev(self.loads[-9:])))

    def saw_load(self, seconds: float) -> None:
        self.loads.append(seconds)
        self.load_s = statistics.median(self.loads[-9:])

    def saw_pairs(self, seconds: float, pairs: int) -> None:
        if pairs > 0 and seconds > 0:
            self.pair_s = 0.7 * self.pair_s + 0.3 * (seconds / pairs)


def soak(kills: int, pairs: int, seed: int, out: Path, spawn: str = "fork", batch_size: int = 2,
         samples_per_shard: int = 3, attempt_timeout: float = 600.0, log=print) -> dict:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    run, logs = out / "run", out / "logs"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    rng = random.Random(seed)
    launcher = ForkLauncher() if spawn == "fork" else ExecLauncher()
    est = Estimates(load_s=1.0 if spawn == "fork" else 10.0)
    phases: Counter = Counter()
    kinds: Counter = Counter()
    kills_by_kind: Counter = Counter()
    delays: list[float] = []
    rounds: list[dict] = []
    problems: list[str] = []
    attempts = refused = kills_done = 0
    history: list[dict] = []  # one entry per attempt
    round_index, mode = 0, "--resume"  # the first round starts in a new folder: --resume starts it
    try:
        while True:
            gen_seed = seed + round_index
            before = snapshot(run)
            pairs_left = pairs - before.finished if before.seed == gen_seed and not before.starting else pairs
            started_run = before.seed == gen_seed and not before.starting
            final = kills_done >= kills
            delay = after_change = None
            kind = "last"
            if not final:
                kind, delay, after_change = _draw(rng, est, started_run, pairs_left)
                if delay is not None:
                    delays.append(delay)
                kinds[kind] += 1
            argv = ["generate", "--preset", "tiny", "--classes", "voc", "--num-pairs", str(pairs), "--seed",
                    str(gen_seed), "--batch-size", str(batch_size), "--samples-per-shard", str(samples_per_shard),
                    "--device", "cpu", "--out", str(run), mode]
            attempts += 1
            log_path = logs / f"attempt-{attempts:04d}.log"
            result = launcher.run(argv, log_path, delay, attempt_timeout, str(run), after_change)
            after = snapshot(run)
            _learn(est, before, after, result, gen_seed)
            history.append({"mode": mode, "kind": kind, "delay_s": None if delay is None else round(delay, 3),
                            "elapsed_s": round(result["elapsed"], 3), "code": result["code"]})
            if result["killed"]:
                kills_done += 1
                kills_by_kind[kind] += 1
                phase = phase_of(before, after, gen_seed, pairs, result["elapsed"], est.load_s)
                phases[phase] += 1
                history[-1]["phase"] = phase
                mode = "--resume"  # what a user does after a kill, --overwrite ones included
                continue
            if result["timed_out"]:
                problems.append(f"attempt {attempts} ({mode}) did not finish within {attempt_timeout:.0f} s; see {log_path}")
                break
            text = log_path.read_text(errors="replace")
            if result["code"] == 2 and mode == "--resume" and "the settings differ" in text:
                # An --overwrite killed before it replaced run.json: the old run is intact, and
                # --resume with the new flags is refused; the user's answer is --overwrite again.
                refused += 1
                mode = "--overwrite"
                continue
            if result["code"] != 0:
                problems.append(f"attempt {attempts} ({mode}) exited with {result['code']}: {text[-1500:]}")
                break
            t0 = time.monotonic()
            checked = check_run(run, gen_seed, pairs)
            checked["check_s"] = round(time.monotonic() - t0, 3)
            checked["attempts"] = attempts
            rounds.append(checked)
            problems += [f"round {round_index}: {p}" for p in checked["problems"]]
            log(f"round {round_index}: run complete after {kills_done} kills in all, {attempts} attempts; "
                f"{checked['samples']} samples, {len(checked['problems'])} problems")
            if final or checked["problems"]:
                break
            round_index, mode = round_index + 1, "--overwrite"
    except Exception:  # the figures so far, and why it stopped, still go into the JSON
        import traceback

        problems.append(f"the soak itself failed after {attempts} attempts: {traceback.format_exc()}")
    finally:
        launcher.close()
    lost = sum(r["lost"] for r in rounds)
    duplicated = sum(r["duplicated"] for r in rounds)
    seconds = time.monotonic() - started
    result = {
        "ok": not problems and lost == 0 and duplicated == 0 and kills_done >= kills,
        "kills": kills_done, "kills_survived": kills_done if not problems else None,
        "kills_by_phase": {p: phases[p] for p in PHASES if phases[p]},
        "kills_by_kind": dict(kills_by_kind),
        "kill_delays": {"drawn_by_kind": dict(kinds), "min_s": round(min(delays), 3) if delays else None,
                        "median_s": round(statistics.median(delays), 3) if delays else None,
                        "max_s": round(max(delays), 3) if delays else None},
        "attempts": attempts, "runs_completed": len(rounds), "runs_started_by_overwrite": round_index,
        "resumes_refused_old_run_intact": refused,
        "samples_per_run": pairs, "samples_lost": lost, "samples_duplicated": duplicated,
        "samples_foreign": sum(r["foreign"] for r in rounds),
        "seconds_in_killed_attempts": round(sum(h["elapsed_s"] for h in history if "phase" in h), 1),
        "seconds_in_other_attempts": round(sum(h["elapsed_s"] for h in history if "phase" not in h), 1),
        "runs": rounds, "attempt_log": history, "problems": problems, "seconds": round(seconds, 1),
        "estimates": {"load_s": round(est.load_s, 3), "pair_s": round(est.pair_s, 3),
                      "loads_seen_s": [round(x, 3) for x in est.loads]},
        "settings": {"pairs": pairs, "seed": seed, "spawn": spawn, "batch_size": batch_size,
                     "samples_per_shard": samples_per_shard, "preset": "tiny"},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "out": str(out),
    }
    if spawn == "fork":
        result["helper_threads_at_fork"] = launcher.threads
    return result


def _draw(rng: random.Random, est: Estimates, started_run: bool, pairs_left: int) -> tuple[str, float | None, float | None]:
    """(kind, delay, after_change) of the next kill. Mostly a delay uniform up to the adapted
    bound, some very early. Before the run is started, also delays around the end of loading,
    and kills a few milliseconds after the run folder first changes: starting or replacing a
    run takes under 10 ms here, too short for a timed kill to hit often. In a started run that
    trigger lands in the finish (the summary is the first change a resumed attempt makes there)."""
    u = rng.random()
    if not started_run:
        if u < 0.25:
            spread = 2 * est.load_spread()
            return "start", max(0.0, est.load_s + rng.uniform(-spread, spread + 0.02)), None
        if u < 0.65:
            return "on_change", None, rng.uniform(0.0, 0.015)
        if u < 0.75:
            return "early", rng.uniform(0.0, est.load_s), None
    else:
        if u < 0.1:
            return "early", rng.uniform(0.0, est.load_s), None
        if u < 0.2:
            return "on_change", None, rng.uniform(0.0, 0.015)
    return "any", rng.uniform(0.0, est.upper(pairs_left)), None


def _learn(est: Estimates, before: Snapshot, after: Snapshot, result: dict, seed: int) -> None:
    """Update the estimates from one attempt. When it started the run and was killed before the
    run's first summary, run.json's time of writing is the end of loading (the start takes
    milliseconds); the pairs it finished and the time they took give the rate."""
    if after.run_json is not None and after.sessions == 0 and after.signature != before.signature and (
            after.starting or after.seed == seed):
        mtime = max((m for name, _, m in after.signature if name == "run.json"), default=None)
        offset = mtime / 1e9 - result["wall_start"] if mtime is not None else -1.0
        if 0 < offset < result["elapsed"] + 0.1:
            est.saw_load(offset)
    gained = after.finished - (before.finished if before.seed == after.seed and not before.starting else 0)
    est.saw_pairs(result["elapsed"] - est.load_s, gained)


# --- the other commands: the same kills, each with its own folder, resume and checks ------------

def _files(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path relative to `root`, size, mtime) of every file under it; directories as size -1."""
    found = []
    if root.is_dir():
        for p in root.rglob("*"):
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            found.append((str(p.relative_to(root)), -1 if p.is_dir() else st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def _leftovers(root: Path) -> list[str]:
    """Temporary files and folders that killed writes leave: `*.tmp`, and `.dataset.*` (hf export)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".dataset."))


def compare_trees(got: Path, want: Path) -> list[str]:
    """Problems that make the folder `got` differ from `want`: files missing, extra, or not byte-identical."""
    a = {name: size for name, size, _ in _files(got)}
    b = {name: size for name, size, _ in _files(want)}
    problems = []
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    if missing:
        problems.append(f"missing: {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if extra:
        problems.append(f"not in an uninterrupted export: {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})")
    differ = [n for n in sorted(set(a) & set(b)) if a[n] >= 0 and (a[n] != b[n] or (got / n).read_bytes() != (want / n).read_bytes())]
    if differ:
        problems.append(f"differ from an uninterrupted export: {differ[:5]}{' ...' if len(differ) > 5 else ''} ({len(differ)})")
    return problems


def check_shards(run: Path, on_sample=None) -> tuple[list[str], list[str]]:
    """The shard promises of a run folder: manifest whole, shards on disk exactly those listed,
    each matching its line (size, sha256, keys in order) and read completely by tarfile and
    webdataset. `on_sample(sample)` sees each sample as webdataset reads it. Returns
    (problems, every listed key in manifest order)."""
    import hashlib

    import webdataset as wds

    problems: list[str] = []
    raw = (run / "manifest.jsonl").read_bytes() if (run / "manifest.jsonl").exists() else b""
    if raw and not raw.endswith(b"\n"):
        problems.append("manifest.jsonl ends in a torn line")
    lines = _manifest_lines(run)
    names = [line["shard"] for line in lines]
    on_disk = sorted(p.name for p in (run / "shards").iterdir()) if (run / "shards").is_dir() else []
    if sorted(names) != on_disk or len(set(names)) != len(names):
        problems.append(f"shards on disk {on_disk} are not the manifest's {sorted(names)}")
    found: list[str] = []
    for line in lines:
        path = run / "shards" / line["shard"]
        if not path.exists():
            continue
        data = path.read_bytes()
        if len(data) != line["bytes"] or hashlib.sha256(data).hexdigest() != line["sha256"]:
            problems.append(f"{line['shard']} does not match its manifest line's size and sha256")
        try:
            with tarfile.open(path) as tar:
                tar_keys = []
                for member in tar:
                    if len(tar.extractfile(member).read()) != member.size:
                        problems.append(f"{line['shard']}: {member.name} is cut short")
                    key = member.name.split(".", 1)[0]
                    if not tar_keys or tar_keys[-1] != key:
                        tar_keys.append(key)
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{line['shard']} is not readable by tarfile: {err}")
            continue
        samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
        if tar_keys != line["keys"] or [s["__key__"] for s in samples] != line["keys"]:
            problems.append(f"{line['shard']}: keys in the file differ from its manifest line")
        for sample in samples:
            if on_sample is not None:
                on_sample(sample)
        found += line["keys"]
    return problems, found


@dataclass
class FolderState:
    """A workload's output folder seen from outside, between attempts."""

    files: tuple
    done: int  # units finished for good: samples listed, shards in the export ledger, steps checkpointed
    reached: int  # units reached, durable or not (the rate is learned from them)
    info: dict = field(default_factory=dict)


def _run_generate(launcher, out: Path, logs: Path, pairs: int, seed: int, samples_per_shard: int,
                  timeout: float, name: str) -> None:
    """An uninterrupted tiny generate into `out`, the input of the masks and export soaks."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["generate", "--preset", "tiny", "--classes", "voc", "--num-pairs", str(pairs), "--seed", str(seed),
            "--batch-size", "2", "--samples-per-shard", str(samples_per_shard), "--device", "cpu", "--out", str(out)]
    result = launcher.run(argv, logs / f"{name}.log", None, timeout)
    if result["code"] != 0:
        raise RuntimeError(f"preparing {out} failed (exit {result['code']}); see {logs / f'{name}.log'}")


class MasksWorkload:
    """`masks --data SOURCE --out RUN`: a finished tiny run annotated again, killed and resumed.
    Rounds alternate the counterfactual threshold, which every sample's JSON records, so a
    sample left over from an earlier round is told apart from this round's; a round that
    completes is replaced by the next with `--overwrite`."""

    name = "masks"
    phases = PHASES
    warm = _WARM_MODULES
    reap = False
    COVERAGES = (0.5, 0.35, 0.65)

    def __init__(self, pairs: int = 6, batch_size: int = 2, samples_per_shard: int = 2) -> None:
        self.pairs, self.batch_size, self.samples_per_shard = pairs, batch_size, samples_per_shard
        self.units_total = pairs

    def prepare(self, launcher, out: Path, logs: Path, timeout: float) -> None:
        from magicseg_engine.data.shards import iter_samples

        self.out, self.source, self.run = out, out / "source", out / "run"
        _run_generate(launcher, self.source, logs, self.pairs, 11, 3, timeout, "source")
        shutil.rmtree(self.run, ignore_errors=True)
        self.images = {s["__key__"]: (s["pos.jpg"], s["neg.jpg"]) for s in iter_samples(self.source)}
        self.prompt_ids = [json.loads(line)["id"] for line in
                           (self.source / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]

    def coverage(self, round_index: int) -> float:
        return self.COVERAGES[round_index % len(self.COVERAGES)]

    def first_mode(self, round_index: int) -> str:
        return "--resume" if round_index == 0 else "--overwrite"  # --resume starts a run in a new folder

    def argv(self, round_index: int, mode: str) -> list[str]:
        return ["masks", "--data", str(self.source), "--out", str(self.run), "--batch-size", str(self.batch_size),
                "--samples-per-shard", str(self.samples_per_shard), "--max-counterfactual-coverage",
                str(self.coverage(round_index)), "--device", "cpu", mode]

    def watch(self, round_index: int) -> Path:
        return self.run

    def state(self, round_index: int) -> FolderState:
        snap = snapshot(self.run)
        ours = self._identity(snap.run_json) == self.coverage(round_index) and not snap.starting
        done = snap.finished if ours else 0
        return FolderState(snap.signature, done, done, {"snap": snap, "ours": ours})

    @staticmethod
    def _identity(run_json: dict | None):
        return ((run_json or {}).get("config", {}).get("masks", {}) or {}).get("max_counterfactual_coverage")

    def phase(self, before: FolderState, after: FolderState, round_index: int, elapsed: float, load_s: float) -> str:
        snap = after.info["snap"]
        if after.files == before.files:
            return "loading" if elapsed < load_s or not before.info["ours"] else "first_batch"
        if snap.run_json is None:
            return "before_run_json"
        if snap.starting:
            return "starting"
        if self._identity(snap.run_json) != self.coverage(round_index):
            return "overwrite_before_run_json"
        if snap.finished >= len(self.images):
            return "finishing"
        if any(t.startswith("shards/") for t in snap.temps):
            return "shard_open"
        return "between_shards" if snap.finished else "started"

    def after_kill(self, mode: str) -> str:
        return "--resume"

    def recover(self, code: int, text: str, mode: str) -> str | None:
        if code == 2 and mode == "--resume" and "the settings differ" in text:
            return "--overwrite"  # an --overwrite killed before run.json: the old run is intact
        return None

    def check(self, round_index: int) -> dict:
        run, coverage = self.run, self.coverage(round_index)
        problems: list[str] = []
        saved = json.loads((run / "run.json").read_text(encoding="utf-8"))
        if "starting" in saved:
            problems.append("run.json still says starting")
        if self._identity(saved) != coverage:
            problems.append(f"run.json holds coverage {self._identity(saved)}, not {coverage}")
        held = [json.loads(x)["id"] for x in (run / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
        if held != self.prompt_ids:
            problems.append("prompts.jsonl does not hold the source run's prompts")
        stale: list[str] = []

        def on_sample(sample: dict) -> None:
            key = sample["__key__"]
            meta = json.loads(sample["json"])
            if meta.get("key") != key:
                problems.append(f"sample {key}'s JSON names another key")
            if meta.get("masks", {}).get("counterfactual", {}).get("threshold") != coverage or "mask.png" not in sample:
                stale.append(key)  # annotated by another round, or not annotated
            if key in self.images and (sample.get("pos.jpg"), sample.get("neg.jpg")) != self.images[key]:
                problems.append(f"sample {key}'s images are not the source run's bytes")

        shard_problems, found = check_shards(run, on_sample)
        problems += shard_problems
        counts = Counter(found)
        lost = sorted(set(self.images) - set(counts))
        duplicated = sum(n - 1 for n in counts.values())
        foreign = sorted((set(counts) - set(self.images)) | set(stale))
        if lost:
            problems.append(f"{len(lost)} samples lost")
        if duplicated:
            problems.append(f"{duplicated} samples duplicated")
        if foreign:
            problems.append(f"{len(foreign)} samples not annotated by this round")
        leftovers = _leftovers(run) + sorted(set(os.listdir(run)) - TOP_LEVEL)
        if leftovers:
            problems.append(f"left over in the run folder: {leftovers}")
        return {"coverage": coverage, "samples": len(found), "lost": len(lost), "duplicated": duplicated,
                "foreign": len(foreign), "problems": problems}

    def next_round(self, round_index: int) -> None:
        pass  # --overwrite replaces the run in place


class ExportWorkload:
    """`export --data SOURCE --format F --out OUT` of a finished tiny run, killed and rerun (an
    export resumes by running it again) until it completes, then compared file by file with an
    uninterrupted export of the same format. Rounds cycle through the formats, each into a new
    folder."""

    name = "export"
    phases = ("loading", "before_ledger", "first_shard", "shards", "finishing", "after_done")
    warm = ("magicseg_engine.cli", "magicseg_engine.formats", "magicseg_engine.formats.coco",
            "magicseg_engine.formats.mmseg", "magicseg_engine.formats.hf", "magicseg_engine.ops",
            "magicseg_engine.data.shards", "magicseg_engine.pipeline", "magicseg_engine.prompts", "datasets",
            "pyarrow.parquet", "PIL.Image")
    reap = False

    def __init__(self, pairs: int = 6, samples_per_shard: int = 1, formats: tuple[str, ...] = ("coco", "mmseg", "hf")) -> None:
        self.pairs, self.samples_per_shard, self.formats = pairs, samples_per_shard, formats
        self.rounds_to_cover = len(formats)
        self.units_total = 0
        self.references: dict[str, Path] = {}

    def prepare(self, launcher, out: Path, logs: Path, timeout: float) -> None:
        from magicseg_engine.data.shards import RunState

        self.out, self.source, self.logs, self.launcher, self.timeout = out, out / "source", logs, launcher, timeout
        _run_generate(launcher, self.source, logs, self.pairs, 12, self.samples_per_shard, timeout, "source")
        self.shards = len(RunState.load(self.source, verify=False, repair=False).shards)
        self.units_total = self.shards + 1  # every shard, then the final files
        for fmt in self.formats:
            shutil.rmtree(out / f"reference-{fmt}", ignore_errors=True)
        shutil.rmtree(out / "export", ignore_errors=True)

    def fmt(self, round_index: int) -> str:
        return self.formats[round_index % len(self.formats)]

    def first_mode(self, round_index: int) -> str:
        return ""

    def argv(self, round_index: int, mode: str, out: Path | None = None) -> list[str]:
        return ["export", "--data", str(self.source), "--format", self.fmt(round_index),
                "--out", str(out or self.out / "export")]

    def watch(self, round_index: int) -> Path:
        return self.out / "export"

    def state(self, round_index: int) -> FolderState:
        folder = self.out / "export"
        try:
            ledger = json.loads((folder / ".magicseg-export.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ledger = None
        done = len(ledger["shards_done"]) if ledger else 0
        complete = (folder / "export.json").exists()
        done += complete
        return FolderState(_files(folder), done, done, {"ledger": ledger is not None, "complete": complete})

    def phase(self, before: FolderState, after: FolderState, round_index: int, elapsed: float, load_s: float) -> str:
        if after.files == before.files:
            return "loading"
        if after.info["complete"]:
            return "after_done"
        if not after.info["ledger"]:
            return "before_ledger"
        if after.done == 0:
            return "first_shard"
        return "finishing" if after.done >= self.shards else "shards"

    def after_kill(self, mode: str) -> str:
        return ""

    def recover(self, code: int, text: str, mode: str) -> str | None:
        return None

    def reference(self, fmt: str, round_index: int) -> Path:
        if fmt not in self.references:
            ref = self.out / f"reference-{fmt}"
            result = self.launcher.run(self.argv(round_index, "", ref), self.logs / f"reference-{fmt}.log", None,
                                       self.timeout)
            if result["code"] != 0:
                raise RuntimeError(f"the uninterrupted {fmt} export failed; see {self.logs / f'reference-{fmt}.log'}")
            self.references[fmt] = ref
        return self.references[fmt]

    def check(self, round_index: int) -> dict:
        fmt = self.fmt(round_index)
        got = self.out / "export"
        # The folders differ in name only; every file inside must be the same bytes.
        problems = compare_trees(got, self.reference(fmt, round_index))
        leftovers = _leftovers(got)
        if leftovers:
            problems.append(f"left over in the export: {leftovers}")
        return {"format": fmt, "files": sum(1 for _, size, _ in _files(got) if size >= 0), "problems": problems}

    def next_round(self, round_index: int) -> None:
        shutil.rmtree(self.out / "export", ignore_errors=True)


class PretrainWorkload:
    """`pretrain --data SYNTHETIC --out RUN` killed and resumed with `--resume` until it has run
    its steps, then compared with an uninterrupted run of the same settings: every checkpoint
    kept (weights, optimiser, schedule, loader position) bitwise, the metrics of every step once
    with the same losses, the same other files, no temporary file. Rounds alternate settings
    (gradient accumulation, loader workers), each into a new folder."""

    name = "pretrain"
    phases = ("loading", "before_config", "before_first_checkpoint", "training", "checkpoint_open",
              "after_last_checkpoint")
    warm = ("magicseg_engine.cli", "magicseg_engine.train.loop", "magicseg_engine.train.data",
            "magicseg_engine.train.model", "magicseg_engine.train.objective", "magicseg_engine.safe_files",
            "open_clip", "safetensors.torch", "PIL.Image")
    reap = False
    VARIANTS = ({"batch-size": 2, "grad-accum": 1, "workers": 0}, {"batch-size": 2, "grad-accum": 2, "workers": 1})

    def __init__(self, steps: int = 8, checkpoint_every: int = 2, samples: int = 10) -> None:
        self.steps, self.checkpoint_every, self.samples = steps, checkpoint_every, samples
        self.rounds_to_cover = len(self.VARIANTS)
        self.units_total = steps
        self.references: dict[int, Path] = {}

    def prepare(self, launcher, out: Path, logs: Path, timeout: float) -> None:
        from magicseg_engine.train.synthetic import write_synthetic_run

        self.out, self.data, self.run = out, out / "data", out / "run"
        self.logs, self.launcher, self.timeout = logs, launcher, timeout
        for folder in [self.data, self.run, *out.glob("reference-*")]:
            shutil.rmtree(folder, ignore_errors=True)
        # Odd sizes: epochs end inside an accumulation, and the last batch of an epoch is short.
        write_synthetic_run(self.data, self.samples, size=64, seed=1, samples_per_shard=4)

    def variant(self, round_index: int) -> int:
        return round_index % len(self.VARIANTS)

    def first_mode(self, round_index: int) -> str:
        return ""

    def argv(self, round_index: int, mode: str, out: Path | None = None) -> list[str]:
        flags = [x for k, v in self.VARIANTS[self.variant(round_index)].items() for x in (f"--{k}", str(v))]
        return ["pretrain", "--data", str(self.data), "--out", str(out or self.run), "--steps", str(self.steps),
                "--checkpoint-every", str(self.checkpoint_every), *flags, "--device", "cpu",
                *([mode] if mode else [])]

    def watch(self, round_index: int) -> Path:
        return self.run / "checkpoints" if (self.run / "checkpoints").is_dir() else self.run

    def state(self, round_index: int) -> FolderState:
        steps = [int(p.name[5:13]) for p in (self.run / "checkpoints").glob("step-*.pt")] \
            if (self.run / "checkpoints").is_dir() else []
        reached = 0
        if (self.run / "metrics.jsonl").is_file():
            for line in (self.run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    reached = max(reached, int(json.loads(line)["step"]))
        files = _files(self.run)
        info = {"config": (self.run / "pretrain.json").is_file(),
                "checkpoint_open": any(n.startswith("checkpoints/") and n.endswith(".tmp") for n, _, _ in files)}
        done = max(steps, default=0)
        return FolderState(files, done, max(reached, done), info)

    def phase(self, before: FolderState, after: FolderState, round_index: int, elapsed: float, load_s: float) -> str:
        if after.files == before.files:
            return "loading"
        if not after.info["config"]:
            return "before_config"
        if after.info["checkpoint_open"]:
            return "checkpoint_open"
        if after.done == 0:
            return "before_first_checkpoint"
        return "after_last_checkpoint" if after.done >= self.steps else "training"

    def after_kill(self, mode: str) -> str:
        return "--resume"

    def recover(self, code: int, text: str, mode: str) -> str | None:
        if code == 2 and mode == "--resume" and "holds no checkpoint" in text:
            return ""  # killed before the run wrote anything: start it, as the message says
        return None

    def reference(self, round_index: int) -> Path:
        v = self.variant(round_index)
        if v not in self.references:
            ref = self.out / f"reference-{v}"
            result = self.launcher.run(self.argv(round_index, "", ref), self.logs / f"reference-{v}.log", None,
                                       self.timeout)
            if result["code"] != 0:
                raise RuntimeError(f"the uninterrupted pretrain failed; see {self.logs / f'reference-{v}.log'}")
            self.references[v] = ref
        return self.references[v]

    def check(self, round_index: int) -> dict:
        import torch

        ref = self.reference(round_index)
        run = self.run
        problems: list[str] = []
        ours = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
        theirs = sorted(p.name for p in (ref / "checkpoints").glob("step-*.pt"))
        if ours != theirs:
            problems.append(f"checkpoints {ours}, an uninterrupted run keeps {theirs}")
        weights_equal = loader_equal = bool(ours) and ours == theirs
        for name in sorted(set(ours) & set(theirs)):
            a = torch.load(run / "checkpoints" / name, weights_only=True, map_location="cpu")
            b = torch.load(ref / "checkpoints" / name, weights_only=True, map_location="cpu")
            for part in ("model", "optimizer", "schedule"):
                where = _first_difference(a.get(part), b.get(part), part)
                if where:
                    problems.append(f"{name}: {where}")
                    weights_equal = False
            if a.get("loader") != b.get("loader"):
                problems.append(f"{name}: loader state {a.get('loader')} != {b.get('loader')}")
                loader_equal = False
            for part in ("step", "config", "vocabulary", "world_size", "format"):
                if a.get(part) != b.get(part):
                    problems.append(f"{name}: {part} differs")

        def metrics(folder: Path) -> list[dict]:
            timing = ("seconds", "images_per_s")
            return [{k: v for k, v in json.loads(line).items() if k not in timing}
                    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]

        got, want = metrics(run), metrics(ref)
        if [m["step"] for m in got] != [m["step"] for m in want]:
            problems.append(f"metrics hold steps {[m['step'] for m in got]}, not {[m['step'] for m in want]}")
        elif got != want:
            problems.append(f"metrics differ from an uninterrupted run at step "
                            f"{next(a['step'] for a, b in zip(got, want) if a != b)}")
        others = [n for n, size, _ in _files(ref) if size >= 0 and not n.startswith("checkpoints/")
                  and n != "metrics.jsonl"]
        for name in others:
            if not (run / name).is_file() or (run / name).read_bytes() != (ref / name).read_bytes():
                problems.append(f"{name} differs from an uninterrupted run's")
        extra = sorted({n for n, _, _ in _files(run)} - {n for n, _, _ in _files(ref)})
        if extra:
            problems.append(f"left over in the run folder: {extra}")
        return {"variant": self.VARIANTS[self.variant(round_index)], "checkpoints": ours,
                "weights_equal": weights_equal, "loader_equal": loader_equal, "problems": problems}

    def next_round(self, round_index: int) -> None:
        shutil.rmtree(self.run, ignore_errors=True)


def _first_difference(a, b, where: str) -> str | None:
    """Where two nested states (dicts, lists, tensors, numbers) first differ, bitwise; None if nowhere."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return None if same else f"{where} differs"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where} has other entries"
        for k in a:
            found = _first_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} has another length"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where} differs ({a!r} != {b!r})"


class RayWorkload:
    """`generate --ray` (a local Ray instance per attempt, two CPU workers) killed and resumed:
    a Ray worker SIGKILLed while its shard is open (the attempt goes on: Ray restarts it, or the
    driver stops and says to resume), the driver SIGKILLed (Ray's processes go with it), or both
    in one attempt. A shard spans two batches, so it is open (a temporary file) while its second
    batch renders, which is when a worker can be caught mid-shard. Completed runs get the
    generate soak's check; a round that completes is replaced with `--overwrite` and the next seed."""

    name = "ray"
    phases = PHASES
    warm = _WARM_MODULES + ("ray", "ray.data", "magicseg_engine.distributed", "magicseg_engine.distributed.worker")
    reap = True

    def __init__(self, pairs: int = 4, seed: int = 0, workers: int = 2) -> None:
        self.pairs, self.seed, self.workers = pairs, seed, workers
        self.units_total = pairs

    def prepare(self, launcher, out: Path, logs: Path, timeout: float) -> None:
        self.run = out / "run"
        shutil.rmtree(self.run, ignore_errors=True)

    def gen_seed(self, round_index: int) -> int:
        return self.seed + round_index

    def first_mode(self, round_index: int) -> str:
        return "--resume" if round_index == 0 else "--overwrite"

    def argv(self, round_index: int, mode: str) -> list[str]:
        return ["generate", "--ray", "--workers", str(self.workers), "--num-gpus-per-worker", "0", "--preset", "tiny",
                "--classes", "voc", "--num-pairs", str(self.pairs), "--seed", str(self.gen_seed(round_index)),
                "--batch-size", "2", "--samples-per-shard", "4", "--out", str(self.run), mode]

    def watch(self, round_index: int) -> Path:
        return self.run

    def state(self, round_index: int) -> FolderState:
        snap = snapshot(self.run)
        ours = snap.seed == self.gen_seed(round_index) and not snap.starting
        return FolderState(snap.signature, snap.finished if ours else 0, snap.finished if ours else 0,
                           {"snap": snap, "ours": ours})

    def phase(self, before: FolderState, after: FolderState, round_index: int, elapsed: float, load_s: float) -> str:
        return phase_of(before.info["snap"], after.info["snap"], self.gen_seed(round_index), self.pairs, elapsed,
                        load_s)

    def after_kill(self, mode: str) -> str:
        return "--resume"

    def recover(self, code: int, text: str, mode: str) -> str | None:
        if code == 2 and mode == "--resume" and "the settings differ" in text:
            return "--overwrite"
        if code == 1 and "with --resume" in text:
            return "--resume"  # a worker died and Ray gave its shard up: the driver says to resume
        return None

    def check(self, round_index: int) -> dict:
        return check_run(self.run, self.gen_seed(round_index), self.pairs)

    def next_round(self, round_index: int) -> None:
        pass


WORKLOADS = {"masks": MasksWorkload, "export": ExportWorkload, "pretrain": PretrainWorkload, "ray": RayWorkload}


RAY_KINDS = ("worker_then_driver", "worker", "driver")


def _draw_generic(rng: random.Random, est: Estimates, left: int, ray: int | None) -> tuple[str, float | None, float | None, dict | None]:
    """(kind, delay, after_change, kill a Ray worker) of the next kill: some during loading, most
    a delay after the output folder first changes, uniform over the work the attempt has left
    (its first write is where loading ends), the rest uniform from the start. With Ray (`ray`:
    the attempt's number), attempts take the kinds of RAY_KINDS in turn, so a few kills cover
    them all: a worker killed with a shard open, then the driver 0-3 s later; a worker only
    (the driver goes on); the driver only, at a delay uniform up to the attempt's estimate."""
    u = rng.random()
    if ray is not None:
        kind = RAY_KINDS[ray % len(RAY_KINDS)]
        worker = {"worker_delay": rng.uniform(0.0, 2.0)}
        if kind == "worker_then_driver":
            return kind, None, None, {**worker, "driver_after": rng.uniform(0.0, 3.0)}
        if kind == "worker":
            return kind, None, None, worker
        return kind, rng.uniform(0.0, est.upper(left)), None, None
    if u < 0.1:
        return "early", rng.uniform(0.0, est.load_s), None, None
    if u < 0.7:
        # Timed from the attempt's first write, over the work it has left: an export's shards
        # take a tenth of a second after seconds of loading, which delays from the start miss.
        # Log-uniform from 1 ms: as many kills in the first tenth of the window as in the rest,
        # where starts, ledgers and the first checkpoint are written.
        upper = 1.2 * max(left, 1) * est.pair_s + 0.015
        return "on_change", None, math.exp(rng.uniform(math.log(0.001), math.log(upper))), None
    return "any", rng.uniform(0.0, est.upper(left)), None, None


def soak_command(workload, kills: int, seed: int, out: Path, spawn: str = "fork", attempt_timeout: float = 600.0,
                 log=print) -> dict:
    """Kill `workload`'s command `kills` times at random instants, resuming as a user would,
    until the kills are spent and a last attempt completes; check every completed round."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    rng = random.Random(seed)
    ray = workload.name == "ray"
    phases: Counter = Counter()
    kills_by_kind: Counter = Counter()
    recovered: Counter = Counter()
    rounds: list[dict] = []
    problems: list[str] = []
    history: list[dict] = []
    attempts = kills_done = worker_kills = ray_draws = 0
    launcher = None
    est = Estimates(load_s=1.0 if spawn == "fork" else 10.0)
    prepare_s = 0.0
    try:
        launcher = ForkLauncher(workload.warm, reap=workload.reap) if spawn == "fork" else ExecLauncher()
        t0 = time.monotonic()
        workload.prepare(launcher, out, logs, attempt_timeout)
        prepare_s = time.monotonic() - t0
        round_index, mode = 0, workload.first_mode(0)
        fruitless = 0  # attempts in a row that ended in an error answered by a retry
        # Rounds differ (export formats, pretrain settings): each gets its share of the kills,
        # after which its next attempt runs to the end and the next round starts.
        per_round = math.ceil(kills / getattr(workload, "rounds_to_cover", 1)) if kills else 0
        round_kills = 0
        while True:
            before = workload.state(round_index)
            final = kills_done >= kills or round_kills >= per_round
            kind, delay, after_change, worker = "last", None, None, None
            if not final:
                kind, delay, after_change, worker = _draw_generic(rng, est, workload.units_total - before.done,
                                                                  ray_draws if ray else None)
                ray_draws += ray
                if worker and "driver_after" in worker and kills_done + 2 > kills:
                    kind, worker = "worker", {"worker_delay": worker["worker_delay"]}  # one kill left
            attempts += 1
            log_path = logs / f"attempt-{attempts:04d}.log"
            watch = workload.watch(round_index)
            result = launcher.run(workload.argv(round_index, mode), log_path, delay, attempt_timeout, str(watch),
                                  after_change, **({"kill_worker_in": str(workload.run / "shards"), **worker}
                                                   if worker else {}))
            after = workload.state(round_index)
            _learn_generic(est, before, after, result)
            entry = {"mode": mode, "kind": kind, "delay_s": None if delay is None else round(delay, 3),
                     "elapsed_s": round(result["elapsed"], 3), "code": result["code"]}
            if result.get("worker_killed"):
                worker_kills += 1
                kills_done += 1
                round_kills += 1
                kills_by_kind["worker"] += 1
                phases["worker_mid_shard" if result.get("worker_left_temp") else "worker"] += 1
                entry["worker_killed"] = True
            if result.get("reaped"):
                entry["reaped"] = result["reaped"]
            history.append(entry)
            if result["killed"]:
                kills_done += 1
                round_kills += 1
                kills_by_kind[kind] += 1
                phase = workload.phase(before, after, round_index, result["elapsed"], est.load_s)
                phases[phase] += 1
                entry["phase"] = phase
                mode = workload.after_kill(mode)
                fruitless = 0
                continue
            if result["timed_out"]:
                problems.append(f"attempt {attempts} did not finish within {attempt_timeout:.0f} s; see {log_path}")
                break
            text = log_path.read_text(errors="replace")
            if result["code"] != 0:
                answer = workload.recover(result["code"], text, mode)
                fruitless += 1
                if answer is None or fruitless > 3:
                    problems.append(f"attempt {attempts} ({' '.join(workload.argv(round_index, mode)[:1])} {mode}) "
                                    f"exited with {result['code']}: {text[-1500:]}")
                    break
                recovered[text.strip().splitlines()[-1][:120] if text.strip() else str(result["code"])] += 1
                mode = answer
                continue
            fruitless = 0
            t0 = time.monotonic()
            checked = workload.check(round_index)
            checked["check_s"] = round(time.monotonic() - t0, 3)
            checked["attempts"] = attempts
            rounds.append(checked)
            problems += [f"round {round_index}: {p}" for p in checked["problems"]]
            log(f"{workload.name} round {round_index}: complete after {kills_done} kills in all, {attempts} attempts; "
                f"{len(checked['problems'])} problems")
            if kills_done >= kills or checked["problems"]:
                break
            round_index, round_kills = round_index + 1, 0
            workload.next_round(round_index)
            mode = workload.first_mode(round_index)
    except Exception:  # the figures so far, and why it stopped, still go into the JSON
        import traceback

        problems.append(f"the soak itself failed after {attempts} attempts: {traceback.format_exc()}")
    finally:
        if launcher is not None:
            launcher.close()
    lost = sum(r.get("lost", 0) for r in rounds)
    duplicated = sum(r.get("duplicated", 0) for r in rounds)
    result = {
        "command": workload.name,
        "ok": not problems and lost == 0 and duplicated == 0 and kills_done >= kills and bool(rounds),
        "kills": kills_done, "kills_survived": kills_done if not problems else None,
        "worker_kills": worker_kills,
        "kills_by_phase": {p: phases[p] for p in (*workload.phases, "worker_mid_shard", "worker") if phases[p]},
        "kills_by_kind": dict(kills_by_kind), "attempts": attempts, "runs_completed": len(rounds),
        "errors_answered_by_resuming": dict(recovered),
        "samples_lost": lost, "samples_duplicated": duplicated,
        "samples_foreign": sum(r.get("foreign", 0) for r in rounds),
        "seconds_preparing": round(prepare_s, 1),
        "seconds_in_killed_attempts": round(sum(h["elapsed_s"] for h in history if "phase" in h), 1),
        "seconds_in_other_attempts": round(sum(h["elapsed_s"] for h in history if "phase" not in h), 1),
        "runs": rounds, "attempt_log": history, "problems": problems, "seconds": round(time.monotonic() - started, 1),
        "estimates": {"load_s": round(est.load_s, 3), "unit_s": round(est.pair_s, 3)},
        "settings": {"seed": seed, "spawn": spawn, **{k: v for k, v in vars(workload).items()
                                                      if isinstance(v, (int, float, str, tuple)) and k != "name"}},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "out": str(out),
    }
    return result


def _learn_generic(est: Estimates, before: FolderState, after: FolderState, result: dict) -> None:
    """The time from an attempt's start to its first write in the folder (its loading), and
    the time per unit it added."""
    old = {(n, size, m) for n, size, m in before.files}
    changed = [m for n, size, m in after.files if (n, size, m) not in old]
    if changed:
        offset = min(changed) / 1e9 - result["wall_start"]
        if 0 < offset < result["elapsed"] + 0.1:
            est.saw_load(offset)
    est.saw_pairs(result["elapsed"] - est.load_s, after.reached - before.done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to survive (default 50)")
    parser.add_argument("--pairs", type=int, default=6, help="pairs per run (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays and the runs (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="work folder; its run/ and logs/ are replaced (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--spawn", choices=("fork", "exec"), default="fork",
                        help="fork: attempts forked from a helper that imported the engine once (default); "
                             "exec: the console script per attempt, imports and all")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=3)
    parser.add_argument("--attempt-timeout", type=float, default=600.0, help="seconds the last, unkilled attempt may take")
    parser.add_argument("--command", choices=("generate", *WORKLOADS), default="generate",
                        help="what to kill: generate (default); masks (re-annotating a finished run); export "
                             "(coco, mmseg, hf in turn); pretrain; ray (generate --ray: workers and the driver)")
    parser.add_argument("--steps", type=int, default=8, help="pretrain: optimiser steps per run (default 8)")
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zygote:
        zygote(tuple(filter(None, args.warm.split(","))) if args.warm is not None else None, args.reap)
        return 0
    if args.kills < 0 or args.pairs < 1 or args.batch_size < 1 or args.samples_per_shard < 1 or args.steps < 1:
        parser.error("--kills must be >= 0; --pairs, --batch-size, --samples-per-shard and --steps >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="magicseg-soak-"))
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.command == "generate":
        result = soak(args.kills, args.pairs, args.seed, out, args.spawn, args.batch_size, args.samples_per_shard,
                      args.attempt_timeout, log=say)
    else:
        workload = {"masks": lambda: MasksWorkload(args.pairs, args.batch_size),
                    "export": lambda: ExportWorkload(args.pairs),
                    "pretrain": lambda: PretrainWorkload(args.steps),
                    "ray": lambda: RayWorkload(args.pairs, args.seed)}[args.command]()
        result = soak_command(workload, args.kills, args.seed, out, args.spawn, args.attempt_timeout, log=say)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    phases = ", ".join(f"{k} {v}" for k, v in result["kills_by_phase"].items())
    print(f"{'ok' if result['ok'] else 'FAILED'}: {args.command} {result['kills']} kills ({phases}), "
          f"{result['attempts']} attempts, {result['runs_completed']} runs checked, samples lost "
          f"{result['samples_lost']}, duplicated {result['samples_duplicated']}, {result['seconds']:.0f} s")
    for problem in result["problems"]:
        print(f"problem: {problem}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
