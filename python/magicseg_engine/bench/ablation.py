"""`bench ablation`: the MagicSeg loop in miniature, in the shapes world.

1. Generate N pairs with the `shapes` preset (positives, counterfactual negatives, attention
   masks) for the training classes: every world class but the held-out ones.
2. Pretrain the tiny segmentation model four ways, same steps and seed:
   - on the generated pairs, with the counterfactual loss (the paper's method);
   - on the same pairs without it (counterfactual weight 0);
   - on N scenes drawn directly from the world with their true masks and true twins (the
     upper bound: what perfect generation and perfect masks would give);
   - not at all (the initial weights).
   Every arm starts from the same weights. Its text tower is the shapes model's own text encoder
   (`--text-tower shapes`), the world's counterpart of the pretrained CLIP text encoder the paper
   starts from; a random tower (`--text-tower random`) embeds every class name almost alike
   (mean cosine 0.9), the shapes one tells colours apart (0.4 across colours).
3. Evaluate each zero-shot on held-out scenes of every world class, held-out ones included,
   written in the VOC layout (label 0 background) and scored by `evaluate`: mIoU over all
   classes, over the training classes and over the held-out ones.
4. Say where the masks go wrong (`attribute_scores`): a world class is a colour and a shape,
   so each mistake is a missed object, a wrong colour or a wrong shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from magicseg_engine.errors import UsageError
from magicseg_engine.world.shapes import FLOORS, World

# One class of each colour and each shape: the held-out set covers the world without leaving
# any colour or shape word unseen in training.
DEFAULT_HELD_OUT = ("red star", "green ring", "blue cross", "yellow circle", "magenta square", "cyan triangle")

# Class names are embedded in the world's own phrasing, averaged over its floors, as the shapes
# text encoder learned to read them: the true-mask arm reached mIoU 0.088 with these against
# 0.077 with CLIP's photo templates (1200 steps, seed 0).
WORLD_TEMPLATES = tuple(f"a {{}} on a {floor}" for floor in FLOORS)
TEXT_TOWERS = ("shapes", "random")

ARMS = ("generated + counterfactual loss", "generated, no counterfactual loss", "true masks (upper bound)",
        "untrained")


def check_held_out(held_out: Sequence[str], classes: Sequence[str],
                   train: Sequence[str] | None = None) -> list[str]:
    """The training classes: `train`, or `classes` minus `held_out`. UsageError if a class is not
    a world class, if `train` and `held_out` overlap, or if nothing is left to train on."""
    unknown = [c for c in [*held_out, *(train or [])] if c not in classes]
    if unknown:
        raise UsageError(f"class {unknown[0]!r} is not a class of the shapes world; "
                         "pick classes from --classes shapes")
    if train is not None:
        both = [c for c in train if c in held_out]
        if both:
            raise UsageError(f"the training and held-out classes overlap ({', '.join(both)}); a held-out class "
                             "must be unseen in generation and training")
        chosen = list(dict.fromkeys(train))
    else:
        chosen = [c for c in classes if c not in held_out]
    if not chosen:
        raise UsageError("every class is held out; leave some for generation and training")
    return chosen


def write_eval_set(root: Path, world: World, count: int, seed: int) -> Path:
    """`count` world scenes in the VOC layout under root/VOC2012, labels in `world.classes` order."""
    from magicseg_engine.prompts.records import sample_seed
    from magicseg_engine.world.shapes import draw_scene

    voc = root / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    classes = list(world.classes)
    ids = []
    for i in range(count):
        rng = np.random.default_rng(sample_seed(seed, i))
        names, floor_name = world.choose(rng)
        if not names:  # an empty floor scores nothing but background
            names, floor_name = world.choose(rng)
        image, _, local = draw_scene(rng, names, world.size, floor_name)
        labels = np.zeros_like(local)
        for j, name in enumerate(names, 1):
            labels[local == j] = classes.index(name) + 1
        ids.append(f"world{i:05d}")
        Image.fromarray(image).save(voc / "JPEGImages" / f"{ids[-1]}.jpg", quality=95)
        Image.fromarray(labels).save(voc / "SegmentationClass" / f"{ids[-1]}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def generate_run(out: Path, classes: Sequence[str], pairs: int, seed: int, device: str, batch_size: int = 16,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """`pairs` shapes-preset pairs with attention masks for `classes`, written by the engine's own
    generate pipeline into the run directory `out` (resumed when it is there)."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import (
        ExecutionOptions, build_mask_stage, build_sampler, generate_pairs, open_run, start_run,
    )
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import Vocabulary

    config = load_preset("shapes", {"seed": seed, "prompts": {"seed": seed}})
    records = build_prompts(config.prompts, vocab=Vocabulary("ablation", tuple(classes)), num=pairs).records
    plan = open_run(out, config, records, resume=out.exists(), overwrite=False)
    sampler = build_sampler(config, device)
    masks = build_mask_stage(config, sampler)
    if plan.fresh:
        start_run(out, config, plan.records)
    options = ExecutionOptions(device=device, batch_size=batch_size, samples_per_shard=256, encode_workers=2)
    generate_pairs(out, config, plan.records, sampler, options, progress=progress, masks=masks)
    return out


def attribute_scores(predictions: Path, truth: Path, ids: Sequence[str], classes: Sequence[str],
                     held_out: Sequence[str]) -> dict:
    """Where the predicted label maps `predictions/ID.png` (labels 1.. in `classes` order) go wrong
    against the true ones `truth/ID.png`, over `ids`.

    foreground_iou: any class against background, so whether objects are found at all. On the
    pixels both call an object, colour_accuracy and shape_accuracy: how often the predicted
    class has the true one's colour, its shape; `unseen_` the same on objects of `held_out`.
    """
    from magicseg_engine.world.shapes import split_class

    k = len(classes) + 1
    counts = np.zeros((k, k), np.int64)  # [true, predicted], 0 background
    for name in ids:
        predicted = np.asarray(Image.open(predictions / f"{name}.png"), np.int64)
        true = np.asarray(Image.open(truth / f"{name}.png"), np.int64)
        scored = true < k  # not the ignore label
        counts += np.bincount((true * k + predicted)[scored], minlength=k * k).reshape(k, k)
    shape, colour = (np.array(["", *parts]) for parts in zip(*(split_class(c) for c in classes)))
    objects = counts[1:, 1:]
    union = counts.sum() - counts[0, 0]
    scores = {"foreground_iou": float(objects.sum() / union) if union else None}
    unseen = np.array([c in held_out for c in classes])
    for prefix, rows in (("", slice(None)), ("unseen_", unseen)):
        found = objects[rows]
        for name, parts in (("colour", colour), ("shape", shape)):
            same = parts[1:][rows][:, None] == parts[1:][None, :]
            scores[f"{prefix}{name}_accuracy"] = float(found[same].sum() / found.sum()) if found.sum() else None
    return scores


def seeded_clip_weights(path: Path, model_overrides: dict, seed: int) -> Path:
    """An open_clip checkpoint at `path` for the tiny model with `model_overrides`: the image tower
    as pretraining draws it from `seed`, the text tower the shipped shapes text encoder."""
    import torch
    from safetensors.torch import save

    from magicseg_engine.atomic import atomic_output
    from magicseg_engine.train.model import MagicSegModel, SegModelConfig, text_tower_from_transformers
    from magicseg_engine.world.model import shipped_path, unpack

    text_encoder = unpack(shipped_path())[0].text_encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MagicSegModel(SegModelConfig.preset("tiny", **model_overrides))
    state = {**model.clip.state_dict(), **text_tower_from_transformers(text_encoder.state_dict())}
    with atomic_output(path, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in state.items()}))
    return path


def text_tower_overrides(text_tower: str) -> dict:
    """The tiny model's settings that let the shapes text encoder's weights drop into its text tower."""
    from magicseg_engine.world.model import SHAPES_TEXT_ENCODER

    if text_tower not in TEXT_TOWERS:
        raise UsageError(f"--text-tower {text_tower!r}: choose one of {', '.join(TEXT_TOWERS)}")
    if text_tower == "random":
        return {}
    return {"quick_gelu": SHAPES_TEXT_ENCODER["hidden_act"] == "quick_gelu",
            "context_length": SHAPES_TEXT_ENCODER["max_position_embeddings"], "templates": WORLD_TEMPLATES}


def run_ablation(work: Path, *, pairs: int = 512, steps: int = 1200, eval_images: int = 128,
                 held_out: Sequence[str] = DEFAULT_HELD_OUT, train: Sequence[str] | None = None,
                 seed: int = 0, device: str = "cpu", bg_threshold: float = 0.15, text_tower: str = "shapes",
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run the four arms in the folder `work` (kept, so a second call resumes) and score them."""
    import torch

    from magicseg_engine.bench.common import device_info
    from magicseg_engine.config import load_preset
    from magicseg_engine.evaluate.datasets import load_dataset
    from magicseg_engine.evaluate.inference import SlideSettings
    from magicseg_engine.evaluate.run import EvalSettings, Segmenter, evaluate, load_segmenter
    from magicseg_engine.generate.models import model_identity
    from magicseg_engine.train.loop import load_pretrain_preset, pretrain
    from magicseg_engine.train.model import MagicSegModel, load_clip_weights
    from magicseg_engine.train.synthetic import write_synthetic_run

    if pairs <= 0 or steps <= 0 or eval_images <= 0:
        raise UsageError("--pairs, --steps and --eval-images must be positive")
    if not 0.0 < bg_threshold < 1.0:
        raise UsageError(f"--bg-threshold {bg_threshold} must lie between 0 and 1")
    model_overrides = text_tower_overrides(text_tower)
    world = World().check()
    classes = list(world.classes)
    train_classes = check_held_out(list(held_out), classes, train)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def report(stage: str) -> Callable[[int, int], None]:
        # generate's callback: the first call gives the pairs already on disk, later ones add.
        done, first = [0], [True]

        def advance(n: int, total: int) -> None:
            done[0] = n if first[0] else done[0] + n
            first[0] = False
            if progress:
                progress(stage, done[0], total)
        return advance

    generated = generate_run(work / "generated", train_classes, pairs, seed, device, progress=report("generate"))
    truth = work / "true-masks"
    write_synthetic_run(truth, pairs, size=world.size, seed=seed + 1, classes=train_classes, floors=world.floors)
    eval_root = write_eval_set(work / "eval", world, eval_images, seed + 2)

    base = {"steps": steps, "checkpoint_every": max(1, steps // 4), "seed": seed, "vocabulary": train_classes}
    if text_tower == "shapes":
        base["clip_weights"] = str(seeded_clip_weights(work / "clip-shapes-text.safetensors", model_overrides, seed))
    arms: dict[str, dict] = {}
    runs = {ARMS[0]: ("pretrain-counterfactual", generated, {}),
            ARMS[1]: ("pretrain-no-counterfactual", generated, {"counterfactual_weight": 0.0}),
            ARMS[2]: ("pretrain-true-masks", truth, {})}
    for arm, (folder, data, extra) in runs.items():
        out = work / folder
        config = load_pretrain_preset("tiny", {**base, **extra}, model_overrides)
        on_step = (lambda s, total, _m, arm=arm: progress(f"pretrain: {arm}", s, total)) if progress else None
        pretrain(config, data, out, device=device, resume=out.exists(), on_step=on_step)
        arms[arm] = {"checkpoint": out}
    init = load_pretrain_preset("tiny", base, model_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = MagicSegModel(init.model).eval()
    if init.clip_weights:
        load_clip_weights(untrained, init.clip_weights)
    # The model's own crop: the world's small images are scaled up to it, as in training.
    settings = EvalSettings(slide=SlideSettings.for_crop(init.model.image_size), bg_threshold=bg_threshold,
                            num_workers=0)
    dataset = load_dataset("voc", eval_root, class_names=classes)
    results = {}
    for arm in ARMS:
        segmenter = (Segmenter(untrained, Path("untrained"), 0, None) if arm == "untrained"
                     else load_segmenter(arms[arm]["checkpoint"], device))
        predictions = work / "predictions" / (runs[arm][0] if arm in runs else "untrained")
        scored = evaluate(segmenter, dataset, settings, unseen=list(held_out), save_predictions=predictions)
        results[arm] = {"miou": scored["miou"], "miou_seen": scored["seen_miou"], "miou_unseen": scored["unseen_miou"],
                        "harmonic_miou": scored["harmonic_miou"], "background_iou": scored["iou"].get("background"),
                        **attribute_scores(predictions, eval_root / "VOC2012" / "SegmentationClass",
                                           [sample.id for sample in dataset.samples], classes, held_out)}
        if progress:
            progress("evaluate", len(results), len(ARMS))
    return {"benchmark": "ablation", "pairs": pairs, "pretrain_steps": steps, "eval_images": eval_images, "seed": seed,
            "bg_threshold": bg_threshold, "text_tower": text_tower,
            "held_out": list(held_out), "train_classes": len(train_classes), "arms": results,
            "generated_by": model_identity(load_preset("shapes").diffusion),
            "seconds": round(time.perf_counter() - t0, 1), "machine": device_info(torch.device(device))}
