"""The `report` command: statistics, choice of pairs, bad and in-progress runs, the page."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import ShardWriter, iter_samples, shard_paths
from magicseg_engine.report import build_report
from magicseg_engine.report.gather import AREA_BINS, QUALITY_BINS, gather_run
from magicseg_engine.report.sampling import ClassBalancedPicker
from magicseg_engine.train.synthetic import write_synthetic_run

runner = CliRunner()

SIDE = 16


def _jpeg(value: int) -> bytes:
    buf = BytesIO()
    Image.fromarray(np.full((SIDE, SIDE, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _mask(areas: list[int]) -> bytes:
    """Label i + 1 on the next areas[i] pixels in raster order, so each mask has exactly that area."""
    flat = np.zeros(SIDE * SIDE, np.uint8)
    start = 0
    for label, area in enumerate(areas, 1):
        flat[start:start + area] = label
        start += area
    buf = BytesIO()
    Image.fromarray(flat.reshape(SIDE, SIDE), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_run(run_dir: Path, samples: list[dict], *, samples_per_shard: int = 2, run_meta: dict | None = None,
              dropped: int = 0, bad_positive: set[int] = frozenset()) -> list[str]:
    """Write `samples` ({"classes", "areas", "found", "quality", "passed", "prompt"}) as a run in
    generate's format; return their keys in order. `bad_positive`: indices whose pos.jpg is not an image."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    with ShardWriter(run_dir, samples_per_shard, "0") as writer:
        for index, sample in enumerate(samples):
            key = f"sample{index:04d}"
            classes = sample["classes"]
            areas = sample.get("areas", [10] * len(classes))
            found = sample.get("found", [True] * len(classes))
            meta = {
                "key": key, "classes": classes, "prompt": sample.get("prompt", f"a photo of {' and '.join(classes)}"),
                "negative_prompt": "a photo of nothing", "seed": index, "size": [SIDE, SIDE],
                "mask_source": "attention+sam",
                "masks": {
                    "classes": [{"name": n, "label": i, "area": a, "found": f, "empty": a == 0}
                                for i, (n, a, f) in enumerate(zip(classes, areas, found), 1)],
                    "counterfactual": {"quality": sample["quality"], "max_coverage": round(1 - sample["quality"], 4),
                                       "threshold": 0.5, "passed": sample["passed"],
                                       "reason": None if sample["passed"] else "the negative still shows a class"},
                },
            }
            positive = b"not a jpeg at all" if index in bad_positive else _jpeg(200)
            writer.add(key, {"pos.jpg": positive, "neg.jpg": _jpeg(60), "mask.png": _mask(areas),
                             "json": json.dumps(meta).encode()})
            keys.append(key)
    if run_meta is not None:
        (run_dir / "run.json").write_text(json.dumps(run_meta), encoding="utf-8")
    if dropped:
        lines = "".join(json.dumps({"key": f"gone{i}", "reason": "the negative still shows a class"}) + "\n"
                        for i in range(dropped))
        (run_dir / "dropped.jsonl").write_text(lines, encoding="utf-8")
    return keys


def run_cli(*args):
    return runner.invoke(app, ["report", *[str(a) for a in args]])


def pairs_in(html: str) -> int:
    return len(re.findall(r'<figure class="pair[ "]', html))


def bin_of(value: float, edges: np.ndarray) -> int:
    return min(int(value / (edges[1] - edges[0]) + 1e-9), len(edges) - 2)


KNOWN = [
    {"classes": ["dog"], "areas": [64], "quality": 0.9, "passed": True},
    {"classes": ["dog", "cat"], "areas": [32, 128], "quality": 0.2, "passed": False},
    {"classes": ["cat"], "areas": [0], "found": [False], "quality": 0.7, "passed": True},
    {"classes": ["bird"], "areas": [256], "quality": 0.55, "passed": True},
]


def test_statistics_of_a_run_with_known_content(tmp_path):
    sessions = [{"generated": 3, "seconds": 2.0, "pairs_per_second": 1.5, "device": "cpu"},
                {"generated": 1, "seconds": 2.0, "pairs_per_second": 0.5, "device": "cpu"}]
    write_run(tmp_path / "run", KNOWN, run_meta={"config": {"preset": "tiny"}, "sessions": sessions}, dropped=2)
    with open(tmp_path / "run" / "dropped.jsonl", "a") as f:
        f.write('{"key": "torn')  # a line still being written is not counted
    digest = gather_run(tmp_path / "run", samples=64)
    assert digest.samples == 4 and digest.shards_read == 2 and not digest.skipped_shards
    assert {n: s.samples for n, s in digest.classes.items()} == {"dog": 2, "cat": 2, "bird": 1}
    assert digest.class_names()[-1] == "bird"
    assert digest.classes_per_image == Counter({1: 3, 2: 1})
    assert (digest.checked, digest.flagged, digest.dropped) == (4, 1, 2)
    assert digest.quality_threshold == pytest.approx(0.5)
    expected_quality = np.zeros(len(QUALITY_BINS) - 1, np.int64)
    for s in KNOWN:
        expected_quality[bin_of(s["quality"], QUALITY_BINS)] += 1
    assert digest.quality_hist.tolist() == expected_quality.tolist()
    dog, cat, bird = digest.classes["dog"], digest.classes["cat"], digest.classes["bird"]
    assert (dog.masks, dog.no_mask, dog.flagged) == (2, 0, 1)
    assert dog.mean_area == pytest.approx((64 + 32) / 2 / 256)
    assert (cat.masks, cat.no_mask, cat.flagged, cat.mean_area) == (1, 1, 1, pytest.approx(0.5))
    assert bird.area_hist[-1] == 1 and bird.area_hist.sum() == 1  # a mask covering the whole image
    assert dog.area_hist[bin_of(0.25, AREA_BINS)] == 1 and dog.area_hist[bin_of(0.125, AREA_BINS)] == 1
    # All four pairs fit, so all are chosen, each once.
    assert sorted(r.key for r in digest.chosen) == [f"sample{i:04d}" for i in range(4)]

    summary = build_report(tmp_path / "run", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert pairs_in(html) == summary.shown == 4
    assert html.count('class="check fail"') == 1 and html.count('class="check pass"') == 3
    assert "1 / 4" in html  # failed the counterfactual check, out of the checked pairs
    assert "<b>1.00</b><span>pairs/s (4 pairs in 4 s)</span>" in html  # throughput over both sessions
    assert 'id="sessions"' in html and 'id="skipped"' not in html


def test_statistics_of_a_synthetic_run_match_its_masks(tmp_path):
    write_synthetic_run(tmp_path, 30, size=32, seed=5, samples_per_shard=8)
    digest = gather_run(tmp_path, samples=8)
    assert digest.samples == 30 and digest.shards_read == 4
    # The same numbers, counted independently from the label maps themselves.
    counts, areas, per_image = Counter(), {}, Counter()
    for sample in iter_samples(tmp_path):
        classes = json.loads(sample["json"])["classes"]
        labels = np.asarray(Image.open(BytesIO(sample["mask.png"])))
        per_image[len(classes)] += 1
        for index, name in enumerate(classes, 1):
            counts[name] += 1
            areas.setdefault(name, []).append(float((labels == index).mean()))
    assert {n: s.samples for n, s in digest.classes.items()} == dict(counts)
    assert digest.classes_per_image == per_image
    for name, values in areas.items():
        stats = digest.classes[name]
        assert stats.masks == len(values) and stats.area_hist.sum() == len(values)
        assert stats.mean_area == pytest.approx(np.mean(values))
    assert digest.checked == 30 and digest.flagged == 0 and not digest.quality_hist.any()
    # Fewer pairs than classes times two: every class still gets one.
    assert set(digest.classes) <= {c for r in digest.chosen for c in r.classes}
    assert len(digest.chosen) == 8 and len({r.key for r in digest.chosen}) == 8


def test_picker_deals_rare_classes_first_and_never_repeats_a_pair():
    picker = ClassBalancedPicker(6, seed=1)
    for i in range(1000):
        picker.offer(("common", i), ["common"])
        if i % 100 == 0:
            picker.offer(("mid", i), ["mid"])
        if i in (3, 500, 900):
            picker.offer(("rare", i), ["rare"])
    chosen = picker.chosen()
    assert Counter(c for c, _ in chosen) == {"rare": 2, "mid": 2, "common": 2}
    assert chosen[0][0] == "rare"

    both = ClassBalancedPicker(10)
    for i in range(5):
        both.offer(i, ["a", "b"])
    assert sorted(both.chosen()) == [0, 1, 2, 3, 4]


def test_picker_samples_the_whole_run_not_its_start():
    picker = ClassBalancedPicker(20, seed=0)
    for i in range(10_000):
        picker.offer(i, ["only"])
    chosen = picker.chosen()
    assert len(set(chosen)) == 20
    assert max(chosen) > 5_000  # a reservoir, not the first 20
    again = ClassBalancedPicker(20, seed=0)
    for i in range(10_000):
        again.offer(i, ["only"])
    assert again.chosen() == chosen


@pytest.mark.slow
def test_cli_writes_one_self_contained_page(tmp_path):
    write_synthetic_run(tmp_path / "run", 20, size=32, samples_per_shard=8)
    out = tmp_path / "pages" / "report.html"
    result = run_cli("--data", tmp_path / "run", "--out", out, "--samples", 6)
    assert result.exit_code == 0, result.output
    assert f"Report: {out}" in result.stderr
    html = out.read_text()
    assert pairs_in(html) == 6
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 6 * 3 + 3  # three pictures per pair; charts without counterfactual quality
    assert all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"https?://|<link\b|<script\s+src", html)
    assert 'id="class-filter"' in html and "<script>" in html
    assert not list((tmp_path / "pages").glob(".*.tmp"))
    # Without --out the page goes into the run directory.
    assert run_cli("--data", tmp_path / "run", "--samples", 2).exit_code == 0
    assert pairs_in((tmp_path / "run" / "report.html").read_text()) == 2


def _garble_third_header(path: Path) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[2].offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"X" * 512)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_garble_third_header, _truncate], ids=["garbled-header", "truncated"])
def test_a_corrupt_shard_is_skipped_counted_and_shown(tmp_path, damage):
    write_synthetic_run(tmp_path / "run", 24, size=32, samples_per_shard=8)
    shards = shard_paths(tmp_path / "run")
    damage(shards[1])
    result = run_cli("--data", tmp_path / "run", "--out", tmp_path / "report.html", "--samples", 64)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and shards[1].name in warnings[0] and "(8 samples)" in warnings[0]
    assert "skipped unreadable shards: 1 (8 samples)" in result.stderr
    html = (tmp_path / "report.html").read_text()
    assert pairs_in(html) == 16
    notice = re.search(r'<div class="notice" id="skipped">(.*?)</div>', html, re.DOTALL).group(1)
    assert "1 shard skipped (8 samples not counted)" in notice and shards[1].name in notice
    assert "<b>16</b><span>samples read</span>" in html


@pytest.mark.parametrize("layout", ["empty", "manifest-only", "temporary-shard-only"])
def test_a_directory_without_finished_shards_is_exit_2_and_writes_nothing(tmp_path, layout):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if layout != "empty":
        (run_dir / "manifest.jsonl").write_bytes(b"")
        (run_dir / "shards").mkdir()
    if layout == "temporary-shard-only":
        (run_dir / "shards" / ".magicseg-0-000000.tar.k2j4h5.tmp").write_bytes(b"\0" * 1024)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    out = tmp_path / "out" / "report.html"
    result = run_cli("--data", run_dir, "--out", out)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no finished shards" in lines[0] and str(run_dir) in lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_run_of_which_nothing_reads_is_exit_2(tmp_path):
    write_synthetic_run(tmp_path / "run", 8, size=32, samples_per_shard=8)
    _truncate(shard_paths(tmp_path / "run")[0])
    result = run_cli("--data", tmp_path / "run", "--out", tmp_path / "report.html")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nothing in" in result.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("args,message", [(["--samples", 0], "--samples 0"), (["--samples", 5000], "--samples 5000")])
def test_bad_flags_are_exit_2(tmp_path, args, message):
    write_synthetic_run(tmp_path / "run", 4, size=32)
    result = run_cli("--data", tmp_path / "run", "--out", tmp_path / "r.html", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "r.html").exists()
    result = run_cli("--data", tmp_path / "run", "--out", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_a_run_in_progress_is_read_up_to_its_finished_shards_and_left_untouched(tmp_path):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, 16, size=32, samples_per_shard=8)
    first = shard_paths(run_dir)[0]
    # A writer half way through its next shard, another whose shard is renamed but not yet
    # listed, and a manifest line being appended.
    (run_dir / "shards" / ".synthetic-0-000002.tar.a8f3k2.tmp").write_bytes(first.read_bytes()[:5000])
    (run_dir / "shards" / "synthetic-1-000000.tar").write_bytes(first.read_bytes())
    with open(run_dir / "manifest.jsonl", "ab") as f:
        f.write(b'{"shard":"synthetic-1-000000.tar","keys":["ab')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = tmp_path / "report.html"
    result = run_cli("--data", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "shards still being written, not included: 2" in result.stderr
    html = out.read_text()
    assert pairs_in(html) == 16 and "<b>16</b><span>samples read</span>" in html
    assert re.search(r'id="in-progress">2 shards being written', html)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_pair_whose_image_does_not_decode_is_left_out_and_counted(tmp_path):
    write_run(tmp_path / "run", KNOWN, bad_positive={1})
    result = run_cli("--data", tmp_path / "run", "--out", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    assert "warning: pair not shown: sample0001.pos.jpg" in result.stderr
    html = (tmp_path / "report.html").read_text()
    assert pairs_in(html) == 3
    assert "1 chosen pair not shown" in html and "<b>4</b><span>samples read</span>" in html


def test_run_text_is_escaped(tmp_path):
    samples = [{"classes": ["dog"], "quality": 0.9, "passed": True,
                "prompt": 'a dog <script>alert("x")</script> & a "ball"'}]
    write_run(tmp_path / "run", samples)
    build_report(tmp_path / "run", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in html
    assert "a dog &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a &quot;ball&quot;" in html
    assert html.count("<script>") == 1  # only the page's own filter


def test_a_run_without_masks_shows_its_pairs_without_overlays(tmp_path):
    write_synthetic_run(tmp_path / "run", 6, size=32, masks=False)
    summary = build_report(tmp_path / "run", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert pairs_in(html) == summary.shown == 6
    assert html.count('class="nomask"') == 6 and 'alt="mask area per class"' not in html
    assert all(s.masks == 0 for s in summary.digest.classes.values())
