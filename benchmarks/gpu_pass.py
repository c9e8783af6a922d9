"""The GPU pass in stages, each with its own time budget, each writing its JSON into the output
folder the moment it ends, so a pass cut short still leaves every stage that finished.

    python benchmarks/gpu_pass.py [--out DIR] [--dry-run] [--total-budget S] [--budget NAME=S ...]
                                  [--stages install,correctness,headline,extras]
                                  [--extras masks,fast,losses,loader,compile]

Meant for a bare GPU machine without network that is lent for a few minutes: the wheels the
machine lacks come from .whl/ (benchmarks/wheelhouse.sh, run where pip reaches an index).

Stages, in order (GPU budgets in seconds; the whole pass stays under --total-budget, 420):

  install      (150) pip installs .whl/*.whl into a folder put on PYTHONPATH, then this project in
               editable mode over the machine's own torch (scikit-build-core builds the C++
               extension), then imports magicseg_engine._C in a fresh process: versions, device,
               times.                                                           -> install.json
  correctness  (150) the tests marked `gpu`, the files of Triton kernels (each checked against its
               torch reference) first, then the rest: counts and short reasons. -> correctness.json
  headline     (240) the TFLOP/s of a plain bf16 matmul (8192^3, median after warm-up: the measured
               peak), then `bench tune` on sd15-random (512x512, 20 steps, guidance 7.5, masks on):
               eager bf16 NHWC at batch 8 and 16 against the reference pipeline in the same run, the
               UNet's TFLOP/s and its fraction of the measured and of the data-sheet peak.
               The file is a `bench tune` result (benchmarks/summarize.py reads it) with the pass's
               additions; it is rewritten after each part, so a time-out keeps the parts done.
                                                                                -> headline.json
  extras       (the time left) while it lasts, each item in its own process and budget: masks
               (attention-capture overhead, batched SAM), losses (fused Triton vs eager), loader
               (DALI vs torch; skipped without DALI), compile (UNet torch.compile vs eager), fast
               (generate --fast levels against full mode: pairs/s, mask IoU).
                                                                                -> extras.json
  pass.json holds the plan and each stage's status and times; log.txt every stage's output.

Time is handed out before each stage: a stage gets its own budget or what is left of the total,
less the headline's budget while the headline is still to come. A stage past its budget is
stopped (its process group killed) and recorded as timed out; the stages after it still run.

--dry-run: the same stages on the `tiny` preset on the CPU with tiny sizes, the pip commands
recorded instead of run, and two fast CPU test files instead of the GPU tests (whose commands
are recorded): about a minute on two cores.

The driver itself needs only the standard library; each stage runs this file again as a child
process (`--child STAGE`), which imports torch and the project.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("install", "correctness", "headline", "extras")
EXTRAS = ("masks", "fast", "losses", "loader", "compile")
FILES = {"install": "install.json", "correctness": "correctness.json", "headline": "headline.json",
         "extras": "extras.json"}
# Stages whose budget is held back while they are still to come: the numbers the pass is for.
RESERVED = ("headline",)
# Beside each stage's own budget: an item starts only when at least `min_start` seconds are left.
GPU_BUDGETS = {"install": 150, "correctness": 150, "headline": 240, "extras": 300,
               "masks": 90, "fast": 90, "losses": 45, "loader": 45, "compile": 180}
DRY_BUDGETS = {"install": 60, "correctness": 60, "headline": 150, "extras": 90,
               "masks": 60, "fast": 60, "losses": 30, "loader": 30, "compile": 60}
MIN_START = {"install": 30, "correctness": 30, "headline": 60, "extras": 15,
             "masks": 40, "fast": 40, "losses": 15, "loader": 15, "compile": 120}
GPU_TOTAL_S, DRY_TOTAL_S = 420, 300
KILL_GRACE_S = 5


def settings(dry_run: bool) -> dict:
    """What each stage measures: the GPU pass, or its small CPU rehearsal."""
    if dry_run:
        return {
            "dry_run": True, "preset": "tiny", "device": "cpu",
            "headline": {"variants": ["torch:float32:nhwc"], "batch_sizes": [1, 2], "pairs": 2,
                         "reference_pairs": 1, "warmup": 0, "reps": 1, "encode_workers": 2},
            # bf16 matmuls on a CPU measure its emulation, not a peak anyone quotes.
            "matmul": {"n": 512, "dtype": "float32", "warmup": 2, "reps": 3, "inner": 2},
            "extras": {"masks": {"pairs": 2, "warmup": 0, "reps": 1},
                       "fast": {"pairs": 2, "levels": [1], "reps": 1},
                       "losses": {"warmup": 0, "reps": 1},
                       "loader": {"samples": 8, "workers": 0},
                       "compile": {"batch_size": 1, "warmup": 0, "reps": 1}},
            # Triton kernels run interpreted on a CPU; these two files are fast there.
            "tests": {"kernels": ["tests/test_kernel_probe.py"], "other": ["tests/test_config.py"],
                      "marker": None},
            # Compiling a UNet on a CPU takes minutes and SAM's capture tens of seconds: the GPU
            # pass measures them; here they are recorded as skipped.
            "dry_skip_extras": {"masks": "dry run: attention capture with masks takes tens of seconds on a CPU",
                                "compile": "dry run: torch.compile of the UNet takes minutes on a CPU"},
        }
    return {
        "dry_run": False, "preset": "sd15-random", "device": "cuda",
        # Eager bf16 on NHWC weights: the engine's default GPU path. Pairs = the largest batch, so
        # batch 16 is one UNet batch of 64 rows per repetition and batch 8 two.
        "headline": {"variants": ["torch:bfloat16:nhwc"], "batch_sizes": [8, 16], "pairs": 16,
                     "reference_pairs": 2, "warmup": 1, "reps": 3, "encode_workers": 4},
        "matmul": {"n": 8192, "dtype": "bfloat16", "warmup": 25, "reps": 10, "inner": 5},
        "extras": {"masks": {"pairs": 4, "warmup": 1, "reps": 3},
                   # Fast mode against full mode on the same pairs: pairs/s and mask agreement.
                   "fast": {"pairs": 8, "levels": [1, 2], "reps": 2},
                   "losses": {"warmup": 2, "reps": 5},
                   "loader": {"samples": 128, "workers": 4},
                   "compile": {"batch_size": 8, "warmup": 2, "reps": 5}},
        "tests": {"kernels": None, "other": None, "marker": "gpu"},
        "dry_skip_extras": {},
    }


# --------------------------------------------------------------------------------------------
# Small helpers shared by the driver and the children (standard library only).


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, data: dict) -> None:
    """Whole or absent: a temporary file beside it, then a rename."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def tail_text(lines, limit: int = 2000) -> str:
    text = "\n".join(lines)
    return text[-limit:]


def gpu_test_files() -> tuple[list[str], list[str]]:
    """Test files with a `gpu` mark, Triton kernel files first (their kernels against the torch references)."""
    kernels, other = [], []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text(errors="replace")
        if "mark.gpu" not in text:
            continue
        rel = str(path.relative_to(ROOT))
        (kernels if "magicseg_engine.kernels" in text else other).append(rel)
    return kernels, other


# --------------------------------------------------------------------------------------------
# The driver.


class Log:
    """Everything the stages print, to the console and to log.txt as it comes."""

    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.file.write(text + "\n")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


def run_child(cmd: list[str], budget_s: float, log: Log, env: dict, cwd: Path) -> dict:
    """Run `cmd` in its own process group for at most `budget_s`: {rc, timed_out, elapsed_s, tail}."""
    tail: deque = deque(maxlen=40)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True, text=True, errors="replace", bufsize=1)

    def pump():
        for raw in proc.stdout:
            text = raw.rstrip("\n")
            tail.append(text)
            log.line(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(budget_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_group(proc)
    else:
        try:  # what the stage left running (loader workers, compiler pools) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    reader.join(timeout=5)
    return {"rc": proc.returncode, "timed_out": timed_out, "elapsed_s": round(time.monotonic() - t0, 2),
            "tail": list(tail)}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group (pip, cmake, pytest workers with it), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Pass:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.spec = settings(self.dry)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.budgets = dict(DRY_BUDGETS if self.dry else GPU_BUDGETS)
        self.budgets.update(args.budget)
        self.total = args.total_budget if args.total_budget is not None else (DRY_TOTAL_S if self.dry else GPU_TOTAL_S)
        self.stages = args.stages
        self.extras = args.extras
        self.work = Path(tempfile.mkdtemp(prefix="magicseg-gpu-pass-"))
        self.site = self.work / "site"
        self.t0 = time.monotonic()
        self.log = Log(self.out / "log.txt")
        self.record = {"started": now(), "dry_run": self.dry, "out": str(self.out), "total_budget_s": self.total,
                       "budgets_s": self.budgets, "stages_planned": list(self.stages),
                       "extras_planned": list(self.extras), "settings": self.spec, "stages": []}

    def remaining(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), env.get("PYTHONPATH")) if p)
        return env

    def child_cmd(self, stage: str, item: str | None = None, budget: float | None = None) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--out", str(self.out),
               "--work", str(self.work), "--spec", json.dumps(self.spec)]
        if item:
            cmd += ["--item", item]
        if budget is not None:
            # The child stops its own work a little earlier, so it can still write what it has.
            cmd += ["--deadline-s", str(max(budget - 3 * KILL_GRACE_S, 1.0))]
        return cmd

    def stage_budget(self, stage: str) -> float:
        later = self.stages[self.stages.index(stage) + 1:]
        held = sum(self.budgets[s] for s in later if s in RESERVED)
        return min(self.budgets[stage], self.remaining() - held)

    def run(self) -> int:
        self.log.line(f"== gpu pass {'(dry run) ' if self.dry else ''}started {self.record['started']}; "
                      f"total budget {self.total:.0f} s; output folder {self.out}")
        for stage in self.stages:
            budget = self.stage_budget(stage)
            if stage == "extras":
                entry = self.run_extras(budget)
            else:
                entry = self.run_stage(stage, budget)
            self.record["stages"].append(entry)
            self.save_record()
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        self.record["finished"] = now()
        self.save_record()
        self.cleanup()
        self.print_summary()
        return 0

    def save_record(self) -> None:
        write_json(self.out / "pass.json", self.record)

    def skipped(self, stage: str, budget: float) -> dict:
        reason = (f"{max(budget, 0):.0f} s left for it (of the total {self.total:.0f} s, the headline's budget held "
                  f"back), under the {min(MIN_START[stage], self.budgets[stage]):.0f} s it needs to start")
        self.log.line(f"== {stage}: skipped: {reason}")
        return {"stage": stage, "status": "skipped", "reason": reason, "budget_s": round(budget, 1), "elapsed_s": 0}

    def run_stage(self, stage: str, budget: float) -> dict:
        path = self.out / FILES[stage]
        if budget < min(MIN_START[stage], self.budgets[stage]):
            entry = self.skipped(stage, budget)
            write_json(path, {"stage": entry})
            return entry
        self.log.line(f"== {stage}: budget {budget:.0f} s ({self.remaining():.0f} s of the pass left)")
        started = now()
        res = run_child(self.child_cmd(stage, budget=budget), budget, self.log, self.env(), self.work)
        data = read_json(path)  # what the child wrote, whole or partial
        if res["timed_out"]:
            status = "timed_out"
        elif res["rc"] != 0:
            status = "failed"
        else:
            status = "failed" if data.get("ok") is False else "ok"
        entry = {"stage": stage, "status": status, "budget_s": round(budget, 1), "elapsed_s": res["elapsed_s"],
                 "started": started, "rc": res["rc"]}
        if status != "ok":
            entry["output_tail"] = tail_text(res["tail"])
        data["stage"] = entry
        write_json(path, data)
        self.log.line(f"== {stage}: {status} in {res['elapsed_s']:.1f} s")
        return entry

    def run_extras(self, budget: float) -> dict:
        path = self.out / FILES["extras"]
        t0 = time.monotonic()
        data = {"items": {}, "summary": []}
        entry = {"stage": "extras", "status": "ok", "budget_s": round(budget, 1), "started": now()}
        data["stage"] = entry
        if budget < min(MIN_START["extras"], self.budgets["extras"]):
            entry = self.skipped("extras", budget)
            data["stage"] = entry
            for item in self.extras:
                data["items"][item] = {"status": "skipped", "reason": "no time left for the extras"}
            write_json(path, data)
            return entry
        self.log.line(f"== extras: budget {budget:.0f} s")
        write_json(path, data)
        for item in self.extras:
            left = budget - (time.monotonic() - t0)
            item_budget = min(self.budgets[item], left)
            if item in self.spec["dry_skip_extras"]:
                data["items"][item] = {"status": "skipped", "reason": self.spec["dry_skip_extras"][item]}
            elif item_budget < min(MIN_START[item], self.budgets[item]):
                data["items"][item] = {"status": "skipped", "budget_s": round(max(item_budget, 0), 1),
                                       "reason": f"{max(left, 0):.0f} s of the extras left, under the "
                                                 f"{min(MIN_START[item], self.budgets[item])} s it needs to start"}
            else:
                self.log.line(f"== extras/{item}: budget {item_budget:.0f} s")
                result_path = self.work / f"extra-{item}.json"
                res = run_child(self.child_cmd("extras", item), item_budget, self.log, self.env(), self.work)
                got = read_json(result_path)
                status = "timed_out" if res["timed_out"] else ("failed" if res["rc"] != 0 else "ok")
                record = {"status": status, "budget_s": round(item_budget, 1), "elapsed_s": res["elapsed_s"]}
                if "result" in got:
                    record["result"] = got["result"]
                    data["summary"].append(got["result"].get("headline"))
                    if "sam_refinement" in got["result"]:
                        data["summary"].append(got["result"]["sam_refinement"].get("headline"))
                if "error" in got:
                    record["error"] = got["error"]
                if status != "ok" and "error" not in got:
                    record["error"] = tail_text(res["tail"], 1000)
                data["items"][item] = record
                self.log.line(f"== extras/{item}: {status} in {res['elapsed_s']:.1f} s")
            entry["elapsed_s"] = round(time.monotonic() - t0, 2)
            write_json(path, data)  # after every item: a later time-out keeps it
        entry["elapsed_s"] = round(time.monotonic() - t0, 2)
        write_json(path, data)
        return entry

    def cleanup(self) -> None:
        # A child killed while writing leaves its temporary file; only whole files go back.
        for stray in self.out.glob(".tmp-*"):
            stray.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)  # the wheels' folder and test reports

    def print_summary(self) -> None:
        lines = ["== summary"]
        for s in self.record["stages"]:
            lines.append(f"  {s['stage']}: {s['status']} ({s.get('elapsed_s', 0):.0f} s of {s.get('budget_s', 0):.0f} s)")
            if s["status"] in ("failed", "timed_out"):
                data = read_json(self.out / FILES[s["stage"]])
                why = data.get("error") or "\n".join((s.get("output_tail") or "").splitlines()[-5:])
                lines += [f"    {line}" for line in str(why).splitlines()[-5:]]
        corr = read_json(self.out / FILES["correctness"])
        if corr.get("totals"):
            t = corr["totals"]
            lines.append(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                         f"{t['skipped']} skipped")
        head = read_json(self.out / FILES["headline"]).get("pass_summary")
        if head:
            for row in head["by_batch"]:
                lines.append(f"  batch {row['batch_size']}: engine {row['engine_pairs_per_s']:.3g} pairs/s, reference "
                             f"{row['reference_pairs_per_s']:.3g} pairs/s: {row['ratio']:.2f}x")
            frac = head.get("unet_fraction_of_measured_peak")
            lines.append(f"  UNet {head['unet_tflops_per_s']:.4g} TFLOP/s; measured {head['matmul_dtype']} matmul peak "
                         f"{head['measured_peak_tflops']:.4g} TFLOP/s"
                         + ("" if frac is None else f" ({100 * frac:.1f}% of it)")
                         + ("" if head.get("dense_peak_tflops") is None
                            else f"; data-sheet peak {head['dense_peak_tflops']:g}"))
        extras = read_json(self.out / FILES["extras"])
        for row in extras.get("summary", []):
            if row:
                ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
                lines.append(f"  {row['bench']}: {row['compared']}: {ratio}" + (f" ({row['note']})" if row.get("note") else ""))
        lines.append(f"  files: {', '.join(sorted(p.name for p in self.out.iterdir() if p.is_file()))} in {self.out}")
        for line in lines:
            self.log.line(line)


# --------------------------------------------------------------------------------------------
# The children: one process per stage (and per extra), so a budget can stop it.


def child_install(spec: dict, out: Path, work: Path) -> int:
    site = work / "site"
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    py = sys.executable
    commands = [
        ("wheels", [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--disable-pip-version-check", "--upgrade", "--target", str(site), *wheels]),
        # Over the machine's torch: the project's own pins are for a full install from an index.
        ("project", [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                     "--disable-pip-version-check", "-e", str(ROOT)]),
    ]
    record: dict = {"ok": True, "wheels": [Path(w).name for w in wheels], "site": str(site),
                    "planned": [" ".join(cmd) for _, cmd in commands], "steps": []}
    path = out / FILES["install"]
    write_json(path, record)
    if spec["dry_run"]:
        record["steps"].append({"step": "pip", "skipped": "dry run: the commands above are the plan"})
    else:
        for name, cmd in commands:
            if name == "wheels" and not wheels:
                record["steps"].append({"step": name, "ok": False, "error": "no wheels in .whl/: run "
                                        "benchmarks/wheelhouse.sh where pip reaches an index and bring .whl along"})
                continue
            # PEP 668: a system interpreter refuses installs without this; a bare machine is thrown away.
            env = dict(os.environ, PIP_BREAK_SYSTEM_PACKAGES="1")
            if site.is_dir():
                env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace")
            print(proc.stdout[-6000:], flush=True)
            step = {"step": name, "ok": proc.returncode == 0, "rc": proc.returncode,
                    "seconds": round(time.monotonic() - t0, 2)}
            if proc.returncode:
                step["output_tail"] = proc.stdout[-2000:]
                record["ok"] = False
            record["steps"].append(step)
            write_json(path, record)
    # A fresh interpreter: the editable install's path hook is read at start-up.
    env = dict(os.environ)
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    proc = subprocess.run([py, "-c", CHECK], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace")
    check: dict = {"seconds": round(time.monotonic() - t0, 2), "rc": proc.returncode}
    try:
        check.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        check["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    if proc.stderr.strip():
        print(proc.stderr[-3000:], flush=True)
    record["check"] = check
    record["ok"] = record["ok"] and proc.returncode == 0 and check.get("extension", {}).get("ok", False)
    write_json(path, record)
    print(json.dumps({k: check.get(k) for k in ("python", "torch", "gpu", "extension")}), flush=True)
    return 0


# Run after the install, in a new interpreter: what the machine has and whether the extension loads.
CHECK = r"""
import importlib, importlib.metadata as md, json, os, platform, sys, time
out = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count()}
import sysconfig
# The C++ extension is built against these headers; a missing Python.h is the first thing to rule out.
out["python_h"] = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
t0 = time.perf_counter()
import torch
out["torch"] = torch.__version__
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = torch.cuda.get_device_name(0)
    out["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    out["gpu_multiprocessors"] = p.multi_processor_count
    out["gpu_capability"] = f"{p.major}.{p.minor}"
try:
    import magicseg_engine, magicseg_engine._C as C
    from magicseg_engine.ops import build_info
    out["extension"] = {"ok": True, "file": C.__file__, "build_info": build_info()}
except Exception as err:
    out["extension"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
mods = {}
for name in ("diffusers", "segment_anything", "webdataset", "open_clip", "pydantic", "inflect", "transformers",
             "triton", "onnxruntime", "torchmetrics"):
    try:
        importlib.import_module(name)
        mods[name] = "ok"
    except Exception as err:
        mods[name] = f"{type(err).__name__}: {str(err)[:200]}"
# Optional, and slow to import: only whether they are there (their stages are skipped without them).
import importlib.util
for name in ("nvidia.dali", "ray", "tensorrt"):
    try:
        mods[name] = "present" if importlib.util.find_spec(name) else "absent"
    except ModuleNotFoundError:
        mods[name] = "absent"
out["imports"] = mods
versions = {}
for dist in ("torch", "triton", "torchvision", "numpy", "diffusers", "transformers", "huggingface-hub",
             "segment-anything", "webdataset", "open_clip_torch", "pydantic", "onnxruntime", "timm",
             "scikit-build-core", "pybind11", "magicseg-engine", "pytest", "pytest-xdist", "pytest-timeout",
             "nvidia-dali-cuda130", "ray"):
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
out["versions"] = versions
out["import_seconds"] = round(time.perf_counter() - t0, 2)
print(json.dumps(out))
"""


JUNIT_LIMIT = 300  # characters of each failure's message


def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": name, "kind": child.tag, "reason": (message[0] if message else "")[:JUNIT_LIMIT]})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return {**counts, "failures": failures}


# `-v` lines, plain or from xdist workers: used when pytest is stopped before its report.
VERBOSE_LINE = re.compile(r"(?:(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))|"
                          r"(?:(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+))")


def parse_verbose(lines: list[str]) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for line in lines:
        m = VERBOSE_LINE.search(line)
        if not m:
            continue
        test, word = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        counts[key[word]] += 1
        if word in ("FAILED", "ERROR"):
            failures.append({"test": test, "kind": word.lower(), "reason": "stopped before pytest's report"})
    return {**counts, "failures": failures}


def child_correctness(spec: dict, out: Path, work: Path, deadline: float) -> int:
    import importlib.util

    tests = spec["tests"]
    marker = tests["marker"]
    kernels, other = gpu_test_files()
    planned_groups = {"kernels": kernels, "other": other}
    groups = {"kernels": tests["kernels"] if tests["kernels"] is not None else kernels,
              "other": tests["other"] if tests["other"] is not None else other}
    extra = []
    if not spec["dry_run"] and importlib.util.find_spec("xdist"):
        extra += ["-n", "4"]  # Triton compiles in parallel; the tests share the one GPU
    if importlib.util.find_spec("pytest_timeout"):
        extra += ["--timeout", "90"]

    def command(files: list[str], junit: Path, gpu_marker: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
               "-p", "no:cacheprovider", "-v", "-rfE", "--junitxml", str(junit), *extra]
        if gpu_marker:
            cmd += ["-m", gpu_marker]
        return cmd + [str(ROOT / f) for f in files]

    record: dict = {"marker": marker, "groups": [],
                    "planned_gpu_commands": {g: " ".join(command(files, Path(f"junit-{g}.xml"), "gpu"))
                                             for g, files in planned_groups.items()}}
    path = out / FILES["correctness"]
    for group, files in groups.items():
        entry: dict = {"group": group, "files": files}
        left = deadline - time.monotonic()
        if not files:
            entry["status"] = "empty"
        elif left < 5:
            entry["status"] = "skipped"
            entry["reason"] = "no time left in the stage's budget"
        else:
            junit = work / f"junit-{group}.xml"
            cmd = command(files, junit, marker)
            entry["command"] = " ".join(cmd)
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", start_new_session=True, bufsize=1)
            lines: list[str] = []
            stopped = threading.Event()

            def stop(proc=proc, stopped=stopped):
                stopped.set()
                stop_group(proc)

            timer = threading.Timer(left, stop)
            timer.start()
            for raw in proc.stdout:
                lines.append(raw.rstrip("\n"))
                print(raw, end="", flush=True)
            proc.wait()
            timer.cancel()
            timed_out = stopped.is_set()
            entry.update(rc=proc.returncode, seconds=round(time.monotonic() - t0, 2))
            if junit.is_file() and not timed_out:
                entry.update(parse_junit(junit))
                entry["status"] = "ran"
            else:
                entry.update(parse_verbose(lines))
                entry["status"] = "timed_out" if timed_out else "no_report"
                entry["output_tail"] = "\n".join(lines[-30:])[-2000:]
        record["groups"].append(entry)
        record["totals"] = {k: sum(g.get(k, 0) for g in record["groups"])
                            for k in ("passed", "failed", "errors", "skipped")}
        write_json(path, record)
    return 0


def gpu_short_name(name: str) -> str:
    match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return (match.group(1) if match else name.split()[-1]).lower()


def matmul_peak(device, n: int, dtype_name: str, warmup: int, reps: int, inner: int) -> dict:
    """TFLOP/s of one plain n^3 matmul, median over `reps` timings of `inner` back-to-back calls:
    the ceiling the UNet is compared with, measured on this machine in this run."""
    import statistics

    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):  # clocks up, cuBLAS's choice made
        torch.mm(a, b, out=c)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync()
        times.append((time.perf_counter() - t0) / inner)
    flop = 2 * n**3
    median = statistics.median(times)
    return {"n": n, "dtype": dtype_name, "warmup": warmup, "reps": reps, "inner": inner,
            "median_s": median, "tflops": flop / median / 1e12, "best_tflops": flop / min(times) / 1e12,
            "data": "random normal"}


def child_headline(spec: dict, out: Path) -> int:
    import torch

    path = out / FILES["headline"]
    h = spec["headline"]
    device = torch.device(spec["device"])
    state: dict = {"ok": False, "preset": spec["preset"], "settings": h, "partial": {}}
    t0 = time.monotonic()

    def save(step: str) -> None:
        state["step"] = step
        state.setdefault("saved_steps", []).append(step)
        state["seconds"] = round(time.monotonic() - t0, 2)
        write_json(path, state)

    m = spec["matmul"]
    peak = matmul_peak(device, m["n"], m["dtype"], m["warmup"], m["reps"], m["inner"])
    state["matmul_peak"] = peak
    print(f"matmul {m['n']}^3 {m['dtype']}: {peak['tflops']:.1f} TFLOP/s (median), {peak['best_tflops']:.1f} best",
          flush=True)
    save("matmul peak measured")

    from magicseg_engine.bench import tune
    from magicseg_engine.bench.common import dense_peak_tflops
    from magicseg_engine.bench.suite import headline
    from magicseg_engine.config import load_preset
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    # Each part of the sweep is saved as it ends, so a stopped stage still returns it.
    for name, key in (("_measure_reference", "reference"), ("_measure_variant", "variants")):
        original = getattr(tune, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, _key=key, **kwargs):
            result = _original(*args, **kwargs)
            if _key == "variants":
                state["partial"].setdefault("variants", []).append(result)
            else:
                state["partial"][_key] = result
            save(f"{_key} measured")
            return result

        setattr(tune, name, wrapped)

    config = load_preset(spec["preset"])
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"),
                            num=max(h["pairs"], h["reference_pairs"])).records
    variants = tune.parse_variants(",".join(h["variants"]), device)
    started = time.monotonic()
    result = tune.bench_tune(spec["preset"], device, variants, records[:h["pairs"]], records[:h["reference_pairs"]],
                             h["batch_sizes"], h["encode_workers"], h["warmup"], h["reps"], seed=config.seed,
                             on_step=lambda label: print(f"bench tune: {label} done at "
                                                         f"{time.monotonic() - started:.1f} s", flush=True))
    result["headline"] = headline("tune", result)
    ref = result["reference"]["pairs_per_s"]
    ran = [v for v in result["variants"] if "error" not in v]
    unet = result["unet_best"]
    table_peak = dense_peak_tflops(device)
    by_batch = [{"variant": v["variant"], "batch_size": r["batch_size"], "engine_pairs_per_s": r["pairs_per_s"],
                 "reference_pairs_per_s": ref, "ratio": r["pairs_per_s"] / ref,
                 "engine_median_s": r["median_s"], "engine_peak_memory_bytes": r.get("peak_memory_bytes")}
                for v in ran for r in v["pipeline"]]
    gpu = result["machine"].get("gpu")
    date = result["machine"].get("date")
    result["matmul_peak"] = peak
    result["pass_summary"] = {
        "preset": spec["preset"], "gpu": gpu,
        "image": f"{config.diffusion.height}x{config.diffusion.width}", "steps": config.diffusion.steps,
        "guidance": config.diffusion.guidance, "masks": config.masks.source,
        "reference": {"variant": result["reference"]["variant"], "pairs_per_s": ref, "batch_size": 1},
        "by_batch": by_batch,
        "best_ratio": result["speedup"],
        "unet_variant": unet["variant"], "unet_rows": unet["rows"], "unet_tflops_per_s": unet["tflops_per_s"],
        "matmul_dtype": peak["dtype"], "measured_peak_tflops": peak["tflops"],
        "unet_fraction_of_measured_peak": unet["tflops_per_s"] / peak["tflops"],
        "dense_peak_tflops": table_peak,
        "unet_fraction_of_dense_peak": unet["fraction_of_peak"],
        "seconds": round(time.monotonic() - t0, 2),
        # Where the file belongs among the results (benchmarks/summarize.py reads it as `bench tune`).
        "results_name": f"tune-{spec['preset']}-{gpu_short_name(gpu) if gpu else device.type}-{date}.json",
    }
    result["saved_steps"] = state["saved_steps"]  # what a time-out would have kept
    result["ok"] = True
    write_json(path, result)
    return 0


def child_extra(spec: dict, item: str, work: Path) -> int:
    import torch

    result_path = work / f"extra-{item}.json"
    device = torch.device(spec["device"])
    s = spec["extras"][item]
    try:
        if item in ("masks", "losses", "loader"):
            result = suite_bench(spec["preset"], device, item, s)
        elif item == "compile":
            result = compile_vs_eager(spec["preset"], device, s)
        elif item == "fast":
            result = fast_vs_full(spec["preset"], device, s)
        else:
            raise ValueError(f"unknown extra {item!r}")
    except Exception as err:
        write_json(result_path, {"error": f"{type(err).__name__}: {str(err).strip()[:500]}",
                                 "traceback": traceback.format_exc()[-3000:]})
        traceback.print_exc()
        return 1
    write_json(result_path, {"result": result})
    return 0


def suite_bench(preset: str, device, item: str, s: dict) -> dict:
    from magicseg_engine.bench.suite import BenchContext, headline

    if item == "loader":
        from magicseg_engine.bench.pretrain import bench_loader

        result = bench_loader(preset, device, samples=s["samples"], workers=s["workers"])
        result["headline"] = headline("loader", result)
        return result
    from magicseg_engine.bench.suite import run_bench

    ctx = BenchContext(preset, device, warmup=s.get("warmup", 1), reps=s.get("reps", 3),
                       pairs=s.get("pairs", 4), batch_size=s.get("pairs", 4))
    result = run_bench(item, ctx)
    if item == "masks" and "sam" not in result:
        # Where `bench masks` measures the capture alone, batched SAM is its own benchmark: same models.
        result["sam_refinement"] = run_bench("sam", ctx)
    return result


def fast_vs_full(preset: str, device, s: dict) -> dict:
    """`bench fast`: each fast level against full mode on the same pairs, the preset's mask settings."""
    from magicseg_engine.bench.fast import fast_bench
    from magicseg_engine.bench.suite import headline
    from magicseg_engine.config import load_preset

    result = fast_bench(load_preset(preset), device, s["levels"], s["pairs"], s["reps"])
    result["headline"] = headline("fast", result)
    return result


def compile_vs_eager(preset: str, device, s: dict) -> dict:
    """The UNet's step, eager and through torch.compile (CUDA graphs on a GPU), same bf16 NHWC weights."""
    import gc

    import torch

    from magicseg_engine.bench.common import environment, summarise
    from magicseg_engine.bench.generate import unet_step_times
    from magicseg_engine.bench.unet import unet_flops_per_row
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_sampler

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = load_preset(preset, {"diffusion": {"dtype": dtype}})
    rows = 4 * s["batch_size"]
    out: dict = {"benchmark": "compile", **environment(device), "preset": preset, "dtype": dtype, "rows": rows}
    for backend in ("torch", "compile"):
        sampler = build_sampler(config, str(device), backend, channels_last=True)
        flops = unet_flops_per_row(sampler)
        t0 = time.perf_counter()
        unet_step_times(sampler, rows, 0, 1)  # the first call compiles
        first = time.perf_counter() - t0
        timing = summarise(unet_step_times(sampler, rows, s["warmup"], s["reps"]))
        timing.update(first_call_s=first, rows_per_s=rows / timing["median_s"],
                      tflops_per_s=rows * flops / timing["median_s"] / 1e12)
        out[backend] = timing
        del sampler
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    speedup = out["torch"]["median_s"] / out["compile"]["median_s"]
    out["speedup"] = speedup
    out["headline"] = {"bench": "compile", "compared": f"UNet step ({rows} rows), torch.compile vs eager",
                       "ours": out["compile"]["rows_per_s"], "baseline": out["torch"]["rows_per_s"],
                       "unit": "rows/s", "ratio": speedup,
                       "note": f"first compiled call {out['compile']['first_call_s']:.0f} s"}
    return out


def child_main(args) -> int:
    spec = json.loads(args.spec)
    out, work = Path(args.out), Path(args.work)
    if args.child == "install":
        return child_install(spec, out, work)
    if args.child == "correctness":
        # The driver stops this process at its budget; the tests stop a little before, so the
        # counts so far are written first.
        return child_correctness(spec, out, work, time.monotonic() + (args.deadline_s or 3600.0))
    if args.child == "headline":
        try:
            return child_headline(spec, out)
        except Exception as err:
            data = read_json(out / FILES["headline"])
            data.update(ok=False, error=f"{type(err).__name__}: {str(err).strip()[:500]}",
                        traceback=traceback.format_exc()[-3000:])
            write_json(out / FILES["headline"], data)
            traceback.print_exc()
            return 1
    if args.child == "extras":
        return child_extra(spec, args.item, work)
    raise SystemExit(f"unknown stage {args.child!r}")


# --------------------------------------------------------------------------------------------


def parse_budgets(items: list[str]) -> dict:
    budgets = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in (*STAGES, *EXTRAS) or not value:
            raise SystemExit(f"--budget {item!r}: write NAME=SECONDS, NAME one of {', '.join((*STAGES, *EXTRAS))}")
        budgets[name] = float(value)
    return budgets


def parse_list(text: str, allowed: tuple, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"{what} {','.join(bad)}: choose from {', '.join(allowed)}")
    return [n for n in allowed if n in names]  # always in the pass's order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu-pass")
    parser.add_argument("--out", default=default_out,
                        help="output folder (default: $OUT when set, else benchmarks/results/gpu-pass)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU; pip commands recorded, not run")
    parser.add_argument("--total-budget", type=float, default=None,
                        help=f"seconds for the whole pass (default {GPU_TOTAL_S}; dry run {DRY_TOTAL_S})")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=S",
                        help="a stage's or an extra's own budget in seconds, e.g. headline=200 (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run, of " + ",".join(STAGES))
    parser.add_argument("--extras", default=",".join(EXTRAS), help="extras to run, of " + ",".join(EXTRAS))
    # The children's own options.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--item", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if not args.dry_run and not (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        # Without a GPU the install stage would still reinstall the project into this interpreter.
        parser.exit(2, "gpu_pass.py: no NVIDIA GPU here; run it on a GPU machine, or rehearse with --dry-run\n")
    args.budget = parse_budgets(args.budget)
    args.stages = parse_list(args.stages, STAGES, "--stages")
    args.extras = parse_list(args.extras, EXTRAS, "--extras")
    return Pass(args).run()


if __name__ == "__main__":
    sys.exit(main())
