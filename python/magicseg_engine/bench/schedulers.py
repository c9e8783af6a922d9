"""`bench schedulers`: speed against quality for each sampler, step count and fast level, in the shapes world.

Fewer denoising steps are the cheapest speed-up there is, and the riskiest for a dataset: the
masks come from the cross-attention of the very steps that are cut. For each scheduler and
step count this renders the same pairs (same prompts, same seeds) and scores them with
`bench quality`'s measures: mask mIoU of the preset's own route against the colour truth,
the negatives from which the class is really gone, how much of the image outside the object
the pair shares, prompt adherence, and the seconds each pair took. The first combination is
the baseline the others are compared with. Fast mode (`generate --fast`, which reuses the UNet's
deep features between full steps) is a third axis, so its cost is read off the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from magicseg_engine.config import RunConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import SCHEDULERS


def check_grid(schedulers: Sequence[str], steps: Sequence[int], fast: Sequence[int] = (0,)) -> None:
    """UsageError unless every scheduler and fast level is known and every step count is at least 2."""
    from magicseg_engine.generate.fast import FAST_LEVELS

    wrong = [level for level in fast if level not in FAST_LEVELS]
    if wrong or not fast:
        raise UsageError(f"--fast: {wrong[0] if wrong else 'none given'!r} is not a fast level; "
                         f"choose from {', '.join(map(str, sorted(FAST_LEVELS)))}")
    unknown = [s for s in schedulers if s not in SCHEDULERS]
    if unknown or not schedulers:
        raise UsageError(f"--schedulers: {unknown[0] if unknown else 'none given'!r} is not a scheduler; "
                         f"choose from {', '.join(SCHEDULERS)}")
    if not steps or min(steps) < 2:
        raise UsageError("--steps needs step counts of at least 2 (the masks read the last quarter of the steps)")


def run_scheduler_sweep(config: RunConfig, records, schedulers: Sequence[str], steps: Sequence[int],
                        device: str = "cpu", batch_size: int = 16,
                        progress: Callable[[str, int, int], None] | None = None, fast: Sequence[int] = (0,)) -> dict:
    """One row per (scheduler, steps, fast level), each rendered from `records` under `config`
    with those three changed."""
    import torch

    from magicseg_engine.bench.common import device_info
    from magicseg_engine.bench.quality import (
        _annotator, _factors, adherence, annotate, counterfactual, preset_route, render_set, score_masks,
    )
    from magicseg_engine.generate.models import model_identity

    check_grid(schedulers, steps, fast)
    route = preset_route(config)
    # The mask stage does not depend on the sampler: one annotator (and one SAM) serves every row.
    annotator = _annotator(config, route, device)
    grid = [(s, n, f) for s in schedulers for n in steps for f in fast]
    # One untimed batch first: the first rendering of a process pays one-off costs (kernel
    # selection, allocator growth) that would otherwise count against the baseline row alone.
    render_set(config, records[:batch_size], device, batch_size)
    rows = []
    for i, (scheduler, count, level) in enumerate(grid):
        cfg = config.model_copy(update={"diffusion": config.diffusion.model_copy(
            update={"scheduler": scheduler, "steps": count, "fast": level})})
        rendered = render_set(cfg, records, device, batch_size)
        adh = adherence(rendered.positives, rendered.classes)
        keep = adh.pop("_coloured")
        maps = annotate(rendered, annotator, cfg.masks.capture_steps, _factors(cfg, rendered),
                        cfg.masks.self_attention_power)
        masks = score_masks(rendered, maps, keep)
        cf = counterfactual(rendered)
        rows.append({"scheduler": scheduler, "steps": count, "fast": level, "mask_miou": masks["miou"], "images_scored": int(sum(keep)),
                     "class_absent": cf["class_absent"], "pixel_agreement_outside": cf["pixel_agreement_outside"],
                     "adherence_colour": adh["all_classes_colour"], "adherence": adh["all_classes"],
                     "seconds_per_pair": rendered.seconds / max(1, len(records))})
        if progress:
            progress("render and score", i + 1, len(grid))
    base = rows[0]
    for row in rows:
        row["speedup"] = base["seconds_per_pair"] / row["seconds_per_pair"] if row["seconds_per_pair"] else None
        row["miou_change"] = row["mask_miou"] - base["mask_miou"]
    return {"benchmark": "schedulers", "preset": config.preset, "model_id": model_identity(config.diffusion),
            "pairs": len(records), "seed": config.seed, "mask_route": route, "guidance": config.diffusion.guidance,
            "baseline": {"scheduler": base["scheduler"], "steps": base["steps"], "fast": base["fast"]}, "rows": rows,
            "machine": device_info(torch.device(device))}
