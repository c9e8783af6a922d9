"""Kill anywhere: SIGKILL `magicseg-engine generate` at random instants until its run completes, then
check that the run holds each requested pair exactly once and nothing else.

    python benchmarks/soak.py --kills 50 --pairs 6 --seed 0 --out /tmp/soak --json soak.json
    python benchmarks/soak.py --kills 500 --pairs 12 --seed 1 --out /tmp/soak-long --json soak-long.json

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
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
                  after_change: float | None = None) -> tuple[bool, bool]:
    """Wait for the process to end, or SIGKILL it: `delay` seconds after `start`, or, with
    `after_change`, that long after the directory `watch` first changes (an entry created,
    renamed or deleted). Returns (kill sent, timed out)."""
    deadline = start + (delay if delay is not None else timeout)
    first = _dir_state(watch) if after_change is not None else None
    triggered = False
    while poll() is None:
        now = time.monotonic()
        if after_change is not None and not triggered and _dir_state(watch) != first:
            triggered, deadline = True, min(deadline, now + after_change)
        if now >= deadline:
            kill()
            return True, delay is None and not triggered
        time.sleep(0.001 if after_change is not None else min(0.002, deadline - now))
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
            after_change: float | None = None) -> dict:
        with open(log, "wb") as f:
            wall, start = time.time(), time.monotonic()
            proc = subprocess.Popen(self.command + argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            sent, timed_out = _wait_or_kill(proc.poll, proc.kill, start, delay, timeout, watch, after_change)
            code = proc.wait()
        return {"code": code, "killed": sent and code == -signal.SIGKILL, "timed_out": timed_out,
                "elapsed": time.monotonic() - start, "wall_start": wall}

    def close(self) -> None:
        pass


class ForkLauncher:
    """Each attempt is forked from a helper that imported the engine once (`zygote`)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
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
            after_change: float | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "delay": delay, "timeout": timeout,
                                          "watch": watch, "after_change": after_change}) + "\n")
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


def zygote() -> None:
    """The fork helper: import, then for each request line fork one attempt, kill it on time, answer."""
    import importlib

    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # optional: the attempt imports it itself if it needs it
    for name, attrs in _WARM_NAMES.items():
        module = importlib.import_module(name)
        for attr in attrs:
            getattr(module, attr, None)
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

        sent, timed_out = _wait_or_kill(poll, lambda: os.kill(pid, signal.SIGKILL), start, req["delay"], req["timeout"],
                                        req["watch"], req["after_change"])
        if not status:
            status.append(os.waitpid(pid, 0)[1])
        code = os.waitstatus_to_exitcode(status[0])
        print(json.dumps({"code": code, "killed": sent and code == -signal.SIGKILL, "timed_out": timed_out,
                          "elapsed": time.monotonic() - start, "wall_start": wall}), flush=True)


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
    model_id = model_identity(config.diffusion, "cpu", seed=seed)
    return [sample_key(model_id, r.prompt, r.negative_prompt, r.seed) for r in records], [r.id for r in records]


def check_run(run: Path, seed: int, pairs: int) -> dict:
    """Every promise about a completed run; `problems` lists what broke them (empty: none)."""
    import hashlib

    import webdataset as wds

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
    raw = (run / "manifest.jsonl").read_bytes()
    if raw and not raw.endswith(b"\n"):
        problems.append("manifest.jsonl ends in a torn line")
    lines = _manifest_lines(run)
    names = [line["shard"] for line in lines]
    on_disk = sorted(p.name for p in (run / "shards").iterdir())
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
        wds_keys = [s["__key__"] for s in samples]
        if tar_keys != line["keys"] or wds_keys != line["keys"]:
            problems.append(f"{line['shard']}: keys in the file differ from its manifest line")
        for s in samples:
            if json.loads(s["json"]).get("key") != s["__key__"]:
                problems.append(f"{line['shard']}: sample {s['__key__']}'s JSON names another key")
        found += line["keys"]
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
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zygote:
        zygote()
        return 0
    if args.kills < 0 or args.pairs < 1 or args.batch_size < 1 or args.samples_per_shard < 1:
        parser.error("--kills must be >= 0; --pairs, --batch-size and --samples-per-shard >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="magicseg-soak-"))
    result = soak(args.kills, args.pairs, args.seed, out, args.spawn, args.batch_size, args.samples_per_shard,
                  args.attempt_timeout, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    phases = ", ".join(f"{k} {v}" for k, v in result["kills_by_phase"].items())
    print(f"{'ok' if result['ok'] else 'FAILED'}: {result['kills']} kills ({phases}), {result['attempts']} attempts, "
          f"{result['runs_completed']} runs checked, samples lost {result['samples_lost']}, "
          f"duplicated {result['samples_duplicated']}, {result['seconds']:.0f} s")
    for problem in result["problems"]:
        print(f"problem: {problem}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
