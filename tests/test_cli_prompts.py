import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.prompts import read_records
from magicseg_engine.prompts.counterfactual import missing_classes

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_templates_end_to_end(tmp_path):
    out = tmp_path / "prompts.jsonl"
    result = run("prompts", "--classes", "voc", "--num", 200, "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert len(records) == 200
    assert len({r.id for r in records}) == 200
    counts = Counter(c for r in records for c in r.classes)
    assert len(counts) == 20 and max(counts.values()) - min(counts.values()) <= 3
    for r in records:
        assert 1 <= len(r.classes) <= 2
        assert missing_classes(r.prompt, r.classes) == []
        assert missing_classes(r.negative_prompt, r.classes) == list(r.classes)
        assert "nothing" in r.negative_prompt.lower()
    saved = json.loads((tmp_path / "prompts.config.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["source"] == "templates"
    assert saved["summary"]["written"] == 200 and saved["vocabulary"] == "voc"


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run("prompts", "--classes", "coco-object", "--num", 50, "--seed", seed, "--out", tmp_path / f"{name}.jsonl").exit_code == 0
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c


def test_flags_override_defaults(tmp_path):
    out = tmp_path / "p.jsonl"
    result = run("prompts", "--classes", "voc", "--num", 40, "--max-classes", 1, "--negative-token", "empty space", "--out", out)
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert all(len(r.classes) == 1 for r in records)
    assert all("empty space" in r.negative_prompt for r in records)
    assert json.loads((tmp_path / "p.config.json").read_text())["config"]["max_classes_per_sample"] == 1


def test_file_source_with_skip_invalid_reports_the_count(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("dog: a dog on a beach\nbroken line\ncat: a cat\n", encoding="utf-8")
    out = tmp_path / "p.jsonl"
    result = run("prompts", "--source", "file", "--prompt-file", src, "--out", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert len(read_records(out)) == 2
    assert "1 invalid lines skipped" in result.stderr
    assert json.loads((tmp_path / "p.config.json").read_text())["summary"]["skipped_lines"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "nope", "--num", 5], "unknown vocabulary 'nope'"),
        (["--classes", "voc", "--num", 0], "--num must be a positive number"),
        (["--classes", "voc", "--num", -3], "--num must be a positive number"),
        (["--classes", "voc"], "--source templates needs --num"),
        (["--num", 5], "--source templates needs --classes"),
        (["--classes", "voc", "--num", 5, "--max-classes", 0], "invalid option: max_classes_per_sample"),
        (["--classes", "voc", "--num", 5, "--negative-token", "a dog"], "negative token 'a dog' names the class 'dog'"),
        (["--source", "file", "--num", 5], "--source file needs --prompt-file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, args, message):
    out = tmp_path / "p.jsonl"
    result = run("prompts", *args, "--out", out)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_broken_prompt_file_is_exit_2_naming_the_line(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("dog: a dog\n\nbad line without colon\n", encoding="utf-8")
    result = run("prompts", "--source", "file", "--prompt-file", src, "--out", tmp_path / "p.jsonl")
    assert result.exit_code == 2
    assert f"{src}:3: expected 'cls1,cls2: description'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_unwritable_output_path_is_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("prompts", "--classes", "voc", "--num", 3, "--out", blocker / "p.jsonl")
    assert result.exit_code == 2
    assert "cannot create output directory" in result.stderr
    result = run("prompts", "--classes", "voc", "--num", 3, "--out", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_empty_class_file_is_exit_2(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# nothing here\n")
    result = run("prompts", "--classes", classes, "--num", 3, "--out", tmp_path / "p.jsonl")
    assert result.exit_code == 2 and "lists no classes" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]


@pytest.mark.slow
def test_installed_entry_point_runs(tmp_path):
    exe = Path(sys.executable).with_name("magicseg-engine")
    out = tmp_path / "p.jsonl"
    proc = subprocess.run([str(exe), "prompts", "--classes", "context", "--num", "10", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 10 prompts" in proc.stderr
    assert len(out.read_text().splitlines()) == 10
