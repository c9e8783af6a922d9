"""generate --balance: classes that lose pairs to the counterfactual check or the masks are topped up.

A test hook (MAGICSEG_TEST_DROP_CLASS=CLASS:FRACTION) drops that fraction of the pairs showing
CLASS, chosen by key, as if the counterfactual check had failed them.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from typer.testing import CliRunner

import magicseg_engine.pipeline as pipeline
from magicseg_engine.cli import app
from magicseg_engine.data.shards import finished_keys, iter_samples
from magicseg_engine.pipeline import DROPPED_FILE
from magicseg_engine.prompts import read_records

# Every test here builds ONNX exports or renders whole runs: the full suite, not the fast lane.
pytestmark = pytest.mark.slow

BASE = ["generate", "--classes", "voc", "--num-pairs", 40, "--no-sam", "--drop-failed-pairs",
        "--max-counterfactual-coverage", 1.0, "--samples-per-shard", 8, "--device", "cpu", "--balance"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def usable_from_shards(run) -> Counter:
    """Per class, the pairs with a non-empty mask of it that did not fail the check: counted here, apart."""
    usable = Counter()
    for sample in iter_samples(run):
        meta = json.loads(sample["json"])
        if meta["masks"]["counterfactual"]["passed"] is False:
            continue
        usable.update(c["name"] for c in meta["masks"]["classes"] if c["area"] > 0)
    return usable


def requested_targets(run, requested: int) -> Counter:
    return Counter(c for r in read_records(run / "prompts.jsonl")[:requested] for c in r.classes)


def test_a_class_dropped_often_is_topped_up_to_its_target(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGICSEG_TEST_DROP_CLASS", "cat:0.6")
    out = tmp_path / "run"
    result = invoke(*BASE, "--out", out)
    assert result.exit_code == 0, result.output
    balance = json.loads((out / "run.json").read_text())["balance"]
    assert balance["short"] == [] and balance["rounds"] and "every class has at least 90%" in result.stderr
    records = read_records(out / "prompts.jsonl")
    assert len(records) == 40 + sum(r["pairs"] for r in balance["rounds"]) <= 40 + 20  # within the budget
    targets, usable = requested_targets(out, 40), usable_from_shards(out)
    for name, target in targets.items():
        assert usable[name] >= math.ceil(0.9 * target), name
        assert balance["classes"][name]["usable"] == usable[name] and balance["classes"][name]["target"] == target
    cat = balance["classes"]["cat"]
    assert cat["attempts"] > cat["target"] and cat["dropped"] > 0  # more tries for the class that fails
    assert cat["drop_reasons"] == {"dropped by MAGICSEG_TEST_DROP_CLASS (a test hook)": cat["dropped"]}
    # Every record was rendered once: written or dropped, never both, never twice.
    dropped = [json.loads(line)["key"] for line in (out / DROPPED_FILE).read_text().splitlines()]
    assert len(set(dropped)) == len(dropped) and not set(dropped) & finished_keys(out)
    assert len(dropped) + len(finished_keys(out)) == len(records)


def test_a_class_that_cannot_reach_its_target_is_named_with_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGICSEG_TEST_DROP_CLASS", "cat:1.0")
    out = tmp_path / "run"
    result = invoke(*BASE, "--out", out, "--balance-budget", 0.25, "--balance-rounds", 2)
    assert result.exit_code == 0, result.output
    balance = json.loads((out / "run.json").read_text())["balance"]
    # The budget runs out before cat, never usable, gets anywhere; it is named (others may be short too).
    assert "cat" in balance["short"] and len(balance["rounds"]) <= 2
    assert len(read_records(out / "prompts.jsonl")) <= 40 + 10
    assert balance["classes"]["cat"]["usable"] == 0
    assert balance["classes"]["cat"]["why"].startswith(f"{balance['classes']['cat']['attempts']} dropped: dropped by")
    assert "classes still short" in result.stderr and "cat" in result.stderr


def test_a_balanced_run_killed_in_a_top_up_round_resumes_to_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGICSEG_TEST_DROP_CLASS", "cat:0.6")
    whole = tmp_path / "whole"
    assert invoke(*BASE, "--out", whole).exit_code == 0
    # The second render call (the first top-up round) dies after the round's prompts are saved.
    real, calls = pipeline.generate_pairs, []

    def dies_in_round_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate_pairs", dies_in_round_one)
    out = tmp_path / "run"
    assert invoke(*BASE, "--out", out).exit_code != 0
    assert len(read_records(out / "prompts.jsonl")) > 40
    monkeypatch.setattr(pipeline, "generate_pairs", real)
    result = invoke(*BASE, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(finished_keys(out)) == sorted(finished_keys(whole))
    assert [r.id for r in read_records(out / "prompts.jsonl")] == [r.id for r in read_records(whole / "prompts.jsonl")]
    # Other balance settings, or none, are refused on resume.
    for extra, message in ((["--balance-tolerance", 0.2], "--balance settings differ"), ([], "with --balance")):
        args = [a for a in BASE if a != "--balance"] if not extra else BASE
        result = invoke(*args, *extra, "--out", out, "--resume")
        assert result.exit_code == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("point", ["start_marked", "start_done"])
def test_the_balance_record_is_part_of_the_start_so_a_kill_after_it_resumes_with_balance(tmp_path, monkeypatch,
                                                                                          point):
    """The record is written with the start marker: no kill leaves a started run that forgot --balance."""
    class Killed(Exception):
        pass

    def crash(name):
        if name == point:
            raise Killed(name)

    monkeypatch.setattr(pipeline, "_crash_point", crash)
    small = [a if a != 40 else 8 for a in BASE]
    out = tmp_path / "run"
    assert isinstance(invoke(*small, "--out", out).exception, Killed)
    saved = json.loads((out / "run.json").read_text())
    assert ("starting" in saved) == (point == "start_marked")
    assert saved["balance"]["requested_pairs"] == 8 and saved["balance"]["rounds"] == []
    monkeypatch.undo()
    refused = invoke(*[a for a in small if a != "--balance"], "--out", out, "--resume")
    assert refused.exit_code == 2 and "with --balance" in refused.stderr, refused.stderr
    result = invoke(*small, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert len(finished_keys(out)) + len((out / DROPPED_FILE).read_text().splitlines() if (out / DROPPED_FILE).exists()
                                         else []) == len(read_records(out / "prompts.jsonl"))


@pytest.mark.parametrize("args, message", [
    (["--prompts", "p.jsonl"], "a --prompts file has no more"),
    (["--mask-source", "none"], "it needs masks"),
    (["--balance-tolerance", 1.0], "--balance-tolerance 1.0"),
    (["--balance-budget", 0], "--balance-budget 0"),
    (["--balance-rounds", 0], "--balance-rounds 0"),
])
def test_bad_balance_flags_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "p.jsonl").write_text("cat: a cat\n")
    args = [str(tmp_path / a) if a == "p.jsonl" else a for a in args]
    base = BASE if "--prompts" not in args else [a for a in BASE if a not in ("--classes", "voc", "--num-pairs", 40)]
    result = invoke(*base, *args, "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_balance_counts_match_the_report(tmp_path, monkeypatch):
    from magicseg_engine.report.gather import gather_run

    monkeypatch.setenv("MAGICSEG_TEST_DROP_CLASS", "cat:0.6")
    out = tmp_path / "run"
    assert invoke(*BASE, "--out", out, "--balance-rounds", 1).exit_code == 0
    balance = json.loads((out / "run.json").read_text())["balance"]
    digest = gather_run(out, samples=1)
    for name, c in balance["classes"].items():
        assert c["usable"] == digest.classes[name].usable if name in digest.classes else c["usable"] == 0
    result = invoke("report", "--data", out)
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert 'id="balance"' in page and "dropped by MAGICSEG_TEST_DROP_CLASS" in page
