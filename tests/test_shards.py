"""Shards of a run directory: keys, deterministic tars, the manifest, and surviving kills."""

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from magicseg_engine.data import (
    DuplicateKeyError,
    RunState,
    ShardWriter,
    finished_keys,
    iter_samples,
    sample_key,
)
from magicseg_engine.data import shards as shards_module
from magicseg_engine.errors import UsageError

# Deterministic fake payloads of varying sizes. The writer processes below and the checks here
# run the same code, so a sample read back can be compared byte for byte.
PAYLOAD_CODE = '''
import hashlib, json
def payload(key):
    digest = hashlib.sha256(key.encode()).digest()
    return {
        "pos.jpg": digest * (1 + digest[0] % 64),
        "neg.jpg": digest[::-1] * (1 + digest[1] % 64),
        "json": json.dumps({"key": key}).encode(),
    }
'''
exec(PAYLOAD_CODE)

# A generation process in miniature: skip what the run has finished, write the rest.
WRITER_CODE = PAYLOAD_CODE + '''
import sys, time
from magicseg_engine.data import ShardWriter, finished_keys
run_dir, writer_id, per_shard, delay, keys_file = sys.argv[1:6]
keys = json.loads(open(keys_file).read())
finished = finished_keys(run_dir)
with ShardWriter(run_dir, samples_per_shard=int(per_shard), writer_id=writer_id) as writer:
    print("writing", flush=True)
    for key in keys:
        if key not in finished:
            time.sleep(float(delay))
            writer.add(key, payload(key))
'''


def make_keys(n, tag="prompt"):
    return [sample_key("sd15", f"{tag} {i}", "no dog", i) for i in range(n)]


def write(run_dir, keys, per_shard, writer_id="0"):
    with ShardWriter(run_dir, samples_per_shard=per_shard, writer_id=writer_id) as writer:
        for key in keys:
            writer.add(key, payload(key))
    return writer


def manifest_lines(run_dir):
    return (Path(run_dir) / "manifest.jsonl").read_bytes().split(b"\n")


def shard_files(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "shards").iterdir())


def assert_run_holds_exactly(run_dir, keys):
    """Every requested key once, with its payload; nothing else; no temporary files."""
    state = RunState.load(run_dir)
    listed = [k for shard in state.shards for k in shard.keys]
    assert sorted(listed) == sorted(keys)
    samples = list(iter_samples(run_dir))
    assert sorted(s["__key__"] for s in samples) == sorted(keys)
    for sample in samples:
        files = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert files == payload(sample["__key__"])
    assert shard_files(run_dir) == sorted(s.name for s in state.shards)  # no .tmp, nothing unlisted


# --- keys -------------------------------------------------------------------------------------


def test_key_is_stable_across_calls_and_processes():
    key = sample_key("sd15", "a dog on a sofa", "a sofa", 7)
    assert key == sample_key("sd15", "a dog on a sofa", "a sofa", 7)
    # Pinned: a key that changed between versions would make a resumed run redo everything.
    assert key == "f11825605af618ddcee1"


def test_key_rejects_a_non_integer_seed():
    with pytest.raises(TypeError):
        sample_key("m", "p", "n", True)


requests = st.tuples(st.text(max_size=20), st.text(max_size=40), st.text(max_size=40), st.integers(0, 2**70))


@settings(max_examples=200, deadline=None)
@given(requests, st.integers(0, 3), requests)
def test_keys_differ_when_any_field_differs(base, field, other):
    changed = list(base)
    changed[field] = other[field]
    assume(tuple(changed) != base)
    assert sample_key(*changed) != sample_key(*base)
    assert sample_key(*base) == sample_key(*base)


# --- writing and reading ----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "per_shard"), [(10, 4), (8, 4), (1, 3), (7, 1), (0, 5)])
def test_shard_count_manifest_and_readback(tmp_path, n, per_shard):
    keys = make_keys(n)
    writer = write(tmp_path, keys, per_shard)
    names = [f"magicseg-0-{i:06d}.tar" for i in range(math.ceil(n / per_shard))]
    assert [s.name for s in writer.written] == names
    assert shard_files(tmp_path) == names
    lines = [json.loads(line) for line in manifest_lines(tmp_path) if line]
    assert [line["shard"] for line in lines] == names
    assert [k for line in lines for k in line["keys"]] == keys  # each key once, in order
    for line in lines:
        with tarfile.open(tmp_path / "shards" / line["shard"]) as tar:
            members = tar.getmembers()
            expected = [f"{k}.{ext}" for k in line["keys"] for ext in ("json", "neg.jpg", "pos.jpg")]
            assert [m.name for m in members] == expected
            metadata = {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members}
            assert metadata == {(0, 0, 0, 0o644, "", "")}
            for key in line["keys"]:
                assert tar.extractfile(f"{key}.pos.jpg").read() == payload(key)["pos.jpg"]
        data = (tmp_path / "shards" / line["shard"]).read_bytes()
        assert (line["bytes"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert_run_holds_exactly(tmp_path, keys)


def test_same_samples_give_identical_bytes(tmp_path):
    keys = make_keys(9)
    write(tmp_path / "a", keys, 4)
    with ShardWriter(tmp_path / "b", samples_per_shard=4) as writer:
        for key in keys:  # the same files in another dict order
            writer.add(key, dict(reversed(list(payload(key).items()))))
    for name in shard_files(tmp_path / "a"):
        assert (tmp_path / "a/shards" / name).read_bytes() == (tmp_path / "b/shards" / name).read_bytes()
    assert manifest_lines(tmp_path / "a") == manifest_lines(tmp_path / "b")


def test_resume_continues_numbering_and_writer_ids_do_not_clash(tmp_path):
    keys = make_keys(12)
    write(tmp_path, keys[:5], 2)
    write(tmp_path, keys[5:8], 2)
    write(tmp_path, keys[8:], 2, writer_id="w1")
    assert shard_files(tmp_path) == [
        "magicseg-0-000000.tar", "magicseg-0-000001.tar", "magicseg-0-000002.tar",
        "magicseg-0-000003.tar", "magicseg-0-000004.tar",
        "magicseg-w1-000000.tar", "magicseg-w1-000001.tar",
    ]
    assert_run_holds_exactly(tmp_path, keys)


def test_finished_or_repeated_key_is_refused(tmp_path):
    keys = make_keys(3)
    write(tmp_path, keys[:2], 5)
    assert finished_keys(tmp_path) == set(keys[:2])
    with ShardWriter(tmp_path, samples_per_shard=5) as writer:
        with pytest.raises(DuplicateKeyError, match=keys[0]):
            writer.add(keys[0], payload(keys[0]))
        writer.add(keys[2], payload(keys[2]))
        with pytest.raises(DuplicateKeyError):  # still in the open shard
            writer.add(keys[2], payload(keys[2]))
    assert_run_holds_exactly(tmp_path, keys)


def test_samples_of_a_shard_must_have_the_same_files(tmp_path):
    keys = make_keys(2)
    with ShardWriter(tmp_path, samples_per_shard=5) as writer:
        writer.add(keys[0], payload(keys[0]))
        with pytest.raises(ValueError, match="files"):
            writer.add(keys[1], {"pos.jpg": b"x"})
    assert_run_holds_exactly(tmp_path, keys[:1])


@pytest.mark.parametrize(("key", "files"), [
    ("has.dot", {"json": b"{}"}), ("", {"json": b"{}"}), ("k", {}),
    ("k", {"Pos.JPG": b""}), ("k", {"json": "text"}),
])
def test_bad_keys_and_files_are_refused(tmp_path, key, files):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises((ValueError, TypeError)):
            writer.add(key, files)
    assert finished_keys(tmp_path) == frozenset()


def test_empty_or_absent_run_has_no_finished_keys(tmp_path):
    assert finished_keys(tmp_path / "absent") == frozenset()
    assert not (tmp_path / "absent").exists()
    assert list(iter_samples(tmp_path)) == []


def test_one_writer_id_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "_WRITER_LOCK_WAIT_S", 0.1)
    with ShardWriter(tmp_path, writer_id="a"):
        with pytest.raises(UsageError, match="own writer id"):
            ShardWriter(tmp_path, writer_id="a")
        ShardWriter(tmp_path, writer_id="b").close()


# --- damage and leftovers ---------------------------------------------------------------------


def test_torn_last_line_is_cut_and_its_shard_recovered(tmp_path):
    keys = make_keys(6)
    write(tmp_path, keys, 3)
    manifest = tmp_path / "manifest.jsonl"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 40])
    # A reader that changes nothing skips the torn line; the second shard is not finished.
    assert RunState.load(tmp_path, repair=False).finished == set(keys[:3])
    assert manifest.read_bytes() == data[: len(data) - 40]
    state = RunState.load(tmp_path)
    assert state.recovered == ("magicseg-0-000001.tar",)
    assert state.finished == set(keys)
    assert manifest.read_bytes() == data  # cut, then the same line appended again
    assert_run_holds_exactly(tmp_path, keys)


def test_bad_line_inside_the_manifest_is_a_usage_error(tmp_path):
    write(tmp_path, make_keys(6), 2)
    lines = manifest_lines(tmp_path)
    lines[1] = lines[1][:30]
    (tmp_path / "manifest.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(UsageError, match="line 2 is not a shard entry"):
        finished_keys(tmp_path)


def test_missing_listed_shard_is_a_usage_error(tmp_path):
    write(tmp_path, make_keys(4), 2)
    (tmp_path / "shards/magicseg-0-000001.tar").unlink()
    with pytest.raises(UsageError, match=r"magicseg-0-000001.tar listed in manifest.jsonl is missing") as err:
        finished_keys(tmp_path)
    assert "\n" not in str(err.value) and "restore the shard" in str(err.value)
    with pytest.raises(UsageError):  # the writer does not start on a damaged run either
        ShardWriter(tmp_path)


def test_changed_listed_shard_is_a_usage_error(tmp_path):
    write(tmp_path, make_keys(4), 2)
    path = tmp_path / "shards/magicseg-0-000000.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1  # inside the first member's data: same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="magicseg-0-000000.tar .*does not match its sha256"):
        finished_keys(tmp_path)
    assert len(finished_keys(tmp_path, verify=False)) == 4  # without verify only sizes are checked
    path.write_bytes(bytes(data[:-512]))
    with pytest.raises(UsageError, match=f"has {len(data) - 512} bytes, not the {len(data)} its line records"):
        finished_keys(tmp_path, verify=False)


def test_dead_writers_temporary_files_are_removed_live_ones_kept(tmp_path):
    keys = make_keys(4)
    write(tmp_path, keys[:2], 2)
    with ShardWriter(tmp_path, samples_per_shard=5, writer_id="live") as writer:
        writer.add(keys[2], payload(keys[2]))
        dead = tmp_path / "shards/.magicseg-0-000007.tar.k2j4x9q1.tmp"  # from a killed writer "0"
        dead.write_bytes(b"half a shard")
        live = [p for p in (tmp_path / "shards").iterdir() if p.name.endswith(".tmp") and "live" in p.name]
        assert len(live) == 1
        state = RunState.load(tmp_path)
        assert state.removed == (dead.name,) and not dead.exists()
        assert state.skipped_writers == ("live",) and live[0].exists()
        writer.add(keys[3], payload(keys[3]))
    assert_run_holds_exactly(tmp_path, keys)


def test_unlisted_shard_that_is_cut_short_is_a_usage_error(tmp_path):
    keys = make_keys(4)
    write(tmp_path, keys, 2)
    lines = manifest_lines(tmp_path)
    (tmp_path / "manifest.jsonl").write_bytes(lines[0] + b"\n")  # the second shard is unlisted
    path = tmp_path / "shards/magicseg-0-000001.tar"
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        second_sample = tar.getmembers()[3].offset
    # Cut between two samples: every member left is whole, only the end-of-archive is missing.
    path.write_bytes(data[:second_sample])
    with pytest.raises(UsageError, match="magicseg-0-000001.tar is not in manifest.jsonl .*cut short"):
        finished_keys(tmp_path)
    path.write_bytes(data)
    assert finished_keys(tmp_path) == set(keys)


# --- killed processes -------------------------------------------------------------------------


def start_writer(run_dir, keys, *, per_shard=4, writer_id="0", delay=0.0, crash_at=None):
    keys_file = Path(run_dir).parent / f"keys-{writer_id}.json"
    keys_file.write_text(json.dumps(keys))
    env = {k: v for k, v in os.environ.items() if k != "MAGICSEG_SHARDS_CRASH_AT"}
    if crash_at:
        env["MAGICSEG_SHARDS_CRASH_AT"] = crash_at
    args = [sys.executable, "-c", WRITER_CODE, str(run_dir), writer_id, str(per_shard), str(delay), str(keys_file)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_writing(proc):
    """Wait until the process has started and opened its writer, so a kill lands mid-run."""
    line = proc.stdout.readline()
    assert line == b"writing\n", finish(proc)


def finish(proc):
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("point", ["before_rename", "before_manifest", "mid_manifest"])
def test_kill_at_each_step_then_resume(tmp_path, point):
    run, keys = tmp_path / "run", make_keys(12)
    rc, err = finish(start_writer(run, keys, crash_at=f"{point}:2"))
    assert rc == -signal.SIGKILL, err
    data = (run / "manifest.jsonl").read_bytes()
    temps = [n for n in shard_files(run) if n.endswith(".tmp")]
    second_in_place = (run / "shards/magicseg-0-000001.tar").exists()
    assert (len(temps), second_in_place) == ((1, False) if point == "before_rename" else (0, True))
    assert data.endswith(b"\n") == (point != "mid_manifest")

    state = RunState.load(run)
    if point == "before_rename":
        assert state.removed == tuple(temps) and state.finished == set(keys[:4])
    else:
        assert state.recovered == ("magicseg-0-000001.tar",) and state.finished == set(keys[:8])
    assert not [n for n in shard_files(run) if n.endswith(".tmp")]

    rc, err = finish(start_writer(run, keys))
    assert rc == 0, err
    assert_run_holds_exactly(run, keys)


@pytest.mark.slow
def test_repeated_random_kills_then_resume(tmp_path):
    rng = random.Random(1234)
    run, keys = tmp_path / "run", make_keys(150)
    done, kills = 0, 0
    for _ in range(6):  # 6 rounds of at most 0.4 s cannot write 150 samples 0.02 s apart
        proc = start_writer(run, keys, per_shard=3, delay=0.02)
        wait_until_writing(proc)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        rc, _ = finish(proc)
        kills += rc == -signal.SIGKILL
        finished = finished_keys(run)
        assert finished <= set(keys) and len(finished) >= done  # never loses a finished sample
        done = len(finished)
    assert kills == 6 and 0 < done < len(keys)  # the kills did land in the middle of the run
    rc, err = finish(start_writer(run, keys, per_shard=3))
    assert rc == 0, err
    assert_run_holds_exactly(run, keys)


@pytest.mark.slow
def test_concurrent_writers_with_one_killed_and_resumed(tmp_path):
    run, keys = tmp_path / "run", make_keys(48)
    mine, theirs = keys[0::2], keys[1::2]
    a = start_writer(run, mine, per_shard=2, writer_id="a", delay=0.04)  # ~1 s for all
    b = start_writer(run, theirs, per_shard=3, writer_id="b", delay=0.03)
    wait_until_writing(a)
    wait_until_writing(b)
    time.sleep(0.3)
    a.kill()
    while b.poll() is None:  # loads while "b" writes must leave its work alone
        assert finished_keys(run, verify=False) <= set(keys)
        time.sleep(0.02)
    assert finish(a)[0] == -signal.SIGKILL
    assert finish(b)[0] == 0
    assert set(theirs) <= finished_keys(run) and not set(mine) <= finished_keys(run)
    rc, err = finish(start_writer(run, mine, per_shard=2, writer_id="a"))
    assert rc == 0, err
    for line in manifest_lines(run)[:-1]:
        json.loads(line)  # appends from two processes never interleave
    assert_run_holds_exactly(run, keys)
