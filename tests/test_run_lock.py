"""One command at a time on a run directory; outputs that are files or on read-only volumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import RunState
from magicseg_engine.errors import UsageError
from magicseg_engine.run_lock import _holder_pid, run_directory_lock

CONSOLE = str(Path(sys.executable).with_name("magicseg-engine"))


def _generate(out: Path, *flags: str, num: int = 2):
    return CliRunner().invoke(app, ["generate", "--preset", "tiny", "--classes", "voc", "--num-pairs", str(num),
                                    "--device", "cpu", "--batch-size", "2", "--out", str(out), *flags])


def _hold_in_child(path: Path) -> subprocess.Popen:
    """A separate process holding the run lock on `path` until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from magicseg_engine.run_lock import run_directory_lock
        with run_directory_lock({str(path)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd="/")
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_is_refused_naming_the_process_and_released_on_exit(tmp_path):
    out = tmp_path / "run"
    child = _hold_in_child(out)
    try:
        assert _holder_pid(out) == child.pid
        with pytest.raises(UsageError, match=rf"process {child.pid} is writing the run in .*choose another --out"):
            with run_directory_lock(out):
                pass
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert _holder_pid(out) is None
    with run_directory_lock(out):  # the kernel dropped the lock with the process
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    child = _hold_in_child(out)
    child.kill()
    child.wait(timeout=60)
    with run_directory_lock(out):
        pass


@pytest.mark.slow
def test_generate_on_a_directory_another_command_holds_is_refused_before_anything_changes(tmp_path, monkeypatch):
    import magicseg_engine.pipeline as pipeline

    out = tmp_path / "run"
    assert _generate(out).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded for a command that had to be refused")

    monkeypatch.setattr(pipeline, "build_sampler", no_models)
    child = _hold_in_child(out)
    try:
        for flags in (["--resume"], ["--overwrite"]):
            result = _generate(out, *flags)
            assert result.exit_code == 2, result.output
            assert f"process {child.pid} is writing the run in {out}" in " ".join(result.output.split())
            assert "Traceback" not in result.output
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_masks_on_a_held_output_is_refused(tmp_path):
    source = tmp_path / "source"
    assert _generate(source).exit_code == 0
    out = tmp_path / "annotated"
    out.mkdir()
    child = _hold_in_child(out)
    try:
        result = CliRunner().invoke(app, ["masks", "--data", str(source), "--out", str(out), "--no-sam",
                                          "--device", "cpu"])
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert result.exit_code == 2 and "is writing the run in" in result.output
    assert not any(out.iterdir())


def test_an_output_path_that_is_a_file_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a run\n")
    result = _generate(out)
    assert result.exit_code == 2
    assert f"--out {out} is a file, not a directory" in result.output
    assert out.read_text() == "not a run\n"


def test_a_refused_command_leaves_no_directory_it_created(tmp_path):
    out = tmp_path / "new" / "run"
    result = CliRunner().invoke(app, ["generate", "--preset", "tiny", "--classes", str(tmp_path / "missing.txt"),
                                      "--num-pairs", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists()


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}")


@pytest.mark.skipif(sys.platform != "linux", reason="mounts a tmpfs, which needs Linux")
def test_a_run_on_a_read_only_volume_is_refused_in_one_line_before_models_load(tmp_path):
    volume = tmp_path / "volume"
    _mount_tmpfs(volume, "size=16m")
    try:
        run = volume / "run"
        assert _generate(run).exit_code == 0
        shards = sorted((run / "shards").iterdir())
        subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
        for out, flags in ((run, ["--resume"]), (run, ["--overwrite"]), (volume / "new", [])):
            result = _generate(out, *flags)
            assert result.exit_code == 2, result.output
            assert f"{out} is not writable" in result.output or f"cannot create output directory {out}" in result.output
            assert "Traceback" not in result.output
        assert sorted((run / "shards").iterdir()) == shards
        assert len(RunState.load(run, repair=False).finished) == 2
    finally:
        subprocess.run(["umount", str(volume)], check=False)


@pytest.mark.slow
def test_two_generate_processes_on_one_folder_give_one_run_without_duplicates(tmp_path):
    """The second process is refused while the first renders; the first finishes every pair once."""
    out = tmp_path / "run"
    cmd = [CONSOLE, "generate", "--preset", "tiny", "--classes", "voc", "--num-pairs", "6", "--device", "cpu",
           "--batch-size", "2", "--samples-per-shard", "2", "--out", str(out), "--resume"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGICSEG_")}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 300
        while not (out / "run.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # A tiny run can finish before a second process has imported torch: hold the first still
        # (with its lock) while the second tries, so the two really overlap.
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert second.returncode == 2, second.stderr
    assert f"process {first.pid} is writing the run in {out}" in " ".join(second.stderr.split())
    keys = [k for line in (out / "manifest.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(keys) == 6 and len(set(keys)) == 6
    assert len(RunState.load(out).finished) == 6
