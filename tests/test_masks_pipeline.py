import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import finished_keys, iter_samples
from magicseg_engine.pipeline import DROPPED_FILE, decode_attention


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def samples(run):
    return {s["__key__"]: s for s in iter_samples(run)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("masks") / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 6, "--batch-size", 3, "--seed", 2,
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_every_pair_gets_a_valid_mask_and_its_metadata(run):
    got = samples(run)
    assert len(got) == 6
    for key, s in got.items():
        meta = json.loads(s["json"])
        image = Image.open(io.BytesIO(s["pos.jpg"]))
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        assert mask.dtype == np.uint8 and mask.shape == (image.height, image.width)
        n = len(meta["classes"])
        assert set(np.unique(mask)) <= set(range(n + 1))
        assert meta["mask_source"] == "attention+sam"
        assert [c["name"] for c in meta["masks"]["classes"]] == meta["classes"]
        for c in meta["masks"]["classes"]:
            region = mask == c["label"]
            assert c["area"] == int(region.sum()) and c["empty"] == (c["area"] == 0)
            if c["area"]:
                rows, cols = np.nonzero(region)
                assert c["box"] == [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            else:
                assert c["box"] == [-1, -1, -1, -1]
            assert 0.0 <= c["counterfactual_coverage"] <= 1.0
        check = meta["masks"]["counterfactual"]
        present = [c for c in meta["masks"]["classes"] if not c["empty"]]
        assert check["passed"] == (bool(present) and check["max_coverage"] <= check["threshold"])
        maps = decode_attention(s["attn.npy"])
        assert maps.shape == (2, n, 8, 8) and bool((maps >= 0).all())


def test_mask_source_none_writes_no_masks(tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 2, "--out", out, "--mask-source", "none",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    for s in samples(out).values():
        assert "mask.png" not in s and "attn.npy" not in s
        assert json.loads(s["json"])["mask_source"] == "none"
    for source in ("attention", "attention+detector"):  # the routes that read the maps are refused
        result = invoke("masks", "--data", out, "--out", tmp_path / "again", "--mask-source", source)
        assert result.exit_code == 2 and "holds no attention maps" in result.stderr
        assert f"--mask-source {source} reads" in result.stderr and "use --mask-source detector" in result.stderr
    assert not (tmp_path / "again").exists()


def test_a_run_without_masks_is_annotated_later_by_the_detector(tmp_path):
    """The fast first pass (--mask-source none), then masks from the images alone: detector
    boxes (SAM off, so each mask is its box), and the counterfactual check made by the detector
    on the negative image: the coverage is the share of the mask the negative's box covers."""
    from magicseg_engine.masks.annotate import box_masks
    from magicseg_engine.masks.detector import build_detector

    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 3, "--max-classes", 1, "--out", out,
                    "--mask-source", "none", "--device", "cpu")
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    result = invoke("masks", "--data", out, "--out", again, "--mask-source", "detector", "--no-sam",
                    "--box-threshold", 0.0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    detector = build_detector("tiny", box_threshold=0.0)
    got = samples(again)
    assert got.keys() == samples(out).keys()
    for s in got.values():
        meta = json.loads(s["json"])
        assert meta["mask_source"] == "detector" and "attn.npy" not in s
        (c,) = meta["masks"]["classes"]
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"]))) == 1
        x0, y0, x1, y1 = c["box"]
        assert c["found"] and mask.sum() == c["area"] == (x1 - x0) * (y1 - y0)
        negative = np.asarray(Image.open(io.BytesIO(s["neg.jpg"])).convert("RGB"))[None]
        boxes = detector(negative, [tuple(meta["classes"])]).boxes
        expected = (box_masks(boxes, mask.shape)[0, 0].numpy() & mask).sum() / mask.sum()
        assert c["counterfactual_coverage"] == pytest.approx(expected, abs=1e-4)


def test_failed_pairs_are_dropped_counted_and_not_redone(tmp_path):
    out = tmp_path / "run"
    args = ["generate", "--classes", "voc", "--num-pairs", 4, "--out", out, "--no-sam", "--device", "cpu",
            "--max-counterfactual-coverage", 0.0, "--drop-failed-pairs", "--resume"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    dropped = [json.loads(line) for line in (out / DROPPED_FILE).read_text().splitlines()]
    kept = finished_keys(out)
    assert len(dropped) + len(kept) == 4 and dropped
    assert not {d["key"] for d in dropped} & kept
    for s in samples(out).values():
        assert json.loads(s["json"])["masks"]["counterfactual"]["passed"]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["sessions"][-1]["dropped"] == len(dropped)
    result = invoke(*args)
    assert result.exit_code == 0
    assert json.loads((out / "run.json").read_text())["sessions"][-1]["generated"] == 0


def test_masks_command_annotates_again_without_touching_images(run, tmp_path):
    out = tmp_path / "again"
    result = invoke("masks", "--data", run, "--out", out, "--no-sam", "--mask-threshold", "0.5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    before, after = samples(run), samples(out)
    assert set(before) == set(after)
    for key in before:
        assert after[key]["pos.jpg"] == before[key]["pos.jpg"] and after[key]["neg.jpg"] == before[key]["neg.jpg"]
        assert after[key]["attn.npy"] == before[key]["attn.npy"]
        meta = json.loads(after[key]["json"])
        assert meta["mask_source"] == "attention" and meta["classes"] == json.loads(before[key]["json"])["classes"]
    assert json.loads((out / "run.json").read_text())["config"]["masks"]["threshold"] == 0.5
    # Resumable: a second call finds everything done.
    result = invoke("masks", "--data", run, "--out", out, "--no-sam", "--mask-threshold", "0.5", "--device", "cpu",
                    "--resume")
    assert result.exit_code == 0 and "0 pairs annotated, 6 were already done" in result.stderr.replace("\n", " ")


def test_masks_command_with_the_same_settings_reproduces_the_masks(tmp_path):
    out = tmp_path / "run"
    base = ["--no-sam", "--device", "cpu"]
    assert invoke("generate", "--classes", "voc", "--num-pairs", 4, "--out", out, *base).exit_code == 0
    assert invoke("masks", "--data", out, "--out", tmp_path / "again", *base).exit_code == 0
    before, after = samples(out), samples(tmp_path / "again")
    agree = [np.mean(np.asarray(Image.open(io.BytesIO(before[k]["mask.png"])))
                     == np.asarray(Image.open(io.BytesIO(after[k]["mask.png"])))) for k in before]
    # Only the float16 storage of the maps differs between the two.
    assert min(agree) > 0.97


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "SAME"], "--out must differ from --data"),
        (["--data", "MISSING"], "holds no run"),
        (["--mask-threshold", "1.5"], "masks.threshold"),
        (["--sam-model", "vit_x"], "sam.model_type"),
    ],
)
def test_masks_command_bad_input(run, tmp_path, args, message):
    values = {"--data": run, "--out": tmp_path / "again"}
    i = 0
    while i < len(args):
        values[args[i]] = args[i + 1]
        i += 2
    if values["--out"] == "SAME":
        values["--out"] = run
    if values["--data"] == "MISSING":
        values["--data"] = tmp_path / "missing"
    result = invoke("masks", *[x for kv in values.items() for x in kv])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "again").exists()


def test_real_diffusion_weights_without_a_sam_checkpoint_are_refused_before_loading(tmp_path):
    # The model path does not exist: the SAM check must come first, before any loading.
    result = invoke("generate", "--preset", "sd15", "--model", tmp_path / "nowhere", "--classes", "voc",
                    "--num-pairs", 1, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "pass --sam-checkpoint" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("source", ["detector", "attention+detector"])
def test_detector_routes_write_masks_with_detector_scores(tmp_path, source):
    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 3, "--out", out, "--mask-source", source,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = samples(out)
    assert len(got) == 3
    for s in got.values():
        meta = json.loads(s["json"])
        assert meta["mask_source"] == f"{source}+sam"
        assert all(0.0 <= c["detector_score"] <= 1.0 for c in meta["masks"]["classes"])
        assert "mask.png" in s


def test_detector_without_sam_masks_are_the_detector_boxes(tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 2, "--max-classes", 1, "--out", out,
                    "--mask-source", "detector", "--no-sam", "--box-threshold", 0.0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    for s in samples(out).values():
        meta = json.loads(s["json"])
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        (c,) = meta["masks"]["classes"]
        x0, y0, x1, y1 = c["box"]
        assert c["found"] and c["area"] == (x1 - x0) * (y1 - y0)  # a filled rectangle
        assert (mask[y0:y1, x0:x1] == 1).all()


def test_detector_route_needs_a_detector_model_outside_the_tiny_preset(tmp_path):
    result = invoke("generate", "--preset", "sd15-random", "--classes", "voc", "--num-pairs", 1, "--out",
                    tmp_path / "run", "--mask-source", "detector", "--device", "cpu")
    assert result.exit_code == 2 and "needs --detector-model" in result.stderr
    assert not (tmp_path / "run").exists()


def test_combined_prompts_prefer_detector_boxes_and_keep_attention_points():
    import torch

    from magicseg_engine.kernels.mask_extract import SamPrompts
    from magicseg_engine.masks.annotate import box_masks, combine_prompts
    from magicseg_engine.masks.detector import Detections

    attention = SamPrompts(boxes=torch.tensor([[[1.0, 1, 4, 4], [2, 2, 6, 6]]]),
                           points=torch.tensor([[[[2.0, 2]], [[3, 3]]]]), point_labels=torch.tensor([[[1], [1]]]))
    found = Detections(boxes=torch.tensor([[[0.0, 0, 8, 8], [-1, -1, -1, -1]]]), scores=torch.tensor([[0.9, 0.0]]))
    both = combine_prompts(attention, found, "attention+detector")
    assert both.boxes.tolist() == [[[0, 0, 8, 8], [2, 2, 6, 6]]]
    assert torch.equal(both.points, attention.points) and torch.equal(both.point_labels, attention.point_labels)
    only = combine_prompts(attention, found, "detector")
    assert torch.equal(only.boxes, found.boxes) and bool((only.point_labels == -1).all())
    rect = box_masks(torch.tensor([[[1.0, 2, 4, 3], [-1, -1, -1, -1]]]), (5, 6))
    assert rect[0, 0].sum() == 3 and bool(rect[0, 0, 2, 1:4].all()) and rect[0, 1].sum() == 0


def test_a_class_the_prompt_does_not_tokenise_is_counted_and_left_empty(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    # The class is mentioned only after the 77-token window, so it has no tokens to read.
    filler = "a very long and detailed description of a quiet empty room " * 12
    prompts.write_text(json.dumps({"classes": ["dog"], "prompt": filler + "and a dog",
                                   "negative_prompt": filler + "and nothing", "seed": 1}) + "\n")
    out = tmp_path / "run"
    result = invoke("generate", "--prompts", prompts, "--out", out, "--device", "cpu", "--no-sam")
    assert result.exit_code == 0, result.output
    (s,) = samples(out).values()
    (c,) = json.loads(s["json"])["masks"]["classes"]
    assert not c["found"] and c["empty"] and c["area"] == 0
    assert json.loads((out / "run.json").read_text())["sessions"][-1]["classes_not_found"] == 1
    assert "1 class mentions were not found" in result.stderr.replace("\n", " ")


# --- the mask annotation in two halves: device, then host on the sink's thread ------------------

class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tiny_stage(tiny_sampler):
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_mask_stage
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("tiny")
    # The shared tiny sampler (conftest.py): the stage's capture is on its UNet only while a
    # batch samples, and the tests below monkeypatch the stage's annotator, never the sampler.
    sampler = tiny_sampler
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=3).records
    return config, sampler, build_mask_stage(config, sampler), records


def _annotator(stage, sam):
    from magicseg_engine.masks.annotate import MaskAnnotator

    if sam:
        return stage.annotator
    return MaskAnnotator(stage.annotator.config.model_copy(update={"refine_with_sam": False}))


@pytest.mark.parametrize("sam", [True, False], ids=["sam", "attention-only"])
def test_device_half_then_host_half_gives_what_one_call_gives(tiny_stage, sam):
    import torch

    from magicseg_engine.kernels.mask_extract import extract_masks
    from magicseg_engine.masks.annotate import class_validity, counterfactual_above, coverage_inside
    from magicseg_engine.pipeline import MaskStage, PendingAnnotations

    config, sampler, stage, records = tiny_stage
    annotator = _annotator(stage, sam)
    assert (annotator.refiner is not None) == sam
    classes = [tuple(r.classes) for r in records]
    pairs, pending = MaskStage(stage.capture, annotator).run(sampler, records)
    assert isinstance(pending, PendingAnnotations) and "masks_s" in pairs.timings
    maps = stage.capture.maps()
    part = pending.part
    B, C = maps.shape[0], maps.shape[2]
    H, W = pairs.positives.shape[1:3]
    assert isinstance(part.masks, np.ndarray) and part.masks.shape == (B, C, H, W)
    assert part.above.dtype == torch.bool and part.above.shape == (B, C, H, W)
    for t in (part.scores, part.agreement, part.valid, part.above, pending.maps):
        assert t.device.type == "cpu"

    whole = annotator(pairs.positives, maps, classes)
    split = annotator.finish(annotator.on_device(pairs.positives, maps, classes))
    finished = pending.finish()
    for notes in (split, finished):
        assert len(notes) == B
        for got, want in zip(notes, whole):
            np.testing.assert_array_equal(got.label_map, want.label_map)
            assert got.metadata() == want.metadata()
    # The pending route also hands each pair its maps, on the CPU, for attn.npy.
    for note, names, pair_maps in zip(finished, classes, maps):
        assert note.maps.device.type == "cpu" and torch.equal(note.maps, pair_maps[:, : len(names)])
    assert all(note.maps is None for note in whole)
    # The coverage counted on the host equals the coverage of the final masks recomputed from the maps.
    thresholds = extract_masks(maps[:, 0].float(), class_validity(maps, classes), (H, W),
                               config.masks.threshold, config.masks.positive_points,
                               config.masks.negative_points).thresholds
    final = torch.from_numpy(np.stack([n.label_map for n in whole]))[:, None] == torch.arange(1, C + 1)[None, :, None, None]
    coverage = coverage_inside(counterfactual_above(maps, thresholds, (H, W)), final)
    for b, note in enumerate(finished):
        assert [c["counterfactual_coverage"] for c in note.classes] == [
            round(float(coverage[b, c]), 4) for c in range(len(classes[b]))]
    # finish leaves its input as it was: the same part finishes to the same annotations again.
    again = annotator.finish(part)
    assert all(np.array_equal(a.label_map, b.label_map) and a.metadata() == b.metadata()
               for a, b in zip(again, finished))


def _render(tiny_stage, out, batch_size=1):
    from magicseg_engine.data.shards import ShardWriter
    from magicseg_engine.pipeline import ExecutionOptions, keyed_records, render_pairs

    config, sampler, stage, records = tiny_stage
    todo = keyed_records(sampler.models.model_id, records)
    options = ExecutionOptions(batch_size=batch_size, samples_per_shard=100, encode_workers=1)
    with ShardWriter(out, options.samples_per_shard, options.writer_id) as writer:
        render_pairs(writer, config, todo, sampler, options, stage)
    return todo


def test_render_finishes_masks_on_the_writer_thread(tiny_stage, tmp_path, monkeypatch):
    import threading

    _, _, stage, records = tiny_stage
    threads = []
    finish = stage.annotator.finish

    def recording(part):
        threads.append(threading.current_thread().name)
        return finish(part)

    monkeypatch.setattr(stage.annotator, "finish", recording)
    todo = _render(tiny_stage, tmp_path / "run")
    assert threads == ["shard-writer"] * len(records)
    assert threading.current_thread().name not in threads
    got = samples(tmp_path / "run")
    assert set(got) == {k for k, _ in todo}
    for s in got.values():
        n = len(json.loads(s["json"])["classes"])
        assert "mask.png" in s and decode_attention(s["attn.npy"]).shape == (2, n, 8, 8)


def test_an_error_while_finishing_masks_reaches_the_caller_and_writes_no_shard_for_its_batch(
        tiny_stage, tmp_path, monkeypatch):
    _, _, stage, _ = tiny_stage
    calls = []
    finish = stage.annotator.finish

    def failing_second(part):
        calls.append(len(part.classes))
        if len(calls) == 2:
            raise Boom("finishing failed")
        return finish(part)

    monkeypatch.setattr(stage.annotator, "finish", failing_second)
    out = tmp_path / "run"
    with pytest.raises(Boom, match="finishing failed"):
        _render(tiny_stage, out)
    assert len(calls) == 2  # the writer thread stops finishing after the error
    _, sampler, _, records = tiny_stage
    from magicseg_engine.pipeline import keyed_records

    keys = [k for k, _ in keyed_records(sampler.models.model_id, records)]
    # The batch before the error is kept; the failed batch and the ones after it are in no shard.
    assert finished_keys(out) == {keys[0]}
    assert not [p for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]
