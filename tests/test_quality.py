"""bench quality and bench ablation: the measures, the sweep's composition, the command."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.bench.quality import IoUCounter, RenderedSet, StepwiseCapture, adherence, counterfactual
from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.world.shapes import draw_scene


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_iou_counter_scores_per_class_over_the_whole_set():
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[0, :4, :4] = 1  # 16 px of "a"
    truth[1, :2, :] = 1  # 16 px of "a" in the second image
    truth[1, 4:, :] = 2  # 32 px of "b"
    pred = np.zeros_like(truth)
    pred[0, :4, :2] = 1  # 8 of the first 16
    pred[1, :2, :] = 1  # all 16
    pred[1, 4:, :] = 1  # "b" labelled "a": 32 wrong pixels
    counter = IoUCounter()
    counter.add(pred[0], truth[0], ["a"])
    counter.add(pred[1], truth[1], ["a", "b"])
    result = counter.result()
    assert result["per_class"]["a"] == pytest.approx(24 / (16 + 16 + 32))
    assert result["per_class"]["b"] == 0.0
    assert result["miou"] == pytest.approx((24 / 64) / 2)
    # The reference's binary layout: one foreground mask, given to every class of the image.
    binary = IoUCounter()
    binary.add_binary(truth[1], truth[1], ["a", "b"])
    assert binary.result()["per_class"] == {"a": 16 / 48, "b": 32 / 48}


def _rendered(seed=0, count=6, remove=True):
    rng = np.random.default_rng(seed)
    classes, pos, neg = [], [], []
    names = [("red circle",), ("blue star", "green square"), ("yellow ring",)]
    for i in range(count):
        chosen = names[i % len(names)]
        image, twin, _ = draw_scene(rng, chosen, 64, "grey floor")
        classes.append(chosen)
        pos.append(image)
        neg.append(twin if remove else image)
    return RenderedSet(classes, [""] * count, np.stack(pos), np.stack(neg))


def test_adherence_and_counterfactual_read_the_images():
    good = _rendered()
    a = adherence(good.positives, good.classes)
    assert a["all_classes"] == 1.0 and a["all_classes_colour"] == 1.0
    # Ask for other shapes in the same colours: the colour is there, the shape is not.
    wrong = [tuple(n.split()[0] + " cross" for n in c) for c in good.classes]
    b = adherence(good.positives, wrong)
    assert b["all_classes_colour"] == 1.0 and b["all_classes"] == 0.0
    cf = counterfactual(good)
    assert cf["class_absent"] == 1.0 and cf["pixel_agreement_outside"] == 1.0
    kept = counterfactual(_rendered(remove=False))
    assert kept["class_absent"] == 0.0


def test_the_sweep_composes_exactly_the_maps_a_run_would_capture():
    from magicseg_engine.generate.models import load_diffusion
    from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings

    config = load_preset("shapes", {"diffusion": {"weights": "random", "steps": 4}})
    models = load_diffusion(config.diffusion)
    sampler = PairedSampler(models, SamplingSettings(height=32, width=32, steps=4, guidance=3.0, scheduler="ddim"),
                             "cpu", torch.float32)
    prompts = ["a red circle and a blue star on a grey floor", "a green ring on a dark floor"]
    negatives = ["nothing and nothing on a grey floor", "nothing on a dark floor"]
    classes = [("red circle", "blue star"), ("green ring",)]

    def run(capture):
        capture.set_prompts(prompts, classes)
        with capture.installed():
            sampler(prompts, negatives, [1, 2], hook=capture)
        return capture

    every = run(StepwiseCapture(models.unet, models.tokenizer))
    for steps, factors, power in (((0.0, 1.0), (1, 2), 0), ((0.5, 1.0), (2,), 0), ((0.25, 0.75), (1, 2, 4), 2)):
        direct = run(AttentionCapture(models.unet, models.tokenizer, steps=steps, factors=factors,
                                      self_attention_power=power, use_triton=False))
        composed = every.refine(every.compose(steps, factors), steps, power)
        torch.testing.assert_close(composed, direct.maps(), rtol=1e-5, atol=1e-7)


def test_self_attention_refinement_is_a_weighted_mean_of_the_map():
    from magicseg_engine.generate.models import load_diffusion

    models = load_diffusion(load_preset("shapes", {"diffusion": {"weights": "random"}}).diffusion)
    capture = AttentionCapture(models.unet, models.tokenizer, factors=(1, 2), self_attention_power=1)
    assert capture.self_layers and all(n.endswith("attn1") for n in capture.self_layers)
    n = 16 * 16
    attn = torch.rand(2, n, n)
    maps = torch.rand(2, 3, 16, 16)
    refined = capture._refine(maps, attn.clone(), 1)
    weights = attn / attn.sum(-1, keepdim=True)
    expected = (weights @ maps.reshape(2, 3, n).transpose(1, 2)).transpose(1, 2).reshape(2, 3, 16, 16)
    torch.testing.assert_close(refined, expected)
    # A weighted mean never leaves the map's range.
    assert refined.min() >= maps.min() - 1e-6 and refined.max() <= maps.max() + 1e-6


@pytest.mark.slow
def test_bench_quality_reports_every_route_from_the_code(tmp_path):
    out = tmp_path / "q.json"
    chart = tmp_path / "q.png"
    result = invoke("bench", "quality", "--pairs", 6, "--steps", 6, "--batch-size", 6, "--device", "cpu",
                    "--json", out, "--chart", chart)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert set(saved["masks"]) == {"attention", "attention+sam", "detector+sam", "reference (binary, attention)",
                                   "reference (binary, detector+sam)"}
    for r in saved["masks"].values():
        assert 0.0 <= r["miou"] <= 1.0
    assert 0.0 <= saved["adherence"]["all_classes"] <= saved["adherence"]["all_classes_colour"] <= 1.0
    assert set(saved["counterfactual"]) == {"shared_noise", "independent_noise"}
    rank = saved["denoiser_ranking"]
    assert rank["images"] == 72 and 0.0 <= rank["shape_first"] <= 1.0 and rank["chance"]["shape"] == pytest.approx(1 / 6)
    assert chart.stat().st_size > 1000
    # The same seed gives the same numbers; another seed draws other pairs.
    again = tmp_path / "again.json"
    assert invoke("bench", "quality", "--pairs", 6, "--steps", 6, "--batch-size", 6, "--device", "cpu",
                  "--json", again).exit_code == 0
    assert json.loads(again.read_text())["masks"] == saved["masks"]


@pytest.mark.slow
def test_the_denoiser_ranks_the_true_shape_first_only_when_trained():
    """The shipped model's loss prefers the true shape's caption far above chance and the true
    colour's almost always; random weights prefer one caption whatever the image: chance."""
    from magicseg_engine.bench.denoiser import denoiser_ranking
    from magicseg_engine.generate.models import load_diffusion

    ranks = {w: denoiser_ranking(load_diffusion(load_preset("shapes", {"diffusion": {"weights": w}}).diffusion, "cpu"),
                                 images=36, seed=1)
             for w in ("shipped", "random")}
    shipped, random = ranks["shipped"], ranks["random"]
    assert shipped["colour_first"] >= 0.9, shipped
    assert shipped["shape_first"] >= 0.7, shipped  # 0.86 on bench quality's 72 images; chance: 1/6
    assert random["shape_first"] <= 0.3 and random["colour_first"] <= 0.3, random
    assert set(shipped["shape_first_per_shape"]) == {"circle", "square", "triangle", "star", "ring", "cross"}


def test_bench_quality_refuses_presets_without_a_truth():
    result = invoke("bench", "quality", "--preset", "tiny")
    assert result.exit_code == 2 and "needs --preset shapes" in result.output


def test_held_out_classes_must_be_world_classes_and_disjoint_from_training():
    from magicseg_engine.bench.ablation import check_held_out
    from magicseg_engine.errors import UsageError
    from magicseg_engine.world.shapes import world_classes

    classes = world_classes()
    train = check_held_out(["red star"], classes)
    assert "red star" not in train and len(train) == 35
    with pytest.raises(UsageError, match="not a class of the shapes world"):
        check_held_out(["purple star"], classes)
    with pytest.raises(UsageError, match="every class is held out"):
        check_held_out(classes, classes)
    with pytest.raises(UsageError, match="overlap"):
        check_held_out(["red star"], classes, train=["red star", "blue ring"])


@pytest.mark.slow
def test_bench_schedulers_scores_every_combination_as_bench_quality_would(tmp_path):
    from magicseg_engine.bench.quality import run_quality
    from magicseg_engine.bench.schedulers import run_scheduler_sweep
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("shapes", {"seed": 5, "prompts": {"seed": 5}})
    records = build_prompts(config.prompts, vocab=load_vocabulary("shapes"), num=6).records
    result = run_scheduler_sweep(config, records, ["ddim", "euler"], [4, 2], "cpu", batch_size=6)
    rows = result["rows"]
    assert [(r["scheduler"], r["steps"]) for r in rows] == [("ddim", 4), ("ddim", 2), ("euler", 4), ("euler", 2)]
    assert result["mask_route"] == "attention+sam" and rows[0]["speedup"] == 1.0 and rows[0]["miou_change"] == 0.0
    for r in rows:
        assert 0.0 <= r["mask_miou"] <= 1.0 and 0.0 <= r["class_absent"] <= 1.0 and r["seconds_per_pair"] > 0
    # A row is what bench quality measures for that scheduler and step count on the same pairs.
    four = config.model_copy(update={"diffusion": config.diffusion.model_copy(update={"scheduler": "euler", "steps": 4})})
    quality = run_quality(four, records, "cpu", batch_size=6)
    assert rows[2]["mask_miou"] == pytest.approx(quality["masks"]["attention+sam"]["miou"])
    assert rows[2]["class_absent"] == pytest.approx(quality["counterfactual"]["shared_noise"]["class_absent"])
    # Different schedulers draw different images from the same noise.
    assert (rows[0]["mask_miou"], rows[0]["pixel_agreement_outside"]) != (rows[2]["mask_miou"], rows[2]["pixel_agreement_outside"])


def test_bench_schedulers_refuses_unknown_schedulers_and_step_counts(tmp_path):
    for args, text in ((("--schedulers", "pndm"), "not a scheduler"), (("--steps", "1"), "at least 2"),
                       (("--steps", "ten"), "whole numbers"), (("--preset", "tiny"), "needs --preset shapes"),
                       (("--fast", "0,9"), "not a fast level"), (("--fast", "x"), "fast levels separated")):
        result = invoke("bench", "schedulers", *args, "--json", tmp_path / "s.json")
        assert result.exit_code == 2 and text in result.output and "Traceback" not in result.output
        assert not (tmp_path / "s.json").exists()


def test_attribute_scores_split_mistakes_into_missed_objects_colours_and_shapes(tmp_path):
    from PIL import Image

    from magicseg_engine.bench.ablation import attribute_scores

    classes = ["red circle", "red star", "blue circle"]
    true = np.array([[1, 1, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]], np.uint8)
    # The red circle called a red star, half the blue circle missed, one pixel of floor called a
    # red circle, and the ignored pixel called anything: it must not count.
    predicted = np.array([[2, 2, 0, 0], [3, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]], np.uint8)
    for folder, labels in (("pred", predicted), ("true", true)):
        (tmp_path / folder).mkdir()
        Image.fromarray(labels).save(tmp_path / folder / "a.png")
    scores = attribute_scores(tmp_path / "pred", tmp_path / "true", ["a"], classes, held_out=["blue circle"])
    assert scores["foreground_iou"] == pytest.approx(3 / 5)
    assert scores["colour_accuracy"] == 1.0 and scores["shape_accuracy"] == pytest.approx(1 / 3)
    assert scores["unseen_colour_accuracy"] == 1.0 and scores["unseen_shape_accuracy"] == 1.0


def test_the_ablation_text_tower_is_the_shapes_text_encoder(tmp_path):
    import open_clip

    from magicseg_engine.bench.ablation import seeded_clip_weights, text_tower_overrides
    from magicseg_engine.errors import UsageError
    from magicseg_engine.train.model import MagicSegModel, SegModelConfig, load_clip_weights
    from magicseg_engine.world.model import shipped_path, unpack

    overrides = text_tower_overrides("shapes")
    path = seeded_clip_weights(tmp_path / "clip.safetensors", overrides, seed=0)
    torch.manual_seed(0)
    model = MagicSegModel(SegModelConfig.preset("tiny", **overrides)).eval()
    image_tower = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    load_clip_weights(model, path)
    tokens = open_clip.tokenize(["a red circle on a grey floor", "a blue star and nothing on a dark floor"],
                                model.config.context_length)
    with torch.no_grad():
        expected = unpack(shipped_path())[0].text_encoder(input_ids=tokens).pooler_output
        torch.testing.assert_close(model.clip.encode_text(tokens), expected, atol=1e-4, rtol=1e-4)
    # The image tower is the one pretraining draws from the seed: only the text tower changes.
    for key, value in model.clip.visual.state_dict().items():
        assert torch.equal(value, image_tower[key]), key
    assert text_tower_overrides("random") == {}
    with pytest.raises(UsageError, match="--text-tower"):
        text_tower_overrides("openai")


@pytest.mark.slow
def test_bench_ablation_runs_its_four_arms_and_resumes(tmp_path):
    work = tmp_path / "abl"
    args = ("bench", "ablation", "--work", work, "--pairs", 6, "--steps", 2, "--eval-images", 4,
            "--device", "cpu", "--json", tmp_path / "a.json")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a.json").read_text())
    assert list(saved["arms"]) == ["generated + counterfactual loss", "generated, no counterfactual loss",
                                   "true masks (upper bound)", "untrained"]
    for arm in saved["arms"].values():
        assert 0.0 <= arm["miou"] <= 1.0 and arm["miou_unseen"] is not None
    assert saved["train_classes"] == 30 and len(saved["held_out"]) == 6 and saved["text_tower"] == "shapes"
    for arm in saved["arms"].values():
        assert 0.0 <= arm["foreground_iou"] <= 1.0
    # Every pretraining arm started from the checkpoint with the shapes text encoder in it.
    for folder in ("pretrain-counterfactual", "pretrain-no-counterfactual", "pretrain-true-masks"):
        config = json.loads((work / folder / "pretrain.json").read_text())["config"]
        assert config["clip_weights"].endswith("clip-shapes-text.safetensors") and config["model"]["quick_gelu"]
    # A second call finds every part done and scores the same checkpoints again.
    assert invoke(*args).exit_code == 0
    assert json.loads((tmp_path / "a.json").read_text())["arms"] == saved["arms"]


def test_bench_ablation_refuses_overlapping_classes_before_writing(tmp_path):
    work = tmp_path / "abl"
    result = invoke("bench", "ablation", "--work", work, "--held-out", "red star",
                    "--train-classes", "red star,blue ring")
    assert result.exit_code == 2 and "overlap" in result.output
    assert not work.exists()


@pytest.mark.slow
def test_bench_schedulers_sweeps_fast_levels_on_the_same_pairs(tmp_path):
    """--fast adds fast mode as a third axis: each level is a row rendered from the same
    prompts and seeds, the first level the baseline, and a fast level draws other images."""
    result = invoke("bench", "schedulers", "--schedulers", "ddim", "--steps", "4", "--fast", "0,1", "--pairs", "4",
                    "--batch-size", "4", "--device", "cpu", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s.json").read_text())
    rows = saved["rows"]
    assert [(r["steps"], r["fast"]) for r in rows] == [(4, 0), (4, 1)] and saved["baseline"]["fast"] == 0
    assert rows[0]["speedup"] == 1.0 and rows[1]["seconds_per_pair"] > 0
    assert rows[0]["pixel_agreement_outside"] != rows[1]["pixel_agreement_outside"]
