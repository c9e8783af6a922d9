"""Write benchmarks/results/README.md, and a PNG chart per `bench all` result, from the JSON beside it.

    python benchmarks/summarize.py

Each row is one measured ratio: this engine against the baseline measured in the same run; the
quality and ablation rows are scores in the shapes world (`bench quality`, `bench ablation`).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def headline(name: str, data: dict) -> list[tuple[str, str, str]]:
    """(what, ratio, detail) rows for one result file."""
    if data.get("benchmark") == "generate":
        e, r = data["engine"], data["reference"]
        frac = data.get("fraction_of_ceiling")
        return [("pairs/s, engine vs batch-1 reference loop", f"{data['speedup']:.2f}x",
                 f"{e['pairs_per_s']:.2f} vs {r['pairs_per_s']:.2f} pairs/s; UNet step {e['ms_per_unet_step']:.1f} ms "
                 f"({e['unet_rows_per_step']} rows); "
                 + (f"{100 * frac:.1f}% of the FLOP ceiling" if frac is not None else "no FLOP ceiling for this device"))]
    if data.get("benchmark") == "masks":
        c = data["capture"]
        size = "x".join(map(str, c["size"])) if "size" in c else "preset size"
        rows = [("attention capture: added time per denoising step", f"{100 * c['overhead']:.1f}%",
                 f"{c['layers']} layers, {c['kernel']}, {size}"
                 + (f"; positives only {100 * c['overhead_positives_only']:.1f}%" if "overhead_positives_only" in c else "")
                 + (f"; CPU seconds {100 * c['overhead_cpu_seconds']:.1f}%" if "overhead_cpu_seconds" in c else ""))]
        if "sam" in data:
            s = data["sam"]
            rows.append(("SAM batched vs SamPredictor one prompt at a time", f"{s['speedup']:.2f}x", f"{s['images']} images"))
        return rows
    if data.get("benchmark") == "backends":
        others = [b for b in data.get("backends", ["torch", "onnxruntime"]) if b != "torch"]
        return [(f"{r['component']} batch {r['batch']}, {b} vs eager torch", f"{r[b + '_speedup']:.2f}x",
                 f"{1e3 * r[b]['median_s']:.1f} vs {1e3 * r['torch']['median_s']:.1f} ms")
                for r in data["results"] for b in others]
    if data.get("benchmark") == "pretrain":
        lo, st = data["loaders"], data["step"]
        rows = []
        if "dali_speedup" in lo:
            rows.append(("loader images/s, DALI vs torch", f"{lo['dali_speedup']:.2f}x",
                         f"{lo['dali']['images_per_s']:.0f} vs {lo['torch']['images_per_s']:.0f} images/s "
                         f"at {data['image_size']} px"))
        if st.get("fused_speedup") is not None:
            rows.append(("training step, fused vs eager losses", f"{st['fused_speedup']:.2f}x", ""))
        else:
            rows.append(("training step (eager losses)", f"{1e3 * st['eager']['median_s']:.0f} ms",
                         f"{st['eager']['images_per_s']:.0f} images/s; fused losses need a GPU"))
        return rows
    if data.get("benchmark") == "all":
        return [(f"{r['bench']}: {r['compared']}", "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                 ("-" if r["ours"] is None else f"{r['ours']:.3g}") + f" vs {r['baseline']:.3g} {r['unit']}"
                 + (f"; {r['note']}" if r["note"] else ""))
                for r in data["summary"]]
    if data.get("benchmark") == "tune":
        ref = data["reference"]["pairs_per_s"]
        rows = []
        for v in data["variants"]:
            if "error" in v:
                rows.append((f"{v['variant']}, prompts to shards vs reference pipeline", "failed", v["error"]))
                continue
            frac = v["unet"]["fraction_of_peak"]
            rows.append((f"{v['variant']}, prompts to shards vs reference pipeline",
                         f"{v['best']['pairs_per_s'] / ref:.2f}x",
                         f"{v['best']['pairs_per_s']:.3g} vs {ref:.3g} pairs/s at batch {v['best']['batch_size']}; "
                         f"UNet {v['unet']['tflops_per_s']:.3g} TFLOP/s"
                         + ("" if frac is None else f" ({100 * frac:.1f}% of the dense peak)")))
        aims = data["aims"]
        e2e, unet = aims["end_to_end_speedup"], aims["unet_fraction_of_peak"]
        rows.append((f"aims of the GPU pass (sd15-random): {e2e['target']:g}x end to end, "
                     f"{100 * unet['target']:g}% of the UNet's peak",
                     "met" if e2e["met"] and unet["met"] else "not met",
                     f"{e2e['measured']:.2f}x; "
                     + ("no FLOP ceiling known for this device" if unet["measured"] is None
                        else f"{100 * unet['measured']:.1f}% of the peak")))
        return rows
    if data.get("benchmark") == "quality":
        adh, cf = data["adherence"], data["counterfactual"]
        rows = [(f"mask mIoU, {route} ({r['weights']})", f"{r['miou']:.3f}",
                 f"{r['images']} of {data['pairs']} pairs, {r['classes']} classes")
                for route, r in data["masks"].items()]
        rows.append(("prompt adherence: every requested class drawn", f"{adh['all_classes']:.3f}",
                     f"colour alone {adh['all_classes_colour']:.3f}; a random shape would be right "
                     f"{adh['chance_shape_given_colour']:.3f} of the time"))
        rank = data.get("denoiser_ranking")
        if rank:
            rows.append(("denoiser ranking: the true shape's caption has the lowest loss", f"{rank['shape_first']:.3f}",
                         f"true colour first {rank['colour_first']:.3f}; chance {rank['chance']['shape']:.3f}; "
                         f"{rank['images']} true images"))
        for noise in ("shared_noise", "independent_noise"):
            c = cf[noise]
            rows.append((f"counterfactual, {noise.replace('_', ' ')}: class absent from the negative",
                         f"{c['class_absent']:.3f}", f"pixel agreement outside the object {c['pixel_agreement_outside']:.3f}"))
        return rows
    if data.get("benchmark") == "quality-sweep":
        last = data["rounds"][-1]
        return [(f"attention masks: layers at factors {r['factors']}, steps {r['steps']}, threshold {r['threshold']}, "
                 f"self-attention power {r['self_attention_power']}", f"{r['miou']:.3f}", "mIoU, last round of the sweep")
                for r in last]
    if data.get("benchmark") == "fast":
        return [(f"fast level {r['level']} vs full mode, pairs/s (mask IoU, map cosine, PSNR against full mode)",
                 f"{r['speedup']:.2f}x", f"{'-' if r['mask_iou'] is None else format(r['mask_iou'], '.3f')}, "
                 f"{r['map_cosine']:.4f}, {r['image_psnr']:.1f} dB; {data['pairs']} pairs, {data['steps']} steps")
                for r in data["levels"]]
    if data.get("benchmark") == "schedulers":
        base = data["baseline"]
        return [(f"{r['scheduler']}, {r['steps']} steps, fast {r.get('fast', 0)} vs {base['scheduler']}, {base['steps']}, "
                 f"fast {base.get('fast', 0)}: speed-up "
                 f"(mask mIoU, class absent)", f"{r['speedup']:.2f}x",
                 f"{r['mask_miou']:.3f}, {r['class_absent']:.3f}; {data['pairs']} pairs, masks by {data['mask_route']}")
                for r in data["rows"]]
    if data.get("benchmark") == "ablation":
        setting = (f"{data['pairs']} pairs, {data['pretrain_steps']} steps, {data.get('text_tower', 'random')} text tower, "
                   f"seed {data['seed']}")

        def found(r: dict) -> str:
            # Results written before the breakdown existed have none.
            if r.get("foreground_iou") is None:
                return ""
            return (f"; objects found {r['foreground_iou']:.3f}, right colour {r['colour_accuracy']:.3f}, "
                    f"right shape {r['shape_accuracy']:.3f}")
        return [(f"segmentation model, {arm}: mIoU (all / seen / unseen classes)", f"{r['miou']:.3f}",
                 f"{r['miou_seen']:.3f} / {r['miou_unseen']:.3f}{found(r)}; {setting}")
                for arm, r in data["arms"].items()]
    if data.get("benchmark") == "flops":
        gpus = list(data["peaks_tflops"])
        return [(f"{r['preset']} ({r['family']}, {r['height']}x{r['width']}, {r['steps']} steps): FLOPs per guided "
                 f"pair vs {data['baseline']}", f"{r['vs_first']:.2f}x",
                 f"{r['pair_tflops']:.1f} TFLOP per pair, UNet {r['unet_tflops_per_row']:.2f} TFLOP per row "
                 f"({100 * r['unet_share']:.0f}% of the pair); pairs/s at the dense peak: "
                 + ", ".join(f"{g} {r['ceiling_pairs_per_s'][g]:.3g}" for g in gpus))
                for r in data["rows"]]
    if "components" in data and "model_id" in data:  # a build-engines manifest
        return [(f"{e['component']} exported ({e['precision']}), onnxruntime vs torch: largest relative difference",
                 "-" if "onnxruntime_parity" not in e else f"{e['onnxruntime_parity']['max_rel']:.2e}",
                 ", ".join(f"{k} {v}" for k, v in e["input_shapes"].items())
                 + (f"; engine {e['engine']}" if "engine" in e else ""))
                for e in data["components"]]
    if "headline" in data:  # one benchmark of the suite run alone (bench unet, bench sam, ...)
        h = data["headline"]
        return [(f"{h['bench']}: {h['compared']}", "-" if h["ratio"] is None else f"{h['ratio']:.2f}x",
                 ("-" if h["ours"] is None else f"{h['ours']:.3g}") + f" vs {h['baseline']:.3g} {h['unit']}"
                 + (f"; {h['note']}" if h["note"] else ""))]
    rows = []
    for key, value in data.get("ratios", {}).items():
        if "speedup" in key and "all_threads" in key:
            rows.append((key.replace("_", " "), f"{value:.2f}x", ""))
    return rows


def _two_panels():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4))


def _save(fig, data: dict, bench: str, out: Path) -> Path:
    """Title the figure with the bench, preset, device and date, and write it to `out`."""
    import matplotlib.pyplot as plt

    machine = data.get("machine", {})
    where = machine.get("gpu") or f"CPU, {machine.get('cpu_count')} cores"
    fig.suptitle(f"bench {bench}, preset {data.get('preset')}: {where}, {machine.get('date', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def chart_all(data: dict, out: Path) -> Path:
    """Two panels: each benchmark's ratio over its baseline, and UNet throughput against batch rows."""
    fig, (left, right) = _two_panels()
    measured = [r for r in data["summary"] if r["ratio"] is not None]
    left.barh([r["bench"] for r in measured], [r["ratio"] for r in measured], color="#4c72b0")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_xlabel("ratio over the baseline measured in the same run")
    left.invert_yaxis()
    for i, r in enumerate(measured):
        left.text(r["ratio"], i, f" {r['ratio']:.2f}x", va="center")
    unet = data["results"].get("unet")
    if unet:
        rows = [r["rows"] for r in unet["rows"]]
        right.plot(rows, [r["rows_per_s"] for r in unet["rows"]], marker="o")
        right.set_xscale("log", base=2)
        right.set_xlabel("UNet latent rows per call (2 = reference, 4 per pair)")
        right.set_ylabel("rows/s")
        right.set_title("UNet throughput against batch")
    return _save(fig, data, "all", out)


def chart_tune(data: dict, out: Path) -> Path:
    """Pairs/s against batch size per variant beside the reference, and each variant's UNet TFLOP/s."""
    fig, (left, right) = _two_panels()
    ran = [v for v in data["variants"] if "error" not in v]
    for v in ran:
        left.plot([r["batch_size"] for r in v["pipeline"]], [r["pairs_per_s"] for r in v["pipeline"]],
                  marker="o", label=v["variant"])
    left.axhline(data["reference"]["pairs_per_s"], color="black", linestyle="--", linewidth=0.8,
                 label="reference pipeline")
    left.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for v in ran for r in v["pipeline"]})
    left.set_xticks(sizes, [str(b) for b in sizes])
    left.set_xlabel("pairs per UNet call")
    left.set_ylabel("pairs/s, prompts to shards with masks")
    left.legend(fontsize=8)
    right.barh([v["variant"] for v in ran], [v["unet"]["tflops_per_s"] for v in ran], color="#4c72b0")
    if data.get("dense_peak_tflops"):
        right.axvline(data["dense_peak_tflops"], color="black", linewidth=0.8)
        right.axvline(data["dense_peak_tflops"] / 2, color="black", linestyle="--", linewidth=0.8)
        right.set_title("UNet TFLOP/s (lines: dense peak and half of it)")
    else:
        right.set_title("UNet TFLOP/s")
    right.invert_yaxis()
    return _save(fig, data, "tune", out)


def _where(data: dict) -> str:
    machine = data.get("machine", {})
    return machine.get("gpu") or f"CPU ({machine.get('cpu_count') or machine.get('logical_cpus')} cores)"


def at_a_glance(results: list[tuple[str, dict]]) -> list[str]:
    """The page's first section: end to end against the reference loop and the FLOP ceiling per
    device and preset, what attention capture adds to a denoising step, and the fast-mode table."""
    lines = ["## At a glance", ""]
    tunes = [(n, d) for n, d in results if d.get("benchmark") == "tune" and "best" in d]
    if tunes:
        lines += ["| device | preset | best variant, batch | pairs/s | reference pairs/s | end to end (aim 8x) "
                  "| UNet, fraction of the dense peak (aim 50%) | file |", "|---|---|---|---|---|---|---|---|"]
        for name, d in tunes:
            best, ref = d["best"], d["reference"]["pairs_per_s"]
            ratio = best["pairs_per_s"] / ref
            frac = d.get("unet_best", {}).get("fraction_of_peak")
            unet = "no peak known for this device" if frac is None else f"{100 * frac:.1f}% ({50 - 100 * frac:+.1f} points to go)"
            lines.append(f"| {_where(d)} | {d.get('preset', '?')} | {best['variant']}, {best['batch_size']} "
                         f"| {best['pairs_per_s']:.3g} | {ref:.3g} | {ratio:.2f}x ({ratio / 8:.0%} of the aim) | {unet} | {name} |")
        lines.append("")
    masks = [(n, d) for n, d in results if d.get("benchmark") == "masks" and "overhead_positives_only" in d.get("capture", {})]
    if masks:
        lines += ["Attention capture, time added to denoising (same run, modes taking turns):", "",
                  "| device | preset, size, steps | both images (generate) | positives only | CPU seconds, both images | kernel | file |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in masks:
            c = d["capture"]
            cpu = (f"{100 * c['overhead_cpu_seconds']:.1f}% ({c['threads']} threads)"
                   if "overhead_cpu_seconds" in c else "-")
            lines.append(f"| {_where(d)} | {d.get('settings', {}).get('preset', '?')}, {'x'.join(map(str, c['size']))}, "
                         f"{c['steps']} | {100 * c['overhead']:.1f}% | {100 * c['overhead_positives_only']:.1f}% "
                         f"| {cpu} | {c['kernel']} | {name} |")
        lines.append("")
    fast = [(n, d) for n, d in results if d.get("benchmark") == "schedulers" and any(r.get("fast") for r in d["rows"])]
    for name, d in fast:
        lines += [f"Fast mode (`generate --fast`), {d['preset']} preset, {d['pairs']} pairs, masks by {d['mask_route']} "
                  f"({name}):", "", "| scheduler, steps | fast | speed-up | mask mIoU | class absent from negatives |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['scheduler']}, {r['steps']} | {r.get('fast', 0)} | {r['speedup']:.2f}x | {r['mask_miou']:.3f} "
                  f"| {r['class_absent']:.3f} |" for r in d["rows"]]
        lines.append("")
    agreement = [(n, d) for n, d in results if d.get("benchmark") == "fast"]
    if agreement:
        lines += ["Fast mode against full mode on the same pairs and seeds (`bench fast`, modes taking turns):", "",
                  "| device | preset, size, steps, pairs | fast | speed-up | mask IoU | map cosine | PSNR | file |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, d in agreement:
            for r in d["levels"]:
                iou = "-" if r["mask_iou"] is None else f"{r['mask_iou']:.3f}"
                lines.append(f"| {_where(d)} | {d.get('settings', {}).get('preset', '?')}, {'x'.join(map(str, d['size']))}, "
                             f"{d['steps']}, {d['pairs']} | {r['level']} | {r['speedup']:.2f}x | {iou} "
                             f"| {r['map_cosine']:.4f} | {r['image_psnr']:.1f} dB | {name} |")
        lines.append("")
    return lines if len(lines) > 2 else []


GPU_PASS = """## Running the GPU pass

On a GPU machine that is bare and has no network, the pass needs the wheels its image lacks.
Where pip reaches an index, from the repository root:

    bash benchmarks/wheelhouse.sh          # .whl/: 16 wheels, about 12 MB, ignored by git

Then on the GPU machine, from a copy of the repository with `.whl/` beside it:

    bash benchmarks/gpu_pass.sh

It installs the wheels and the project (editable, over the machine's torch), runs the `gpu`
tests (Triton kernels first), measures the headline (`bench tune` on sd15-random, bf16 at batch 8
and 16 against the reference pipeline, the UNet's TFLOP/s against a bf16 matmul measured in the
same run), then extras while time is left, each stage within its own budget and the whole under
7 minutes. Each stage writes its file the moment it ends, into `$OUT` when that is set, else
`benchmarks/results/gpu-pass/`: `install.json`, `correctness.json`, `headline.json`,
`extras.json`, `pass.json` (plan, status and time of each stage) and `log.txt`. `headline.json`
is a `bench tune` result: copy it here under the name in its `pass_summary.results_name` and run
`python benchmarks/summarize.py`. A rehearsal on the CPU (tiny preset, pip not run), about a
minute, from outside the checkout: `python /path/to/checkout/benchmarks/gpu_pass.py --dry-run --out /tmp/gpu-pass`.
"""


def main() -> None:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/summarize.py` from the JSON files here; each file also records",
             "the machine, library versions, repetitions and the spread. Ratios compare this engine with a",
             "baseline measured in the same run.", ""]
    lines += at_a_glance([(p.stem, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))])
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        machine = data.get("machine", {})
        cores = machine.get("cpu_count") or machine.get("logical_cpus")
        where = machine.get("gpu") or f"CPU ({cores} logical cores)"
        if data.get("benchmark") == "flops":
            where = "none: counted on the meta device, the same on any machine"
        lines += [f"## {path.stem}", "", f"Device: {where}", "", "| measurement | ratio | detail |", "|---|---|---|"]
        lines += [f"| {w} | {r} | {d} |" for w, r, d in headline(path.stem, data)]
        lines.append("")
        charts = {"all": chart_all, "tune": chart_tune}
        if data.get("benchmark") in charts:
            chart = charts[data["benchmark"]](data, path.with_suffix(".png"))
            lines += [f"![{path.stem}]({chart.name})", ""]
    if not any("gpu" in json.loads(p.read_text()).get("machine", {}) for p in RESULTS.glob("*.json")):
        lines += ["## GPU", "", "No GPU result yet: no GPU machine has run these benchmarks. The `sd15-random`",
                  "numbers (pairs/s end to end at 512×512, 20 steps, guidance 7.5, for each backend, precision,",
                  "memory layout and batch size; UNet TFLOP/s and the fraction of the dense FLOP ceiling) come",
                  "from `bash benchmarks/gpu_pass.sh` on a GPU (the staged pass below; `gpu_pass.sh both` runs the",
                  "whole `bench tune` and `bench all` with `--preset sd15-random`).", ""]
    lines += GPU_PASS.splitlines()
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
