import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.doctor import as_dict, check_clip_vocabulary


@pytest.mark.slow
def test_doctor_json_tells_the_truth_about_this_machine():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["torch"]["ok"] and torch.__version__ in report["torch"]["detail"]
    assert report["cuda"]["ok"] == torch.cuda.is_available()
    assert report["_C extension"]["ok"]
    assert report["clip vocabulary"]["ok"]
    # The interpreter probe really ran a kernel; on this machine it must work.
    assert report["triton interpreter"]["ok"], report["triton interpreter"]["detail"]
    if not torch.cuda.is_available():
        assert not report["triton compiled"]["ok"]
        assert not report["tensorrt"]["ok"]
        assert "tensorrt" not in report["backends"]["detail"]
    try:
        import onnxruntime  # noqa: F401
        has_ort = True
    except ImportError:
        has_ort = False
    assert report["onnxruntime"]["ok"] == has_ort
    assert ("onnxruntime" in report["backends"]["detail"]) == has_ort


@pytest.mark.slow
def test_doctor_table_lists_every_check():
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("torch", "triton interpreter", "onnxruntime", "tensorrt", "dali", "_C extension", "clip vocabulary"):
        assert name in result.stdout


def test_a_module_that_fails_to_import_is_reported_not_raised(monkeypatch):
    assert as_dict([check_clip_vocabulary()])["clip vocabulary"]["ok"]
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)  # makes its import fail
    report = as_dict([check_clip_vocabulary()])["clip vocabulary"]
    assert report["ok"] is False and "open_clip not available" in report["detail"]
