"""benchmarks/soak.py: generate SIGKILLed at random instants, resumed until its run completes, checked."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_for_test", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check(result, kills):
    assert result["ok"], result["problems"]
    assert result["kills"] == kills and result["kills_survived"] == kills
    assert result["samples_lost"] == 0 and result["samples_duplicated"] == 0 and result["samples_foreign"] == 0
    assert result["runs_completed"] >= 1 and all(not run["problems"] for run in result["runs"])
    assert sum(result["kills_by_phase"].values()) == kills


def run_soak(tmp_path, *args):
    out = tmp_path / "soak.json"
    code = load_soak().main([*map(str, args), "--out", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result["problems"]
    return result


@pytest.mark.slow
def test_generate_survives_50_kills_anywhere(tmp_path):
    """The CI-sized soak: 50 SIGKILLs of forked attempts (2-4 minutes on 2 CPU cores)."""
    out = tmp_path / "soak.json"
    code = load_soak().main(["--kills", "50", "--pairs", "6", "--seed", "0", "--out", str(tmp_path / "work"),
                             "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0
    check(result, 50)
    # The kills reached the run folder, not only the imports: shards in progress, and more phases.
    phases = result["kills_by_phase"]
    assert phases.get("shard_open", 0) + phases.get("between_shards", 0) > 0
    assert len(phases) >= 3, phases


@pytest.mark.slow
def test_soak_runs_the_console_script_as_a_user_would(tmp_path):
    """--spawn exec: each attempt is the installed `magicseg-engine`, imports and all."""
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--kills", "3", "--pairs", "4", "--seed", "2", "--spawn", "exec",
                           "--out", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith("ok: generate 3 kills")
    check(json.loads(out.read_text()), 3)


@pytest.mark.slow
def test_masks_survives_20_kills_anywhere(tmp_path):
    """masks re-annotating a finished tiny run, killed 20 times and resumed; each completed run
    holds every source pair once, annotated by its own round, with the source's image bytes."""
    result = run_soak(tmp_path, "--command", "masks", "--kills", 20, "--pairs", 6, "--seed", 0)
    check(result, 20)
    assert result["runs_completed"] >= 2  # an --overwrite of a finished re-annotation was killed too
    phases = result["kills_by_phase"]
    assert len(set(phases) - {"loading", "first_batch"}) >= 2, phases  # kills reached the run folder


@pytest.mark.slow
def test_export_survives_kills_in_every_format(tmp_path):
    """export as coco, mmseg and hf, killed 12 times in all and run again until complete; each
    export is byte for byte an uninterrupted one, with nothing left over."""
    result = run_soak(tmp_path, "--command", "export", "--kills", 12, "--pairs", 6, "--seed", 0)
    check(result, 12)
    assert {run["format"] for run in result["runs"]} == {"coco", "mmseg", "hf"}
    assert set(result["kills_by_phase"]) - {"loading"}, result["kills_by_phase"]


@pytest.mark.slow
def test_pretrain_survives_10_kills_with_bitwise_equal_weights_and_loader(tmp_path):
    """pretrain killed 10 times and resumed: every checkpoint kept equals an uninterrupted run's
    bitwise (weights, optimiser, schedule, loader position), with and without accumulation."""
    result = run_soak(tmp_path, "--command", "pretrain", "--kills", 10, "--steps", 8, "--seed", 0)
    check(result, 10)
    assert {r["variant"]["grad-accum"] for r in result["runs"]} == {1, 2}
    assert all(r["weights_equal"] and r["loader_equal"] for r in result["runs"])
    assert set(result["kills_by_phase"]) - {"loading"}, result["kills_by_phase"]


@pytest.mark.slow
def test_generate_on_ray_survives_worker_and_driver_kills(tmp_path):
    """generate --ray with two CPU workers: Ray workers killed with a shard open and the driver
    killed, then resumed; the run holds each pair exactly once."""
    pytest.importorskip("ray", reason="needs Ray: pip install 'magicseg-engine[ray]'")
    result = run_soak(tmp_path, "--command", "ray", "--kills", 3, "--pairs", 8, "--seed", 3)
    check(result, 3)
    assert result["worker_kills"] >= 1 and result["kills"] - result["worker_kills"] >= 1


def test_a_damaged_run_is_reported(tmp_path, tiny_sampler):
    """The checker itself: a duplicated sample, a missing shard and a leftover file are all caught."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import ExecutionOptions, generate_pairs, start_run
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    soak = load_soak()
    config = load_preset("tiny", {"seed": 3, "prompts": {"seed": 3}})
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=3).records
    run = tmp_path / "run"
    start_run(run, config, records, load_vocabulary("voc").classes)
    # The run's seeds draw its prompts, not its weights: its sampler is the shared tiny one
    # (conftest.py).
    tiny = load_preset("tiny")
    assert (config.diffusion, config.weights_seed, config.masks) == (tiny.diffusion, tiny.weights_seed, tiny.masks)
    generate_pairs(run, config, records, tiny_sampler, ExecutionOptions(batch_size=3, samples_per_shard=2))
    assert soak.check_run(run, 3, 3)["problems"] == []
    manifest = (run / "manifest.jsonl").read_text().splitlines()
    first = json.loads(manifest[0])
    (run / "manifest.jsonl").write_text("\n".join(manifest + [manifest[0].replace(first["shard"], "magicseg-0-000009.tar")]) + "\n")
    (run / "shards" / "magicseg-0-000009.tar").write_bytes((run / "shards" / first["shard"]).read_bytes())
    (run / ".run.json.abc.tmp").write_text("{}")
    checked = soak.check_run(run, 3, 3)
    assert checked["duplicated"] == len(first["keys"]) and checked["lost"] == 0
    assert any("left over" in p for p in checked["problems"])
    (run / "shards" / first["shard"]).unlink()
    assert any("not the manifest's" in p for p in soak.check_run(run, 3, 3)["problems"])
