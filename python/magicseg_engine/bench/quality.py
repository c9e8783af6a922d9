"""`bench quality`: how good the engine's pairs and masks are, measured in the shapes world.

The `shapes` preset draws solid-coloured shapes on grey floors, so the truth of any image it
makes can be read back from the image itself (`world.shapes.truth_labels`). On N generated
pairs this measures:

- prompt adherence: the positives that show every requested class, by colour and by shape;
- mask quality: per-class IoU of the engine's masks on the positives that show every requested
  colour against that truth, for
  each mask route (attention alone, attention + SAM, detector + SAM), and for the reference
  layout, one binary mask per image that every class of the image gets;
- counterfactual fidelity: the negatives from which the class is really gone, and how much of
  the image outside the object the pair shares, with shared noise and with `--independent-noise`;
- the denoiser's ranking (`bench.denoiser`): how often its loss prefers the true shape's caption
  for a true image of the world, what the model knows of the shapes whether or not it draws them.

The images are rendered once with every cross-attention layer captured at every step
(`StepwiseCapture`), so the sweep of the mask settings (layers, steps, thresholds,
self-attention refinement) scores each variant on the same images without sampling again.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from magicseg_engine.config import MaskConfig, RunConfig
from magicseg_engine.generate.attention import AttentionCapture, _step_range, cross_attention_layers
from magicseg_engine.generate.models import DiffusionModels
from magicseg_engine.world.shapes import WORLD_SHAPES, find_class, split_class, truth_labels


class StepwiseCapture(AttentionCapture):
    """An AttentionCapture of every cross-attention layer that keeps each step's sums apart,
    so that any choice of layers and steps can be composed afterwards (`compose`), and each
    step's latent-resolution self-attention, for refinement at any power (`refine`)."""

    def __init__(self, unet: torch.nn.Module, tokenizer):
        factors = sorted(set(cross_attention_layers(unet).values()))
        # Power 1 installs the self-attention probes; `refine` applies any power itself.
        super().__init__(unet, tokenizer, steps=(0.0, 1.0), factors=factors, use_triton=False,
                         self_attention_power=1)
        self.factors = factors
        self.per_step: list[dict[int, torch.Tensor]] = []
        self.layer_calls: list[Counter] = []
        self.self_maps: list[torch.Tensor | None] = []
        self._step = 0

    def start(self, layout, num_steps: int) -> None:
        super().start(layout, num_steps)
        self.per_step = [{} for _ in range(num_steps)]
        self.layer_calls = [Counter() for _ in range(num_steps)]
        self.self_maps = [None] * num_steps

    def before_step(self, index: int, timestep: torch.Tensor) -> None:
        super().before_step(index, timestep)
        self._step = index
        self._sums = self.per_step[index]

    def _flush(self) -> None:
        # Before the step's sums are switched: what is stashed belongs to self._step.
        for factor, *_ in self._stashed:
            self.layer_calls[self._step][factor] += 1
        super()._flush()

    def _record_self(self, probs: torch.Tensor) -> None:
        cur = self.self_maps[self._step]
        self.self_maps[self._step] = probs.float() if cur is None else cur + probs.float()

    def compose(self, steps: tuple[float, float], factors: Sequence[int]) -> torch.Tensor:
        """[B, 2, C, h, w]: what `AttentionCapture.maps()` gives for these steps and factors."""
        pairs = self._layout.pairs
        classes = self._token_index.shape[1]
        h0, w0 = self._latent_hw
        total = torch.zeros((2 * pairs, classes, h0, w0))
        count = 0
        for i in sorted(_step_range(steps, len(self.per_step))):
            for f in factors:
                buf = self.per_step[i].get(f)
                if buf is None:
                    continue
                h, w = -(-h0 // f), -(-w0 // f)
                grid = buf.reshape(2 * pairs, classes, h, w)
                if (h, w) != (h0, w0):
                    grid = F.interpolate(grid, size=(h0, w0), mode="bilinear", align_corners=False)
                total += grid
                count += self.layer_calls[i][f]
        if count:
            total /= count
        return total.reshape(2, pairs, classes, h0, w0).transpose(0, 1).contiguous()

    def refine(self, maps: torch.Tensor, steps: tuple[float, float], power: int) -> torch.Tensor:
        """`maps` [B, 2, C, h, w] refined as `AttentionCapture` refines them, with the
        self-attention of `steps` and `power`."""
        if power == 0:
            return maps
        chosen = [self.self_maps[i] for i in sorted(_step_range(steps, len(self.self_maps)))
                  if self.self_maps[i] is not None]
        B, two, C, h, w = maps.shape
        rows = maps.transpose(0, 1).reshape(two * B, C, h, w)
        refined = self._refine(rows, torch.stack(chosen).sum(0) if chosen else None, power)
        return refined.reshape(two, B, C, h, w).transpose(0, 1).contiguous()


@dataclass
class RenderedSet:
    """N rendered pairs with their classes and, per batch, the capture that watched them."""

    classes: list[tuple[str, ...]]
    prompts: list[str]
    positives: np.ndarray
    negatives: np.ndarray
    batches: list[tuple[slice, StepwiseCapture]] = field(default_factory=list)
    seconds: float = 0.0
    models: DiffusionModels | None = None  # the sampler's, for measures that need the models themselves


def render_set(config: RunConfig, records, device: str, batch_size: int, capture: bool = True,
               progress: Callable[[int], None] | None = None) -> RenderedSet:
    """Render `records` with the configuration's sampler, keeping every attention map when `capture`."""
    from magicseg_engine.pipeline import build_sampler

    no_masks = config.model_copy(update={"masks": config.masks.model_copy(update={"source": "none"})})
    sampler = build_sampler(no_masks, device)
    classes = [tuple(r.classes) for r in records]
    prompts = [r.prompt for r in records]
    pos, neg, batches = [], [], []
    t0 = time.perf_counter()
    for lo in range(0, len(records), batch_size):
        part = records[lo:lo + batch_size]
        args = ([r.prompt for r in part], [r.negative_prompt for r in part], [r.seed for r in part])
        if capture:
            cap = StepwiseCapture(sampler.models.unet, sampler.models.tokenizer)
            cap.set_prompts(args[0], [tuple(r.classes) for r in part])
            with cap.installed():
                batch = sampler(*args, hook=cap)
            batches.append((slice(lo, lo + len(part)), cap))
        else:
            batch = sampler(*args)
        pos.append(batch.positives)
        neg.append(batch.negatives)
        if progress:
            progress(len(part))
    return RenderedSet(classes, prompts, np.concatenate(pos), np.concatenate(neg), batches,
                       time.perf_counter() - t0, sampler.models)


# --- measures -----------------------------------------------------------------------------

def adherence(images: np.ndarray, classes: Sequence[Sequence[str]]) -> dict:
    """The fraction of images showing every requested class (colour, then colour and shape)."""
    colour_ok = shape_ok = 0
    per_class: dict[str, list[int]] = {}
    coloured = []
    for image, names in zip(images, classes):
        found = [find_class(image, n) for n in names]
        colour_ok += all(f[0] for f in found)
        shape_ok += all(f[1] for f in found)
        coloured.append(all(f[0] for f in found))
        for n, f in zip(names, found):
            per_class.setdefault(n, []).append(int(f[1]))
    n = max(1, len(images))
    return {"images": len(images), "all_classes_colour": colour_ok / n, "all_classes": shape_ok / n,
            # A model that drew the right colour in a random shape would get the shape right 1/6 of the time.
            "chance_shape_given_colour": 1.0 / len(WORLD_SHAPES),
            "per_class": {k: sum(v) / len(v) for k, v in sorted(per_class.items())}, "_coloured": coloured}


class IoUCounter:
    """Per-class intersection and union over a set of images (dataset-level IoU, as mIoU is)."""

    def __init__(self):
        self.inter: Counter = Counter()
        self.union: Counter = Counter()

    def add(self, predicted: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> None:
        for i, name in enumerate(names, 1):
            p, t = predicted == i, truth == i
            self.inter[name] += int((p & t).sum())
            self.union[name] += int((p | t).sum())

    def add_binary(self, predicted: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> None:
        """The reference layout: one foreground mask per image, taken as the mask of every class."""
        fg = predicted > 0
        for i, name in enumerate(names, 1):
            t = truth == i
            self.inter[name] += int((fg & t).sum())
            self.union[name] += int((fg | t).sum())

    def result(self) -> dict:
        per_class = {n: self.inter[n] / self.union[n] for n in sorted(self.union) if self.union[n]}
        return {"miou": float(np.mean(list(per_class.values()))) if per_class else 0.0,
                "classes": len(per_class), "per_class": per_class}


def score_masks(rendered: RenderedSet, label_maps: Sequence[np.ndarray], keep: Sequence[bool],
                binary: bool = False) -> dict:
    """mIoU of `label_maps` on the positives marked in `keep`, against the colour truth."""
    counter = IoUCounter()
    for i, (image, names) in enumerate(zip(rendered.positives, rendered.classes)):
        if not keep[i]:
            continue
        truth = truth_labels(image, names)
        (counter.add_binary if binary else counter.add)(label_maps[i], truth, names)
    return counter.result()


def annotate(rendered: RenderedSet, annotator, steps: tuple[float, float], factors: Sequence[int],
             self_power: int = 0, self_steps: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Label maps of every positive from the maps composed for (steps, factors[, refinement])."""
    out: list[np.ndarray] = []
    for span, cap in rendered.batches:
        maps = cap.compose(steps, factors)
        if self_power:
            maps = cap.refine(maps, self_steps or steps, self_power)
        for pair in annotator(rendered.positives[span], maps, list(rendered.classes[span])):
            out.append(pair.label_map)
    return out


def counterfactual(rendered: RenderedSet) -> dict:
    """Removed classes really gone from the negatives, and positive/negative agreement outside the object."""
    from magicseg_engine.world.shapes import MIN_PRESENT_FRACTION, colour_masks

    gone = total = 0
    agree, outside = 0, 0
    for pos, neg, names in zip(rendered.positives, rendered.negatives, rendered.classes):
        colours = [split_class(n)[1] for n in names]
        left = colour_masks(neg, colours).reshape(len(colours), -1).mean(-1) if colours else np.zeros(0)
        gone += int((left < MIN_PRESENT_FRACTION).sum())
        total += len(colours)
        objects = torch.from_numpy(truth_labels(pos, names) > 0).float()[None, None]
        # Two pixels around the object are its edge, blurred by the VAE: neither inside nor out.
        near = F.max_pool2d(objects, 5, stride=1, padding=2)[0, 0].numpy() > 0
        same = np.abs(pos.astype(np.int16) - neg.astype(np.int16)).max(-1) <= 24
        agree += int((same & ~near).sum())
        outside += int((~near).sum())
    return {"class_absent": gone / max(1, total), "pixel_agreement_outside": agree / max(1, outside),
            "classes_checked": total}


# --- the benchmark --------------------------------------------------------------------------

ROUTES = ("attention", "attention+sam", "detector+sam")


def preset_route(config: RunConfig) -> str:
    """The route whose masks the preset itself writes: refined by SAM when it refines them."""
    return "attention+sam" if config.masks.refine_with_sam else "attention"


def _annotator(config: RunConfig, route: str, device: str, overrides: dict | None = None):
    from magicseg_engine.pipeline import build_annotator

    masks = {"attention": {"source": "attention", "refine_with_sam": False},
             "attention+sam": {"source": "attention", "refine_with_sam": True},
             "detector+sam": {"source": "detector", "refine_with_sam": True,
                              "detector_model": config.masks.detector_model or "tiny"}}[route]
    cfg = config.model_copy(update={"masks": MaskConfig.model_validate(
        {**config.masks.model_dump(), **masks, **(overrides or {})})})
    return build_annotator(cfg, device, torch.float32, checked=False)


def run_quality(config: RunConfig, records, device: str = "cpu", batch_size: int = 16, sweep: bool = False,
                progress: Callable[[str, int, int], None] | None = None, picture=None) -> dict:
    """Every number `bench quality` reports, for `records` rendered under `config`; with
    `picture` (a path), also a PNG of a few pairs with the attention route's masks."""
    from magicseg_engine.bench.common import device_info
    from magicseg_engine.bench.denoiser import denoiser_ranking
    from magicseg_engine.generate.models import model_identity

    n = len(records)

    def step(stage: str, total: int):
        done = [0]

        def advance(k: int) -> None:
            done[0] += k
            if progress:
                progress(stage, done[0], total)
        return advance

    rendered = render_set(config, records, device, batch_size, progress=step("render", n))
    independent_cfg = config.model_copy(update={"diffusion": config.diffusion.model_copy(
        update={"independent_noise": True})})
    independent = render_set(independent_cfg, records, device, batch_size, capture=False,
                             progress=step("render (independent noise)", n))
    adh = adherence(rendered.positives, rendered.classes)
    # Masks are scored on the positives that show every requested colour: the truth is the
    # colour's pixels, whatever shape the model gave them, and a class that was not drawn at
    # all has no truth to find (adherence reports those).
    keep = adh.pop("_coloured")
    m = config.masks
    factors = _factors(config, rendered)
    routes: dict[str, dict] = {}
    label_maps: dict[str, list[np.ndarray]] = {}
    # The attention route's masks are only as trained as the diffusion model they come from.
    unet_weights = "random UNet" if config.diffusion.weights == "random" else "trained UNet"
    # The shapes preset's SAM is trained on the world (`train-world-sam`); no detector is.
    sam_weights = "trained SAM" if config.sam.checkpoint else "random SAM"
    weights_of = {"attention": unet_weights, "attention+sam": f"{unet_weights}, {sam_weights}",
                  "detector+sam": f"{sam_weights}, random detector"}
    for route in ROUTES:
        annotator = _annotator(config, route, device)
        maps = annotate(rendered, annotator, m.capture_steps, factors, m.self_attention_power)
        label_maps[route] = maps
        routes[route] = {**score_masks(rendered, maps, keep), "weights": weights_of[route]}
        if progress:
            progress("masks", len(routes), len(ROUTES))
    routes["reference (binary, attention)"] = {**score_masks(rendered, label_maps["attention"], keep, binary=True),
                                               "weights": unet_weights}
    routes["reference (binary, detector+sam)"] = {
        **score_masks(rendered, label_maps["detector+sam"], keep, binary=True),
        "weights": weights_of["detector+sam"]}
    for r in routes.values():
        r["images"] = int(sum(keep))
    ranking = denoiser_ranking(rendered.models, seed=config.seed)
    result = {
        "benchmark": "quality", "preset": config.preset, "model_id": model_identity(config.diffusion, device, config.weights_seed),
        "pairs": n, "seed": config.seed, "steps": config.diffusion.steps, "guidance": config.diffusion.guidance,
        "mask_settings": {"capture_steps": list(m.capture_steps), "factors": list(factors),
                          "threshold": m.threshold, "self_attention_power": m.self_attention_power},
        "adherence": adh,
        "denoiser_ranking": ranking,
        "masks": routes,
        "counterfactual": {"shared_noise": counterfactual(rendered), "independent_noise": counterfactual(independent)},
        "render_seconds": round(rendered.seconds, 2),
        "machine": device_info(torch.device(device)),
    }
    if sweep:
        result["sweep"] = mask_sweep(config, rendered, keep, device, progress)
    if picture is not None:
        pairs_picture(rendered, label_maps[preset_route(config)], picture)
    return result


def _factors(config: RunConfig, rendered: RenderedSet) -> list[int]:
    from magicseg_engine.generate.attention import DEFAULT_FACTORS

    have = rendered.batches[0][1].factors if rendered.batches else []
    wanted = config.masks.attention_factors or DEFAULT_FACTORS
    return [f for f in have if f in wanted] or list(have)


def mask_sweep(config: RunConfig, rendered: RenderedSet, keep: Sequence[bool], device: str,
               progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """mIoU of the attention route over layers, steps, thresholds and self-attention refinement,
    one axis at a time around the configured settings, on the same images."""
    m = config.masks
    factors = rendered.batches[0][1].factors
    base = {"factors": tuple(_factors(config, rendered)), "steps": tuple(m.capture_steps), "threshold": m.threshold,
            "self_attention_power": m.self_attention_power}
    axes = {
        "factors": [tuple(c) for r in range(1, len(factors) + 1) for c in itertools.combinations(factors, r)],
        "steps": [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.75, 1.0)],
        "threshold": ["otsu", 0.3, 0.4, 0.5, 0.6],
        "self_attention_power": [0, 1, 2, 4],
    }
    variants = [dict(base)]
    for axis, values in axes.items():
        for v in values:
            if v != base[axis]:
                variants.append({**base, axis: v})
    rows = []
    for i, v in enumerate(variants):
        annotator = _annotator(config, "attention", device, {"threshold": v["threshold"]})
        maps = annotate(rendered, annotator, v["steps"], v["factors"], v["self_attention_power"])
        score = score_masks(rendered, maps, keep)
        rows.append({"factors": list(v["factors"]), "steps": list(v["steps"]), "threshold": v["threshold"],
                     "self_attention_power": v["self_attention_power"], "miou": score["miou"]})
        if progress:
            progress("sweep", i + 1, len(variants))
    return rows


def chart(result: dict, path) -> None:
    """A bar chart of mIoU per mask route and of adherence and counterfactual fidelity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    routes = result["masks"]
    names = list(routes)
    a.barh(names, [routes[r]["miou"] for r in names],
           color=["#bbbbbb" if "random" in routes[r]["weights"] else "#3b7dd8" for r in names])
    a.invert_yaxis()
    a.set_xlim(0, 1)
    a.set_xlabel("mIoU against the colour truth (grey: a route with random weights)")
    a.set_title(f"masks, {result['preset']} preset, {routes[names[0]]['images']} adherent pairs")
    cf = result["counterfactual"]
    labels = ["adherence", "class absent\n(shared)", "class absent\n(independent)", "agreement\n(shared)",
              "agreement\n(independent)"]
    values = [result["adherence"]["all_classes"], cf["shared_noise"]["class_absent"],
              cf["independent_noise"]["class_absent"], cf["shared_noise"]["pixel_agreement_outside"],
              cf["independent_noise"]["pixel_agreement_outside"]]
    b.bar(range(len(values)), values, color=["#444444", "#2a9d8f", "#e9c46a", "#2a9d8f", "#e9c46a"])
    b.set_xticks(range(len(values)), labels, fontsize=8)
    b.set_ylim(0, 1)
    b.set_title("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pairs_picture(rendered: RenderedSet, label_maps: Sequence[np.ndarray], path, count: int = 6,
                  scale: int = 4) -> None:
    """A PNG of the first `count` pairs: positive, its masks over it, the truth, the negative."""
    from PIL import Image

    from magicseg_engine.report.thumbnails import class_colours, overlay_mask

    rows = []
    for i in range(min(count, len(rendered.classes))):
        names = rendered.classes[i]
        colours = class_colours(names)
        pos, neg = rendered.positives[i], rendered.negatives[i]
        masks = overlay_mask(pos, label_maps[i], names, colours)
        truth = overlay_mask(pos, truth_labels(pos, names), names, colours)
        rows.append(np.concatenate([pos, masks, truth, neg], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
