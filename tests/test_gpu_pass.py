"""benchmarks/gpu_pass.py, the staged GPU pass, rehearsed on the CPU (--dry-run: the tiny preset,
pip commands recorded, two fast test files): every stage's JSON with the fields the results page
needs, and a stage past its budget recorded as timed out while the later stages still write."""

import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "gpu_pass.py"
FILES = {"install.json", "correctness.json", "headline.json", "extras.json", "pass.json", "log.txt"}


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pass(out: Path, *options: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # Started outside the checkout: its root on sys.path would shadow the `kernels` package.
    return subprocess.run([sys.executable, str(DRIVER), "--dry-run", "--out", str(out), *options],
                          cwd=out.parent, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_pass(tmp_path_factory):
    out = tmp_path_factory.mktemp("pass") / "out"
    proc = run_pass(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_dry_run_writes_every_stage_file_and_nothing_else(dry_pass):
    out, proc = dry_pass
    names = {p.name for p in out.iterdir()}
    # At most 8 files come back from a GPU machine, none in subfolders here.
    assert names == FILES, names
    record = read(out, "pass.json")
    assert record["dry_run"] is True
    assert [s["stage"] for s in record["stages"]] == ["install", "correctness", "headline", "extras"]
    assert all(s["status"] == "ok" for s in record["stages"]), record["stages"]
    assert record["elapsed_s"] < record["total_budget_s"]
    for s in record["stages"]:
        assert s["elapsed_s"] <= s["budget_s"] + 1
        assert read(out, f"{s['stage']}.json")["stage"]["status"] == "ok"
    assert "== summary" in proc.stdout and "pairs/s" in proc.stdout
    assert "== headline" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_install_records_the_plan_and_the_extension(dry_pass):
    out, _ = dry_pass
    install = read(out, "install.json")
    wheels, project = install["planned"]
    for flag in ("--no-index", "--no-deps", "--target"):
        assert flag in wheels
    assert "--no-build-isolation" in project and "-e" in project.split()
    assert install["steps"][0]["skipped"].startswith("dry run")
    check = install["check"]
    assert check["extension"]["ok"] is True and "build_info" in check["extension"]
    assert check["imports"]["diffusers"] == "ok" and check["imports"]["pydantic"] == "ok"
    assert check["torch"] and "cuda_available" in check


@pytest.mark.slow
def test_correctness_runs_tests_and_plans_the_gpu_ones_kernels_first(dry_pass):
    out, _ = dry_pass
    corr = read(out, "correctness.json")
    assert [g["group"] for g in corr["groups"]] == ["kernels", "other"]
    assert all(g["status"] == "ran" for g in corr["groups"])
    assert corr["totals"]["passed"] > 0 and corr["totals"]["failed"] == 0 and corr["totals"]["errors"] == 0
    planned = corr["planned_gpu_commands"]
    assert "-m gpu" in planned["kernels"] and "test_kernel_probe.py" in planned["kernels"]
    assert "test_mask_extract.py" in planned["kernels"] and "test_backends.py" in planned["other"]
    assert "test_backends.py" not in planned["kernels"]


@pytest.mark.slow
def test_headline_holds_the_numbers_of_the_results_page(dry_pass):
    out, _ = dry_pass
    head = read(out, "headline.json")
    assert head["ok"] is True and head["benchmark"] == "tune" and head["preset"] == "tiny"
    s = head["pass_summary"]
    assert [r["batch_size"] for r in s["by_batch"]] == [1, 2]
    for row in s["by_batch"]:
        assert row["engine_pairs_per_s"] > 0 and row["reference_pairs_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["engine_pairs_per_s"] / row["reference_pairs_per_s"])
    assert s["reference"]["pairs_per_s"] == head["reference"]["pairs_per_s"]
    assert s["best_ratio"] == pytest.approx(head["speedup"])
    assert s["unet_tflops_per_s"] > 0 and s["measured_peak_tflops"] > 0
    assert s["unet_fraction_of_measured_peak"] == pytest.approx(s["unet_tflops_per_s"] / s["measured_peak_tflops"])
    assert head["matmul_peak"]["tflops"] == s["measured_peak_tflops"] and head["matmul_peak"]["median_s"] > 0
    assert "dense_peak_tflops" in s  # the data-sheet peak beside the measured one (none for a CPU)
    assert s["results_name"].startswith("tune-tiny-cpu-") and s["results_name"].endswith(".json")
    # The parts were saved as they ended, for a stage stopped half way.
    assert head["saved_steps"] == ["matmul peak measured", "reference measured", "variants measured"]
    # The results page reads it as any `bench tune` result.
    summarize = load_module("summarize_for_test", ROOT / "benchmarks" / "summarize.py")
    rows = summarize.headline("tune-tiny-cpu", head)
    assert rows and "pairs/s" in rows[0][2]


@pytest.mark.slow
def test_extras_are_measured_or_skipped_with_a_reason(dry_pass):
    out, _ = dry_pass
    extras = read(out, "extras.json")
    items = extras["items"]
    assert list(items) == ["masks", "fast", "losses", "loader", "compile"]
    for name in ("fast", "losses", "loader"):
        assert items[name]["status"] == "ok", items[name]
        assert items[name]["result"]["headline"]["bench"] == name
    assert items["fast"]["result"]["levels"][0]["level"] == 1
    for name in ("masks", "compile"):
        assert items[name]["status"] == "skipped" and items[name]["reason"].startswith("dry run")
    assert [row["bench"] for row in extras["summary"]] == ["fast", "losses", "loader"]


@pytest.mark.slow
def test_a_stage_past_its_budget_is_timed_out_and_the_next_still_writes(tmp_path):
    out = tmp_path / "out"
    proc = run_pass(out, "--stages", "install,headline,extras", "--extras", "losses", "--budget", "headline=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    head = read(out, "headline.json")
    assert head["stage"]["status"] == "timed_out" and head["stage"]["budget_s"] == 2
    assert head["stage"]["elapsed_s"] < 2 + 15  # stopped, not waited for
    assert "ok" not in head or head["ok"] is False
    extras = read(out, "extras.json")
    assert extras["stage"]["status"] == "ok" and extras["items"]["losses"]["status"] == "ok"
    record = read(out, "pass.json")
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [
        ("install", "ok"), ("headline", "timed_out"), ("extras", "ok")]
    assert not (out / "correctness.json").exists()  # not asked for
    assert not list(out.glob(".tmp-*"))


def test_budgets_hold_back_the_headline_and_skip_what_cannot_start(tmp_path):
    gp = load_module("gpu_pass_for_test", DRIVER)
    args = gp.argparse.Namespace(dry_run=False, out=str(tmp_path / "out"), budget={}, total_budget=420.0,
                                 stages=list(gp.STAGES), extras=list(gp.EXTRAS))
    p = gp.Pass(args)
    p.t0 -= 60  # the install took a minute
    # The headline's 240 s stay held back: correctness gets the 120 s before them.
    assert p.stage_budget("correctness") == pytest.approx(420 - 60 - 240, abs=1)
    assert p.stage_budget("headline") == pytest.approx(240)
    p.t0 -= 100  # 160 s gone: 20 s for the tests is under what they need to start
    entry = p.run_stage("correctness", p.stage_budget("correctness"))
    assert entry["status"] == "skipped" and "headline" in entry["reason"]
    assert read(p.out, "correctness.json")["stage"]["status"] == "skipped"
    p.cleanup()
    assert not p.work.exists()


def test_reports_are_read_from_junit_or_from_the_verbose_lines(tmp_path):
    gp = load_module("gpu_pass_for_test", DRIVER)
    suite = ET.Element("testsuite")
    ET.SubElement(suite, "testcase", classname="tests.test_a", name="test_ok")
    failed = ET.SubElement(suite, "testcase", classname="tests.test_a", name="test_bad[bf16]")
    ET.SubElement(failed, "failure", message="AssertionError: Tensor-likes are not close!\nMismatched elements")
    skipped = ET.SubElement(suite, "testcase", classname="tests.test_b", name="test_trt")
    ET.SubElement(skipped, "skipped", message="needs TensorRT")
    path = tmp_path / "junit.xml"
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)
    got = gp.parse_junit(path)
    assert (got["passed"], got["failed"], got["errors"], got["skipped"]) == (1, 1, 0, 1)
    assert got["failures"] == [{"test": "tests.test_a::test_bad[bf16]", "kind": "failure",
                                "reason": "AssertionError: Tensor-likes are not close!"}]
    lines = ["tests/test_a.py::test_ok PASSED                 [ 50%]",
             "[gw1] [ 75%] FAILED tests/test_a.py::test_bad[bf16] ",
             "tests/test_b.py::test_trt SKIPPED (needs TensorRT) [100%]", "collected 3 items"]
    got = gp.parse_verbose(lines)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["failures"][0]["test"] == "tests/test_a.py::test_bad[bf16]"
