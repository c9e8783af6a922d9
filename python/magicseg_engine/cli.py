"""The `magicseg-engine` command line: thin wrappers that parse flags and call the stages."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from magicseg_engine.errors import UsageError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Turn class names into a segmentation pretraining dataset and pretrain on it.",
)
stdout = Console()
stderr = Console(stderr=True)


def _setup_logging() -> None:
    handler = RichHandler(console=stderr, show_time=False, show_path=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)


def reports_usage_errors(command):
    """Turn UsageError into one red line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        global _held
        from magicseg_engine import disk_space

        _setup_logging()
        disk_space.clear_notes()
        try:
            with contextlib.ExitStack() as _held:
                return command(*args, **kwargs)
        except UsageError as err:
            # The message is plain text: brackets in it ("magicseg-engine[onnx]") are not markup.
            stderr.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=UsageError.exit_code) from None
        except OSError as err:
            # A full or failing disk (raised on any thread: the shard writer's errors reach this
            # one): one line with the file, the free space and what to do, no traceback.
            if not disk_space.is_disk_error(err):
                raise
            line = disk_space.describe_write_error(err, _retry_hint(command, kwargs))
            stderr.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=disk_space.EXIT_CODE) from None

    return wrapper


def _retry_hint(command, kwargs) -> str:
    """How to continue a command that stopped part-way: with --resume where it has one."""
    import inspect

    if "resume" not in inspect.signature(command).parameters or kwargs.get("resume"):
        return "run the same command again"
    return "run the same command with --resume" + (" in place of --overwrite" if kwargs.get("overwrite") else "")


# What the running command holds until it ends (reports_usage_errors opens and closes it).
_held: contextlib.ExitStack | None = None


def _hold_run_directory(out: Path) -> None:
    """Hold the run in `out` until the command ends; refuse it if another process writes it (run_lock.py)."""
    from magicseg_engine.run_lock import run_directory_lock

    _held.enter_context(run_directory_lock(out))


def resumes_after_signals(command):
    """SIGINT (Ctrl-C) and SIGTERM stop a run cleanly (pipeline.stop_on_signals), then one line
    says what is kept and how to continue; exit code 128 + the signal's number, as shells report."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from magicseg_engine.pipeline import Interrupted, stop_on_signals

        try:
            with stop_on_signals():
                return command(*args, **kwargs)
        except Interrupted as stop:
            out = kwargs.get("out")
            stderr.print(f"stopped by {stop.name}: {_finished_pairs(out)} pairs are finished in {out} and kept; "
                         f"{_retry_hint(command, kwargs)} to continue", highlight=False, soft_wrap=True)
            raise typer.Exit(code=128 + stop.signum) from None

    return wrapper


def _finished_pairs(out) -> int:
    from magicseg_engine.data.shards import RunState

    try:
        return len(RunState.load(out, verify=False, repair=False).finished)
    except Exception:  # the count is a courtesy; the hint must print whatever the directory holds
        return 0


class RateColumn(ProgressColumn):
    """Items per second over rich's recent window, with the unit the task names."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:.2f} {unit}/s" if task.speed else f"-- {unit}/s", style="cyan")


def progress_bar(transient: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=stderr, transient=transient,
    )


def resumable_progress(bar: Progress, description: str, unit: str):
    """A `progress(n, total)` callback for stages that resume: the first call reports the work
    already on disk, shown as done but not counted in the rate; later calls add new work."""
    task = bar.add_task(description, total=None, unit=unit)
    first = True

    def advance(n: int, total: int) -> None:
        nonlocal first
        if first:
            bar.reset(task, total=total, completed=n)
            first = False
        else:
            bar.advance(task, n)

    return advance


def staged_progress(bar: Progress):
    """A `progress(stage, done, total)` callback: one bar per stage, added when it first reports."""
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, unit="items")
        bar.update(tasks[stage], completed=done)

    return update


BACKEND_HELP = ("torch, compile (torch.compile; CUDA graphs on a GPU), onnxruntime or tensorrt "
                "(these two run the files of --engines).")
ENGINES_HELP = "Folder written by build-engines, for --backend onnxruntime or tensorrt."
WEIGHTS_SEED_HELP = ("Seed of random weights: the tiny and -random presets' models, and SAM and the detector "
                     "without a checkpoint. Apart from --seed, so engines built once serve every sampling seed.")


@app.command()
@reports_usage_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """What is installed here and which backends work."""
    from magicseg_engine.doctor import as_dict, run_checks

    checks = run_checks()
    if as_json:
        sys.stdout.write(json.dumps(as_dict(checks), indent=2) + "\n")
        return
    table = Table(title="magicseg-engine doctor", show_lines=False)
    table.add_column("component")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[yellow]not available[/]", c.detail)
    stdout.print(table)


class AttentionKernel(str, Enum):
    auto = "auto"
    flash = "flash"
    efficient = "efficient"
    cudnn = "cudnn"
    math = "math"


class MaskSource(str, Enum):
    attention = "attention"
    detector = "detector"
    attention_detector = "attention+detector"
    none = "none"


def _parse_threshold(text: str | None) -> float | str | None:
    if text is None or text == "otsu":
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--mask-threshold {text!r}: use otsu or a number in (0, 1)") from None


class Source(str, Enum):
    templates = "templates"
    llm = "llm"
    file = "file"
    world = "world"


@app.command()
@reports_usage_errors
def prompts(
    out: Annotated[Path, typer.Option("--out", help="Output JSON-lines file.")],
    classes: Annotated[Optional[str], typer.Option("--classes", help="voc, context, coco-object, coco-stuff, shapes, or a class file (one per line).")] = None,
    num: Annotated[Optional[int], typer.Option("--num", help="Number of prompts (with --source file: at most this many).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed: class sampling, templates and per-sample seeds.")] = 0,
    source: Annotated[Source, typer.Option("--source", help="Where descriptions come from.")] = Source.templates,
    max_classes: Annotated[int, typer.Option("--max-classes", help="At most this many classes per sample.")] = 2,
    negative_token: Annotated[str, typer.Option("--negative-token", help="Replaces each class mention in the negative prompt.")] = "nothing",
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="With --source file: lines 'cls1,cls2: description' or JSON lines.")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="With --source file: skip and count bad lines instead of stopping.")] = False,
    llm_base_url: Annotated[Optional[str], typer.Option("--llm-base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1.")] = None,
    llm_model: Annotated[Optional[str], typer.Option("--llm-model", help="Chat model name.")] = None,
    llm_api_key_env: Annotated[Optional[str], typer.Option("--llm-api-key-env", help="Environment variable that holds the API key.")] = None,
    llm_concurrency: Annotated[Optional[int], typer.Option("--llm-concurrency", help="Requests in flight at once.")] = None,
    llm_max_retries: Annotated[Optional[int], typer.Option("--llm-max-retries", help="Retries per request on 429, 5xx and timeouts.")] = None,
    llm_timeout: Annotated[Optional[float], typer.Option("--llm-timeout", help="Seconds to wait for one reply.")] = None,
    llm_cache: Annotated[Optional[Path], typer.Option("--llm-cache", help="Cache of answered requests (default: beside --out).")] = None,
) -> None:
    """Write positive and counterfactual negative prompts as JSON lines."""
    from pydantic import ValidationError

    from magicseg_engine.atomic import check_writable_dir
    from magicseg_engine.config import PromptsConfig, describe_validation_error, save_config
    from magicseg_engine.prompts import build_prompts, write_records
    from magicseg_engine.vocab import load_vocabulary

    llm = {"base_url": llm_base_url, "model": llm_model, "api_key_env": llm_api_key_env, "concurrency": llm_concurrency,
           "max_retries": llm_max_retries, "timeout_s": llm_timeout}
    try:
        config = PromptsConfig(
            source=source.value, max_classes_per_sample=max_classes, negative_token=negative_token, seed=seed,
            llm={k: v for k, v in llm.items() if v is not None},
        )
    except ValidationError as err:
        raise UsageError(f"invalid option: {describe_validation_error(err)}") from None
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file path such as {out / 'prompts.jsonl'}")
    check_writable_dir(out.parent)
    vocab = load_vocabulary(classes) if classes else None
    cache = llm_cache or out.with_name(out.stem + ".llm-cache.jsonl")

    with progress_bar() as bar:
        total = num if config.source != "file" else None
        task = bar.add_task(f"prompts ({config.source})", total=total)
        result = build_prompts(
            config, vocab=vocab, num=num, prompt_file=prompt_file, skip_invalid=skip_invalid,
            llm_cache=cache if config.source == "llm" else None,
            progress=lambda n: bar.advance(task, n),
        )
    written = write_records(out, result.records)
    per_class = Counter(c for r in result.records for c in r.classes)
    per_sample = Counter(len(r.classes) for r in result.records)
    summary = {
        "written": written,
        "classes_used": len(per_class),
        "samples_per_class": {"min": min(per_class.values()), "max": max(per_class.values())},
        "classes_per_sample": {str(k): v for k, v in sorted(per_sample.items())},
        "skipped_lines": len(result.skipped_lines),
        "duplicates_dropped": result.duplicates,
    }
    if result.llm_stats is not None:
        from dataclasses import asdict

        summary["llm"] = asdict(result.llm_stats)
    save_config(config, out.with_name(out.stem + ".config.json"), output=out.name,
                vocabulary=vocab.name if vocab else None, summary=summary)
    for lineno, reason in result.skipped_lines[:20]:
        logging.getLogger("magicseg_engine").warning("skipped %s:%d: %s", prompt_file, lineno, reason)
    stderr.print(
        f"wrote [bold]{written}[/] prompts to {out} "
        f"({summary['classes_used']} classes, {summary['samples_per_class']['min']}-"
        f"{summary['samples_per_class']['max']} samples each"
        + (f", {len(result.skipped_lines)} invalid lines skipped" if result.skipped_lines else "")
        + ")",
        highlight=False,
    )


@app.command()
@reports_usage_errors
@resumes_after_signals
def generate(
    out: Annotated[Path, typer.Option("--out", help="Run directory: shards, manifest, prompts and run.json.")],
    preset: Annotated[str, typer.Option("--preset", help="tiny, shapes, sd15-random, sd21-random, sdxl-random, sd15, sd21 or sdxl.")] = "tiny",
    classes: Annotated[Optional[str], typer.Option("--classes", help="voc, context, coco-object, coco-stuff, shapes, or a class file.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts to render (from `prompts`, or reference lines).")] = None,
    num_pairs: Annotated[Optional[int], typer.Option("--num-pairs", help="Number of positive/negative pairs.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out, skipping finished pairs.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per UNet call (halved automatically on out-of-memory).")] = 8,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="Image height and width.")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="ddim, dpm-solver++ (2M), euler or unipc.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed: classes, prompts and per-pair noise (the weights: --weights-seed).")] = 0,
    weights_seed: Annotated[int, typer.Option("--weights-seed", help=WEIGHTS_SEED_HELP)] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Threads torch's CPU operators use (torch.set_num_threads; default: torch's, one per physical core). `bench tune --device cpu` measures which is fastest.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16. On the CPU: bfloat16 where it has AMX or AVX512-BF16, else float32; each sample records the dtype it ran in.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Diffusers folder or hub id of an SD 1.x, SD 2.x or SDXL model (presets sd15, sd21, sdxl).")] = None,
    independent_noise: Annotated[bool, typer.Option("--independent-noise", help="Draw the negative's noise separately, as the reference did.")] = False,
    fast: Annotated[Optional[int], typer.Option("--fast", help="Fast mode: 0 the whole UNet every step; 1 and 2 reuse its deep features on every other / two of three steps (--backend torch). README: what each costs in mask agreement.")] = None,
    max_classes: Annotated[int, typer.Option("--max-classes", help="At most this many classes per pair.")] = 2,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", help="Pairs per tar shard.")] = 256,
    encode_workers: Annotated[int, typer.Option("--encode-workers", help="Threads that JPEG-encode images.")] = 4,
    mask_source: Annotated[Optional[MaskSource], typer.Option("--mask-source", help="Where masks come from.")] = None,
    no_sam: Annotated[bool, typer.Option("--no-sam", help="Masks from attention alone, without SAM refinement.")] = False,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="tiny, vit_b, vit_l or vit_h (preset default if unset).")] = None,
    sam_checkpoint: Annotated[Optional[str], typer.Option("--sam-checkpoint", help="segment-anything .pth matching --sam-model.")] = None,
    mask_threshold: Annotated[Optional[str], typer.Option("--mask-threshold", help="otsu, or a fixed value in (0, 1).")] = None,
    max_counterfactual_coverage: Annotated[Optional[float], typer.Option("--max-counterfactual-coverage", help="Flag pairs whose negative still covers more of a class mask.")] = None,
    drop_failed_pairs: Annotated[bool, typer.Option("--drop-failed-pairs", help="Drop pairs that fail the counterfactual check instead of flagging them.")] = False,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "torch",
    engines: Annotated[Optional[Path], typer.Option("--engines", help=ENGINES_HELP)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC UNet and VAE weights (default: on a GPU only).")] = None,
    attention: Annotated[AttentionKernel, typer.Option("--attention", help="Hold the UNet's attention to one kernel of torch's scaled_dot_product_attention (torch and compile backends); auto lets torch choose. `bench tune` measures each.")] = AttentionKernel.auto,
    detector_model: Annotated[Optional[str], typer.Option("--detector-model", help="Grounding DINO folder or hub id (tiny: random, for tests).")] = None,
    box_threshold: Annotated[Optional[float], typer.Option("--box-threshold", help="Detector box threshold.")] = None,
    text_threshold: Annotated[Optional[float], typer.Option("--text-threshold", help="Detector text threshold.")] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="Render on a Ray cluster: a pool of workers, each with its models on one GPU, writing its own shards (pip install 'magicseg-engine[ray]').")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="HOST:PORT of a running Ray head (`ray start --head`); default: start a local Ray instance.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray workers; default: one per GPU, or one per CPU on a cluster without GPUs.")] = None,
    num_gpus_per_worker: Annotated[Optional[float], typer.Option("--num-gpus-per-worker", help="GPUs per Ray worker; 0 for CPU workers (default: 1 when the cluster has GPUs, else 0).")] = None,
    cpus_per_worker: Annotated[Optional[int], typer.Option("--cpus-per-worker", help="CPUs per Ray worker (default 1); CPU workers run this many threads.")] = None,
    ray_timeout: Annotated[Optional[float], typer.Option("--ray-timeout", help="Seconds to wait for the Ray head to answer (default 30).")] = None,
    balance: Annotated[bool, typer.Option("--balance", help="After the requested pairs, render more for the classes left with fewer usable pairs (mask found, counterfactual check passed) than asked.")] = False,
    balance_tolerance: Annotated[float, typer.Option("--balance-tolerance", help="--balance stops when every class has at least (1 - this) of its requested pairs usable.")] = 0.1,
    balance_budget: Annotated[float, typer.Option("--balance-budget", help="--balance renders at most this fraction of --num-pairs more, over all rounds.")] = 0.5,
    balance_rounds: Annotated[int, typer.Option("--balance-rounds", help="--balance tops up at most this many times.")] = 4,
    no_space_check: Annotated[bool, typer.Option("--no-space-check", help="Start even if the file system of --out seems to have too little free space for the pairs left (for file systems that report no or wrong free space, or that grow).")] = False,
) -> None:
    """Render positive/negative image pairs with shared noise, and their masks, into resumable WebDataset shards."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import (
        ExecutionOptions,
        build_mask_stage,
        build_sampler,
        generate_pairs,
        open_run,
        record_summary,
        start_run,
    )
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    if num_pairs is not None and num_pairs <= 0:
        raise UsageError(f"--num-pairs must be a positive number, got {num_pairs}")
    if batch_size <= 0 or samples_per_shard <= 0:
        raise UsageError("--batch-size and --samples-per-shard must be positive")
    if encode_workers <= 0:
        raise UsageError(f"--encode-workers must be a positive number, got {encode_workers}")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    ray_flags = {"--ray-address": ray_address, "--workers": workers, "--num-gpus-per-worker": num_gpus_per_worker,
                 "--cpus-per-worker": cpus_per_worker, "--ray-timeout": ray_timeout}
    if use_ray:
        _check_ray_flags(device)
    elif any(v is not None for v in ray_flags.values()):
        raise UsageError(f"{', '.join(k for k, v in ray_flags.items() if v is not None)}: only with --ray")
    balancing = _balance_settings(balance, balance_tolerance, balance_budget, balance_rounds, prompts_file,
                                  mask_source)
    device = _resolve_device(device)
    if threads is not None:
        if threads <= 0:
            raise UsageError(f"--threads must be a positive number, got {threads}")
        if use_ray:
            raise UsageError("--threads sets this process's threads; Ray workers run --cpus-per-worker threads each")
        import torch

        # Before any model loads, so every operator of the run, loading included, uses them.
        torch.set_num_threads(threads)
    config = load_preset(preset, {
        "seed": seed,
        "weights_seed": weights_seed,
        "prompts": {"seed": seed, "max_classes_per_sample": max_classes,
                    # Without --prompts, the preset's own source: templates, or the shapes world's captions.
                    "source": "file" if prompts_file else None},
        "diffusion": {"steps": steps, "guidance": guidance, "scheduler": scheduler, "dtype": dtype, "model": model,
                      "height": size[0] if size else None, "width": size[1] if size else None,
                      "independent_noise": independent_noise or None, "fast": fast},
        "sam": {"model_type": sam_model, "checkpoint": sam_checkpoint},
        "masks": {"source": mask_source.value if mask_source else None, "refine_with_sam": False if no_sam else None,
                  "threshold": _parse_threshold(mask_threshold),
                  "max_counterfactual_coverage": max_counterfactual_coverage,
                  "drop_failed_pairs": drop_failed_pairs or None, "detector_model": detector_model,
                  "box_threshold": box_threshold, "text_threshold": text_threshold},
    })
    # Before the run is read and any model loads: a second command on the same directory stops here.
    _hold_run_directory(out)
    records = None
    vocab = None
    if prompts_file is not None or classes is not None:
        if prompts_file is None and num_pairs is None:
            raise UsageError("--classes needs --num-pairs, the number of pairs to render")
        vocab = load_vocabulary(classes) if classes else None
        records = build_prompts(config.prompts, vocab=vocab, num=num_pairs, prompt_file=prompts_file).records
    elif not resume:
        raise UsageError("say what to render: --classes NAME|FILE with --num-pairs N, or --prompts FILE")
    plan = open_run(out, config, records, resume, overwrite)
    from magicseg_engine.pipeline import RUN_FILE

    if resume and (out / RUN_FILE).exists():
        # Continuing the run, or completing its interrupted start: either way with its own --balance.
        from magicseg_engine.balance import check_resumable

        check_resumable(json.loads((out / RUN_FILE).read_text(encoding="utf-8")), balancing)
    if balancing is not None and config.masks.source == "none":
        raise UsageError("--balance counts the pairs whose class has a mask; it needs masks (drop --mask-source none)")
    requested = _requested_pairs(out, plan, records)
    options = ExecutionOptions(device=device, batch_size=batch_size, samples_per_shard=samples_per_shard,
                               encode_workers=encode_workers, channels_last=channels_last, attention=attention.value)
    # Before any model loads: a run the disk cannot hold is refused in a second, not after hours.
    _check_run_space(out, config, plan, requested, balancing, samples_per_shard, check=not no_space_check)
    if use_ray:
        _generate_on_ray(out, config, plan, ray_address, ray_timeout, workers, num_gpus_per_worker,
                         cpus_per_worker, options, backend, engines, vocab.classes if vocab else None,
                         balancing, requested)
        return
    # Models load before the run directory is touched, so a bad --model leaves nothing behind.
    sampler = build_sampler(config, device, backend, engines, options.channels_last, options.attention)
    masks = build_mask_stage(config, sampler, engines)
    if plan.fresh:
        start_run(out, config, plan.records, vocab.classes if vocab else None, _balance_start(balancing, requested))
    summaries = []

    def render(records) -> None:
        with progress_bar(transient=False) as bar:
            advance = resumable_progress(bar, f"generate ({config.preset})", "pairs")
            summary = generate_pairs(out, config, records, sampler, options, progress=advance, masks=masks)
        record_summary(out, summary, {"device": device, "batch_size": batch_size, "backend": backend,
                                      "channels_last": sampler.models.channels_last, "attention": options.attention,
                                      "dtype": str(sampler.dtype).removeprefix("torch."),
                                      "encode_workers": options.encode_workers})
        summaries.append(summary)

    _render_balanced(out, config, plan.records, requested, sampler.models.model_id, balancing, render)
    summary = _combined(summaries)
    checked = ""
    if masks is not None:
        verb = "dropped" if config.masks.drop_failed_pairs else "flagged"
        checked = f" {summary.flagged + summary.dropped} failed the counterfactual check ({verb})."
        if summary.classes_not_found:
            checked += (f" {summary.classes_not_found} class mentions were not found (no tokens in the prompt"
                        " and no detector box); their masks are empty.")
    stderr.print(
        f"{summary.generated} pairs generated, {summary.already_done} were already done, "
        f"{summary.pairs_per_second:.2f} pairs/s.{checked} Shards: {out / 'shards'}; "
        f"read them with webdataset or `tar tf`.", highlight=False)


def _balance_settings(balance: bool, tolerance: float, budget: float, rounds: int, prompts_file, mask_source):
    """The --balance settings (None without --balance), checked before anything is read or written."""
    from magicseg_engine.balance import BalanceSettings

    if not balance:
        return None
    if prompts_file is not None:
        raise UsageError("--balance draws more prompts for the short classes, and a --prompts file has no more; "
                         "use --classes with --num-pairs")
    if mask_source is MaskSource.none:
        raise UsageError("--balance counts the pairs whose class has a mask; it needs masks (drop --mask-source none)")
    settings = BalanceSettings(tolerance, budget, rounds)
    settings.check()
    return settings


def _check_run_space(out: Path, config, plan, requested: int, balancing, samples_per_shard: int, *,
                     check: bool) -> None:
    """Refuse a run whose pairs left do not fit the free space of --out (unless `check` is off), and
    tell the disk-error line what the run still needs."""
    import math

    from magicseg_engine import disk_space
    from magicseg_engine.data.shards import RunState
    from magicseg_engine.pipeline import dropped_keys

    total = len(plan.records)
    if balancing is not None:  # top-up rounds render at most this many more
        total = max(total, requested + math.ceil(balancing.budget * requested))

    def pairs_left() -> int:
        state = RunState.load(out, verify=False, repair=False)
        return max(0, total - len(state.finished) - len(dropped_keys(out)))

    def need_now() -> int:
        return disk_space.run_need(out, config, pairs_left(), samples_per_shard)[0]

    disk_space.note_need(need_now)
    if not check:
        return
    if plan.fresh:  # a new run, or one replacing an old run whose shards it deletes first
        per_pair = disk_space.estimated_pair_bytes(config, samples_per_shard)
        source = "the preset's image size"
        try:  # the old run's shards are deleted before the first pair: their room is the new run's
            old = RunState.load(out, verify=False, repair=False).shards
        except UsageError:  # a damaged old run: --overwrite replaces it all the same
            old = ()
        needed = total * (per_pair + disk_space.PROMPT_LINE_BYTES) + disk_space.RESERVE_BYTES
        needed = max(0, needed - sum(s.bytes for s in old))
        left = total
    else:
        left = pairs_left()
        needed, per_pair, source = disk_space.run_need(out, config, left, samples_per_shard)
    disk_space.check_space(out, needed, left, per_pair, source, "--no-space-check")


def _requested_pairs(out: Path, plan, records) -> int:
    """The pairs the user asked for: the flags' prompts, or on a bare --resume the run's own count."""
    from magicseg_engine.pipeline import RUN_FILE

    if records is not None:
        return len(records)
    saved = json.loads((out / RUN_FILE).read_text(encoding="utf-8")) if (out / RUN_FILE).exists() else {}
    return int(saved.get("balance", {}).get("requested_pairs", len(plan.records)))


def _balance_start(balancing, requested: int) -> dict | None:
    """The --balance record a new run starts with (start_run writes it in its first step)."""
    if balancing is None:
        return None
    from magicseg_engine.balance import start_record

    return start_record(balancing, requested)


def _render_balanced(out: Path, config, records, requested: int, model_id: str, balancing, render) -> None:
    """`render(records)` once, or with --balance round by round until the classes are level."""
    if balancing is None:
        render(records)
        return
    from magicseg_engine.balance import run_balanced
    from magicseg_engine.data.shards import sample_key

    def announce(round_index: int, short: dict[str, int], pairs: int) -> None:
        worst = ", ".join(f"{name} {need}" for name, need in sorted(short.items(), key=lambda kv: -kv[1])[:5])
        stderr.print(f"balance round {round_index}: {len(short)} classes short of usable pairs ({worst}"
                     f"{', ...' if len(short) > 5 else ''}); rendering {pairs} more pairs", highlight=False)

    result = run_balanced(out, config.prompts, list(records), requested,
                          lambda r: sample_key(model_id, r.prompt, r.negative_prompt, r.seed), balancing, render,
                          on_round=announce)
    if result.short:
        table = Table(title=f"classes still short after {result.rounds} balance rounds (+{result.extra_pairs} pairs)")
        for column in ("class", "target", "usable", "pairs tried", "lost because"):
            table.add_column(column)
        for name in sorted(result.short, key=lambda n: -result.short[n]):
            c = result.counts[name]
            table.add_row(name, str(c.target), str(c.usable), str(c.attempts), c.short_reason)
        stderr.print(table)
    else:
        stderr.print(f"balance: every class has at least {1 - balancing.tolerance:.0%} of its requested pairs usable "
                     f"after {result.rounds} top-up rounds (+{result.extra_pairs} pairs)", highlight=False)


def _combined(summaries):
    """One summary of several render calls: the first's already-done count, every call's work."""
    import dataclasses

    first, last = summaries[0], summaries[-1]
    if len(summaries) == 1:
        return first
    added = {f: sum(getattr(s, f) for s in summaries) for f in ("generated", "seconds", "written", "flagged",
                                                                  "dropped", "classes_not_found")}
    return dataclasses.replace(last, already_done=first.already_done, requested=last.requested, **added)


def _check_ray_flags(device: str) -> None:
    """With --ray, before anything is read or written: Ray is there, and the flags fit."""
    from magicseg_engine.distributed import require_ray

    if device != "auto":
        raise UsageError("--device is for a single-process run; with --ray each worker uses the GPU Ray gives it "
                         "(--num-gpus-per-worker 0 for CPU workers)")
    require_ray()


def _generate_on_ray(out: Path, config, plan, address: Optional[str], timeout_s: Optional[float],
                     workers: Optional[int], gpus_per_worker: Optional[float], cpus_per_worker: Optional[int],
                     execution, backend: str, engines: Optional[Path], vocabulary=None, balancing=None,
                     requested: int = 0) -> None:
    """`generate --ray`: the same run directory, rendered by a pool of Ray workers."""
    import torch

    from magicseg_engine.distributed import RayOptions, RayRunError, connect, generate_on_ray, shutdown, size_pool
    from magicseg_engine.distributed.cluster import DEFAULT_CONNECT_TIMEOUT_S, cluster_resources
    from magicseg_engine.engine.backends import BACKENDS
    from magicseg_engine.generate.models import model_identity, uses_channels_last
    from magicseg_engine.pipeline import check_model_settings, record_summary, start_run

    # Everything the workers would refuse is checked here first, so bad input writes nothing.
    check_model_settings(config)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    cpus_per_worker = 1 if cpus_per_worker is None else cpus_per_worker
    started = connect(address, timeout_s=DEFAULT_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        resources = cluster_resources()
        workers, gpus_per_worker = size_pool(resources, workers, gpus_per_worker, cpus_per_worker)
        worker_device = torch.device("cuda" if gpus_per_worker > 0 else "cpu")
        model_id = model_identity(config.diffusion, worker_device, seed=config.weights_seed)
        if plan.fresh:
            start_run(out, config, plan.records, vocabulary, _balance_start(balancing, requested))
        options = RayOptions(workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                             execution=execution, backend=backend, engines=engines)
        where = f"{resources.nodes} node{'s' if resources.nodes != 1 else ''}"
        unit = f"{gpus_per_worker:g} GPU" if gpus_per_worker > 0 else f"{cpus_per_worker} CPU"
        stderr.print(f"Ray: {workers} workers × {unit} on {where}; each loads its models before its first shard.",
                     highlight=False)
        results = []

        def render(records) -> None:
            with progress_bar(transient=False) as bar:
                results.append(generate_on_ray(out, config, records, model_id, options,
                                               progress=ClusterProgress(bar, f"generate ({config.preset}, Ray)")))

        _render_balanced(out, config, plan.records, requested, model_id, balancing, render)
        result = results[-1]
    except RayRunError as err:
        stderr.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    finally:
        if started:
            shutdown()
    summary = _combined([r.summary for r in results])
    record_summary(out, summary, {"ray": True, "workers": workers, "gpus_per_worker": gpus_per_worker,
                                  "render_seconds": round(result.render_seconds, 3),
                                  "cpus_per_worker": cpus_per_worker, "batch_size": execution.batch_size,
                                  "encode_workers": execution.encode_workers,
                                  "backend": backend, "attention": execution.attention,
                                  "channels_last": uses_channels_last(execution.channels_last, worker_device),
                                  "nodes": resources.nodes})
    if result.workers:
        table = Table(title="Ray workers")
        for column in ("worker", "node", "shards", "pairs", "pairs/s"):
            table.add_column(column, justify="left" if column in ("worker", "node") else "right")
        for name, w in sorted(result.workers.items()):
            table.add_row(name, w.node, str(w.shards), str(w.pairs), f"{w.pairs_per_second:.2f}")
        stderr.print(table)
    checked = ""
    if config.masks.source != "none":
        verb = "dropped" if config.masks.drop_failed_pairs else "flagged"
        checked = f" {summary.flagged + summary.dropped} failed the counterfactual check ({verb})."
    stderr.print(
        f"{summary.generated} pairs generated on {workers} Ray worker{'s' if workers != 1 else ''}, "
        f"{summary.already_done} were already done, "
        f"{summary.pairs_per_second:.2f} pairs/s over the whole run, {result.render_pairs_per_second:.2f} pairs/s "
        f"once the workers were rendering.{checked} Shards: {out / 'shards'}.",
        highlight=False)


class ClusterProgress:
    """Rich progress for a Ray run: one bar for the run, and a line per worker with its pairs/s."""

    def __init__(self, bar: Progress, description: str):
        self.bar = bar
        self.advance = resumable_progress(bar, description, "pairs")
        self.total = 0
        self.tasks: dict[str, object] = {}

    def start(self, done: int, total: int) -> None:
        self.total = total
        self.advance(done, total)

    def pairs(self, worker: str, n: int) -> None:
        if worker not in self.tasks:
            self.tasks[worker] = self.bar.add_task(f"  worker {worker}", total=None, unit="pairs")
        if n:
            self.bar.advance(self.tasks[worker], n)
            self.advance(n, self.total)


@app.command()
@reports_usage_errors
def masks(
    data: Annotated[Path, typer.Option("--data", help="A run directory written by generate.")],
    out: Annotated[Path, typer.Option("--out", help="New run directory: the same pairs with new masks.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted re-annotation in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out.")] = False,
    no_sam: Annotated[bool, typer.Option("--no-sam", help="Masks from attention alone.")] = False,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="tiny, vit_b, vit_l or vit_h.")] = None,
    sam_checkpoint: Annotated[Optional[str], typer.Option("--sam-checkpoint", help="segment-anything .pth.")] = None,
    mask_threshold: Annotated[Optional[str], typer.Option("--mask-threshold", help="otsu, or a fixed value in (0, 1).")] = None,
    max_counterfactual_coverage: Annotated[Optional[float], typer.Option("--max-counterfactual-coverage")] = None,
    drop_failed_pairs: Annotated[bool, typer.Option("--drop-failed-pairs")] = False,
    mask_source: Annotated[Optional[MaskSource], typer.Option("--mask-source", help="attention, detector or attention+detector.")] = None,
    detector_model: Annotated[Optional[str], typer.Option("--detector-model", help="Grounding DINO folder or hub id.")] = None,
    box_threshold: Annotated[Optional[float], typer.Option("--box-threshold")] = None,
    text_threshold: Annotated[Optional[float], typer.Option("--text-threshold")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per SAM batch.")] = 8,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", help="Pairs per tar shard.")] = 256,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "torch",
    engines: Annotated[Optional[Path], typer.Option("--engines", help=ENGINES_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    weights_seed: Annotated[Optional[int], typer.Option("--weights-seed", help="Seed of the random SAM and detector weights (no checkpoint); default: the source run's.")] = None,
) -> None:
    """Annotate an existing run again (new thresholds, SAM, checks) without re-rendering or re-encoding images."""
    from magicseg_engine.config import saved_run_config, with_overrides
    from magicseg_engine.generate.models import resolve_dtype
    from magicseg_engine.pipeline import (
        PROMPTS_FILE,
        RUN_FILE,
        ExecutionOptions,
        build_annotator,
        open_run,
        read_run_file,
        reannotate_run,
        record_summary,
        start_run,
    )
    from magicseg_engine.prompts import read_records

    if batch_size <= 0 or samples_per_shard <= 0:
        raise UsageError("--batch-size and --samples-per-shard must be positive")
    if mask_source is MaskSource.none:
        raise UsageError("--mask-source none would annotate nothing; pick attention, detector or attention+detector")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    if data.resolve() == out.resolve():
        raise UsageError("--out must differ from --data: the source run is read, never rewritten")
    if not (data / RUN_FILE).exists():
        raise UsageError(f"{data} holds no run (no {RUN_FILE}); pass a directory written by generate")
    device = _resolve_device(device)
    source_run = read_run_file(data) or {"config": {}}  # checked entries: a damaged one is one line
    saved = saved_run_config(source_run["config"])
    wanted = mask_source.value if mask_source else "attention"
    if saved.get("masks", {}).get("source") == "none" and wanted != "detector":
        raise UsageError(f"{data} was generated with --mask-source none and holds no attention maps, which "
                         f"--mask-source {wanted} reads; use --mask-source detector (it needs only the images), "
                         "or generate it again with masks on")
    overrides = {
        "weights_seed": weights_seed,
        "sam": {"model_type": sam_model, "checkpoint": sam_checkpoint},
        "masks": {"source": wanted,
                  "refine_with_sam": False if no_sam else None,
                  "threshold": _parse_threshold(mask_threshold),
                  "max_counterfactual_coverage": max_counterfactual_coverage,
                  "drop_failed_pairs": drop_failed_pairs or None, "detector_model": detector_model,
                  "box_threshold": box_threshold, "text_threshold": text_threshold},
    }
    config = with_overrides(saved, overrides, f"the run in {data}")
    _hold_run_directory(out)
    plan = open_run(out, config, read_records(data / PROMPTS_FILE), resume, overwrite)
    annotator = build_annotator(config, device, resolve_dtype(config.diffusion.dtype, device), backend, engines)
    if plan.fresh:
        start_run(out, config, plan.records, source_run.get("vocabulary"))
    options = ExecutionOptions(device=device, batch_size=batch_size, samples_per_shard=samples_per_shard)
    with progress_bar(transient=False) as bar:
        advance = resumable_progress(bar, "masks", "pairs")
        summary = reannotate_run(data, out, config, annotator, options, progress=advance)
    record_summary(out, summary, {"device": device, "batch_size": batch_size, "annotated_from": str(data)})
    verb = "dropped" if config.masks.drop_failed_pairs else "flagged"
    stderr.print(f"{summary.generated} pairs annotated, {summary.already_done} were already done; "
                 f"{summary.flagged + summary.dropped} failed the counterfactual check ({verb}). Shards: {out / 'shards'}",
                 highlight=False)


class EngineFormat(str, Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"


@app.command("build-engines")
@reports_usage_errors
def build_engines_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the ONNX files, engines and manifest.json.")],
    preset: Annotated[str, typer.Option("--preset", help="tiny, shapes, sd15-random, sd21-random, sdxl-random, sd15, sd21 or sdxl.")] = "tiny",
    model: Annotated[Optional[str], typer.Option("--model", help="Diffusers folder or hub id of an SD 1.x, SD 2.x or SDXL model (presets sd15, sd21, sdxl).")] = None,
    fmt: Annotated[EngineFormat, typer.Option("--format", help="onnx, or tensorrt (ONNX, then engines).")] = EngineFormat.onnx,
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16 (half precision needs a GPU).")] = "fp32",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch range of the TensorRT profiles, in UNet rows, not pairs: with guidance a pair is 4 rows (positive and negative prompt, each with its unconditional row), so generate --batch-size N needs 4N in the range. Keep 1 in it: the text encoder, VAE decoder and SAM image encoder also run smaller batches. SAM's mask decoder has ranges of its own (prompts per image, tokens per prompt).")] = "1,8,16",
    components: Annotated[str, typer.Option("--components", help="Comma-separated components.")] =
        "unet,unet-capture,vae-decoder,text-encoder,sam-image-encoder,sam-mask-decoder",
    # --seed is the older name, from when generate's --seed also drew the weights; it still works.
    weights_seed: Annotated[int, typer.Option("--weights-seed", "--seed", help="Seed of random weights (tiny and the -random presets, SAM without a checkpoint), as generate --weights-seed. --seed: its older name.")] = 0,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="tiny, vit_b, vit_l or vit_h.")] = None,
    sam_checkpoint: Annotated[Optional[str], typer.Option("--sam-checkpoint", help="segment-anything .pth.")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option("--size", help="Image height and width the exports are for.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Export UNet, VAE decoder, text encoder and SAM to ONNX (checked against torch), and build TensorRT engines."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.engine.backends import require_onnx

    require_onnx()
    from magicseg_engine.engine.build import build_engines, parse_batch_sizes, parse_components

    if precision not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"--precision {precision!r}: choose fp32, fp16 or bf16")
    names = parse_components(components)
    sizes = parse_batch_sizes(batch_sizes)
    device = _resolve_device(device)
    config = load_preset(preset, {
        "weights_seed": weights_seed,
        "diffusion": {"model": model, "height": size[0] if size else None, "width": size[1] if size else None},
        "sam": {"model_type": sam_model, "checkpoint": sam_checkpoint},
    })
    if config.diffusion.weights == "pretrained" and any(c.startswith("sam") for c in names) and not config.sam.checkpoint:
        raise UsageError("exporting SAM for real diffusion weights needs --sam-checkpoint, or leave SAM out of --components")
    with stderr.status(f"exporting {', '.join(names)} ({fmt.value}, {precision})"):
        manifest = build_engines(config, out, fmt=fmt.value, precision=precision, batch_sizes=sizes,
                                 components=names, device=device)
    for e in manifest["components"]:
        check = e.get("onnxruntime_parity")
        stderr.print(f"{e['component']}: {e['path']}" + (f", onnxruntime vs torch max abs {check['max_abs']:.2e}" if check else "")
                     + (f", engine {e['engine']}" if "engine" in e else ""), highlight=False)
    stderr.print(f"manifest: {out / 'manifest.json'}", highlight=False)


class Precision(str, Enum):
    """Training and evaluation precision: float32, or bfloat16 autocast."""

    fp32 = "fp32"
    bf16 = "bf16"


class LoaderKind(str, Enum):
    torch = "torch"
    dali = "dali"


@app.command()
@reports_usage_errors
def pretrain(
    data: Annotated[Path, typer.Option("--data", help="A run directory written by generate (shards with masks).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, metrics and the configuration.")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (CPU, seconds), sd15-random or sd15 (ViT-B/16).")] = "tiny",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps (preset default if unset).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per rank and micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimiser step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Base learning rate (prompts and decoder get 10x).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps")] = None,
    precision: Annotated[Optional[Precision], typer.Option("--precision", help="fp32, or bf16 (autocast); preset default if unset.")] = None,
    candidates: Annotated[Optional[int], typer.Option("--candidates", help="Classes scored per image (own + sampled).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = None,
    clip_weights: Annotated[Optional[str], typer.Option("--clip-weights", help="open_clip checkpoint or .safetensors of the CLIP towers.")] = None,
    vocabulary: Annotated[Optional[str], typer.Option("--vocab", help="Class list (voc, context, coco-object, coco-stuff or a file); default: the data's classes.")] = None,
    loader: Annotated[LoaderKind, typer.Option("--loader", help="torch, or dali (pip install 'magicseg-engine[dali]').")] = LoaderKind.torch,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Decoding processes of the torch loader.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Pretrain the segmentation model on generated pairs (torchrun for several processes)."""
    from magicseg_engine import disk_space
    from magicseg_engine.train.loop import CONFIG_FILE, load_pretrain_preset, pretrain as run_pretrain

    # Until its pretrain.json is written a run has nothing to resume: it is started again as it was.
    disk_space.note_retry(lambda: "run the same command again" if resume or not (out / CONFIG_FILE).is_file()
                          else "run the same command with --resume")

    if not (data / "manifest.jsonl").is_file():
        raise UsageError(f"--data {data} holds no manifest.jsonl; point it at a run directory written by generate")
    names = None
    if vocabulary:
        from magicseg_engine.vocab import load_vocabulary

        names = list(load_vocabulary(vocabulary).classes)
    config = load_pretrain_preset(preset, {
        "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "warmup_steps": warmup_steps,
        "precision": precision.value if precision else None, "candidates": candidates, "checkpoint_every": checkpoint_every,
        "clip_weights": clip_weights, "vocabulary": names, "loader": loader.value, "num_workers": workers,
        "seed": seed,
    })
    device = _resolve_device(device)
    main_process = os.environ.get("RANK", "0") == "0"
    # The bar appears with the first step, after every check that can refuse the run.
    bar = progress_bar(transient=False)
    task = bar.add_task(f"pretrain ({config.preset})", total=config.steps, unit="steps", visible=main_process)

    def on_step(step: int, total: int, metrics: dict) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=step, description=f"pretrain loss {metrics.get('loss', 0):.3f}")

    try:
        summary = run_pretrain(config, data, out, device=device, resume=resume, on_step=on_step)
    finally:
        if bar.live.is_started:
            bar.stop()
    if main_process:
        skipped = f"; samples left out: {summary.skipped}" if summary.skipped else ""
        stderr.print(f"{summary.step - summary.resumed_from} steps ({summary.images} images per rank) in "
                     f"{summary.seconds:.0f} s, resumed from step {summary.resumed_from}{skipped}. "
                     f"Checkpoint: {summary.checkpoint}", highlight=False)


@app.command("train-world")
@reports_usage_errors
def train_world_command(
    out: Annotated[Path, typer.Option("--out", help="Diffusers folder to write (unet/, vae/, text_encoder/, tokenizer/, scheduler/).")],
    seed: Annotated[int, typer.Option("--seed", help="Seeds the scenes, the initial weights and every batch.")] = 0,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Captioned scenes to train on.")] = None,
    vae_steps: Annotated[Optional[int], typer.Option("--vae-steps", help="VAE optimiser steps.")] = None,
    unet_steps: Annotated[Optional[int], typer.Option("--unet-steps", help="UNet and text-encoder optimiser steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Latents per UNet step.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = None,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (the shipped model: 32).")] = 32,
    device: Annotated[str, typer.Option("--device", help="Where the models train: cpu (as the shipped weights were), cuda, cuda:N or auto. Batches are drawn on the CPU either way.")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the training in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete --out and start again.")] = False,
) -> None:
    """Train the `shapes` world's VAE, UNet and CLIP text encoder from scratch (about 15 minutes on 2 idle CPU cores)."""
    import shlex

    from pydantic import ValidationError

    from magicseg_engine.config import describe_validation_error
    from magicseg_engine.world.shapes import World
    from magicseg_engine.world.train import WorldTrainConfig, train_world

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    given = {"seed": seed, "samples": samples, "vae_steps": vae_steps, "unet_steps": unet_steps,
             "unet_batch": batch_size, "checkpoint_every": checkpoint_every}
    try:
        config = WorldTrainConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise UsageError(f"invalid train-world settings: {describe_validation_error(err)}") from None
    world = World(size=size).check()
    command = "magicseg-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    labels = {"scenes": "drawing scenes", "vae": "VAE", "latents": "encoding latents", "unet": "UNet + text encoder",
              "export": "writing the diffusers folder"}
    bar = progress_bar(transient=False)
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int, loss: float | None) -> None:
        if not bar.live.is_started:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(labels[stage], total=total, unit="steps" if stage in ("vae", "unet") else "items")
        text = labels[stage] + (f" loss {loss:.4f}" if loss is not None else "")
        bar.update(tasks[stage], completed=done, description=text)

    try:
        summary = train_world(out, config, world, resume=resume, overwrite=overwrite, progress=on_progress,
                              command=command, device=_resolve_device(device))
    finally:
        if bar.live.is_started:
            bar.stop()
    stderr.print(f"trained in {summary['seconds']:.0f} s (VAE weighted MSE {summary['final_loss']['vae_mse']:.4f}, UNet MSE "
                 f"{summary['final_loss']['unet_mse']:.4f}). Diffusers folder: {out}; use it with "
                 f"`--preset shapes --model {out}`.", highlight=False)



@app.command("train-world-sam")
@reports_usage_errors
def train_world_sam_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write sam_tiny_shapes.pth (Meta's checkpoint layout) and sam.json into.")],
    seed: Annotated[int, typer.Option("--seed", help="Seeds the initial weights and every batch.")] = 0,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Scenes per step.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the training in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete --out and start again.")] = False,
) -> None:
    """Train the tiny SAM on the shapes world, prompted as the mask stage prompts it (a few minutes on 2 CPU cores)."""
    import shlex

    from pydantic import ValidationError

    from magicseg_engine.config import describe_validation_error
    from magicseg_engine.world.sam import SAM_FILE, SamTrainConfig, train_world_sam
    from magicseg_engine.world.shapes import World

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    given = {"seed": seed, "steps": steps, "batch": batch_size, "checkpoint_every": checkpoint_every}
    try:
        config = SamTrainConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise UsageError(f"invalid train-world-sam settings: {describe_validation_error(err)}") from None
    command = "magicseg-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with progress_bar() as bar:
        task = bar.add_task("SAM", total=config.steps, unit="steps")

        def on_progress(done: int, total: int, loss: float | None) -> None:
            bar.update(task, completed=done, description=f"SAM loss {loss:.4f}" if loss is not None else "SAM")

        summary = train_world_sam(out, config, World(), resume=resume, overwrite=overwrite, progress=on_progress,
                                  command=command)
    stderr.print(f"trained in {summary['seconds']:.0f} s (loss {summary['final_loss']:.4f}). Weights: "
                 f"{out / SAM_FILE}; use them with `--sam-model tiny --sam-checkpoint {out / SAM_FILE}`.",
                 highlight=False)

class EvalDatasetName(str, Enum):
    voc = "voc"
    context = "context"
    coco_stuff = "coco-stuff"
    coco_object = "coco-object"
    mmseg = "mmseg"


@app.command()
@reports_usage_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A pretrain --out folder (its newest checkpoint) or a step-N.pt file.")],
    dataset: Annotated[EvalDatasetName, typer.Option("--dataset", help="Benchmark layout under --root.")],
    root: Annotated[Path, typer.Option("--root", help="The dataset folder (VOC2012/, VOC2010/, the COCO-Stuff root, or an mmseg export).")],
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "val",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Where to save the results (default: eval/ beside the checkpoints).")] = None,
    classes: Annotated[Optional[Path], typer.Option("--classes", help="Class file (one per line, label order) replacing the dataset's names.")] = None,
    unseen: Annotated[Optional[str], typer.Option("--unseen", help="Unseen classes for seen/unseen/harmonic mIoU: comma-separated names or a file.")] = None,
    short_side: Annotated[Optional[int], typer.Option("--short-side", help="Images are resized to this short side (default: the model's crop).")] = None,
    crop: Annotated[Optional[int], typer.Option("--crop", help="Sliding-window size (default: the model's input size).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Sliding-window stride (default: 2/3 of the crop).")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Also average the horizontally flipped image.")] = False,
    bg_threshold: Annotated[float, typer.Option("--bg-threshold", help="Datasets scoring background: a pixel whose best class scores below this is background.")] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per model call.")] = 8,
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes.")] = 2,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N images (a quick look).")] = None,
    save_predictions: Annotated[Optional[Path], typer.Option("--save-predictions", help="Folder for predicted label PNGs (evaluation labels).")] = None,
    precision: Annotated[Precision, typer.Option("--precision")] = Precision.fp32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Zero-shot mIoU of a pretrained checkpoint on VOC, PASCAL Context, COCO-Stuff or COCO-Object."""
    from magicseg_engine.atomic import atomic_write_text, check_writable_dir
    from magicseg_engine.evaluate.datasets import load_dataset
    from magicseg_engine.evaluate.inference import SlideSettings
    from magicseg_engine.evaluate.run import EvalSettings, evaluate as run_evaluate, load_segmenter

    if not 0.0 < bg_threshold < 1.0:
        raise UsageError(f"--bg-threshold {bg_threshold} must lie between 0 and 1")
    for flag, value in (("--batch-size", batch_size), ("--limit", limit), ("--short-side", short_side),
                        ("--crop", crop), ("--stride", stride)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    names = _class_file(classes) if classes is not None else None
    data = load_dataset(dataset.value, root, split, class_names=names, limit=limit)
    unseen_names = _unseen_names(unseen, data.class_names) if unseen else []
    device = _resolve_device(device)
    segmenter = load_segmenter(checkpoint, device)
    model_crop = segmenter.model.config.image_size
    try:
        slide = SlideSettings.for_crop(crop or model_crop, short_side=short_side, stride=stride,
                                       flip=flip, batch_size=batch_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if slide.crop % segmenter.model.config.patch_size:
        raise UsageError(f"--crop {slide.crop} is not a multiple of the model's patch size "
                         f"{segmenter.model.config.patch_size}")
    if json_out is None:
        base = segmenter.run_dir or segmenter.checkpoint.parent
        json_out = base / "eval" / f"{data.layout.name}-{split}-step{segmenter.step}.json"
    check_writable_dir(json_out.parent)

    with progress_bar(transient=False) as bar:
        task = bar.add_task(f"evaluate {data.layout.title} {split}", total=len(data.samples), unit="images")
        result = run_evaluate(
            segmenter, data, EvalSettings(slide, bg_threshold, precision.value, workers),
            unseen=unseen_names, save_predictions=save_predictions,
            on_image=lambda done, total: bar.update(task, completed=done),
        )
    atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
    _print_evaluation(result)
    stderr.print(f"Saved {json_out}", highlight=False)


def _class_file(path: Path) -> list[str]:
    from magicseg_engine.vocab import load_vocabulary

    if not path.is_file():
        raise UsageError(f"--classes {path} is not a file; give one class name per line, in label order")
    vocabulary = load_vocabulary(str(path))
    if vocabulary.duplicates:
        # Labels index the list: dropping a repeated name would shift every later class.
        raise UsageError(f"--classes {path} repeats {', '.join(vocabulary.duplicates)}; labels index the list, "
                         "so each line must name a different class")
    return list(vocabulary.classes)


def _unseen_names(spec: str, names: tuple[str, ...]) -> list[str]:
    path = Path(spec)
    if path.is_file():
        wanted = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    else:
        wanted = [n.strip() for n in spec.split(",") if n.strip()]
    by_lower = {n.lower(): n for n in names}
    unknown = [n for n in wanted if n.lower() not in by_lower]
    if unknown:
        raise UsageError(f"--unseen names {', '.join(repr(n) for n in unknown)} that are not classes of this "
                         "dataset; use its class names (see --classes)")
    if not wanted:
        raise UsageError("--unseen names no class")
    return list(dict.fromkeys(by_lower[n.lower()] for n in wanted))


def _print_evaluation(result: dict) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    summary = Table(title=f"{result['title']} {result['split']}",
                    caption=f"{result['images']} images, checkpoint step {result['step']}")
    for column in ("mIoU", "pixel acc", "mean acc"):
        summary.add_column(column, justify="right")
    row = [pct(result["miou"]), pct(result["pixel_accuracy"]), pct(result["mean_accuracy"])]
    if "harmonic_miou" in result:
        for column in ("seen mIoU", "unseen mIoU", "hIoU"):
            summary.add_column(column, justify="right")
        row += [pct(result["seen_miou"]), pct(result["unseen_miou"]), pct(result["harmonic_miou"])]
    summary.add_row(*row)
    per_class = Table(title="per class (%)")
    for column, justify in (("class", "left"), ("IoU", "right"), ("acc", "right")):
        per_class.add_column(column, justify=justify)
    for name, iou in result["iou"].items():
        per_class.add_row(name, pct(iou), pct(result["accuracy"][name]))
    stdout.print(per_class)
    stdout.print(summary)


@app.command()
@reports_usage_errors
def report(
    data: Annotated[Path, typer.Option("--data", help="A run directory written by generate; a run in progress is read up to its finished shards.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default: DATA/report.html).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Pairs to show, chosen evenly across classes.")] = 64,
) -> None:
    """Write one self-contained HTML page with the run's pairs, masks and statistics."""
    from magicseg_engine.report import build_report

    with progress_bar() as bar:
        task = bar.add_task("report: reading shards", total=None, unit="shards")
        summary = build_report(data, out, samples,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    digest = summary.digest
    for shard in digest.skipped_shards:
        stderr.print(f"warning: skipped shard {shard.name} ({shard.samples} samples): {shard.reason}",
                     highlight=False, soft_wrap=True)
    for problem in digest.skipped_manifest_lines:
        stderr.print(f"warning: skipped {problem}", highlight=False, soft_wrap=True)
    for pair in summary.unreadable:
        stderr.print(f"warning: pair not shown: {pair.reason}", highlight=False, soft_wrap=True)
    skipped = (f"; skipped unreadable shards: {len(digest.skipped_shards)} ({digest.skipped_samples} samples)"
               if digest.skipped_shards else "")
    waiting = (f"; shards still being written, not included: {digest.shards_in_progress}"
               if digest.shards_in_progress else "")
    stderr.print(f"pairs shown: {summary.shown} of {digest.samples} samples; shards read: {digest.shards_read}; "
                 f"classes: {len(digest.classes)}{skipped}{waiting}. Report: {summary.out}",
                 highlight=False, soft_wrap=True)



class ExportFormat(str, Enum):
    coco = "coco"
    mmseg = "mmseg"
    hf = "hf"


@app.command("export")
@reports_usage_errors
def export_command(
    data: Annotated[Path, typer.Option("--data", help="A run directory written by generate or masks.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="coco (instances JSON, RLE masks), mmseg (img_dir/ann_dir) or hf (datasets, Parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the export (new, empty, or an export of the same kind to resume).")],
    partial: Annotated[bool, typer.Option("--partial", help="Export the finished shards of an unfinished run.")] = False,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Category list (vocabulary name or class file); default: the run's vocabulary.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="mmseg: share of pairs in val, chosen by key.")] = 0.05,
) -> None:
    """Write a run's pairs as COCO instances, an mmsegmentation dataset or a Hugging Face dataset; resumable."""
    from magicseg_engine.formats import prepare_export

    job = prepare_export(data, out, fmt.value, partial=partial, classes=classes, val_fraction=val_fraction)
    with progress_bar(transient=False) as bar:
        summary = job.run(progress=resumable_progress(bar, f"export ({fmt.value})", "shards"))
    totals = ", ".join(f"{k} {v}" for k, v in summary.totals.items())
    stderr.print(f"{summary.shards_new} shards exported, {summary.shards - summary.shards_new} were already there; "
                 f"{totals}. Export: {summary.out}", highlight=False, soft_wrap=True)

bench_app = typer.Typer(no_args_is_help=True, help="Measure this engine against a baseline in the same run.")
app.add_typer(bench_app, name="bench")

# Options every suite benchmark takes.
BenchPreset = Annotated[str, typer.Option("--preset", help="tiny (CPU), or sd15-random, sd21-random, sdxl-random (GPU).")]
BenchReps = Annotated[int, typer.Option("--reps", help="Timed repetitions (median reported).")]
BenchWarmup = Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")]
BenchDevice = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BenchJson = Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")]
BenchPairs = Annotated[int, typer.Option("--pairs", help="Pairs per timed repetition (generate; masks and sam use up to 4).")]
BenchBatch = Annotated[int, typer.Option("--batch-size", help="Engine pairs per UNet call.")]
BenchModel = Annotated[Optional[str], typer.Option("--model", help="Diffusers folder or hub id (presets sd15, sd21, sdxl).")]
BenchWeightsSeed = Annotated[int, typer.Option("--weights-seed", help=WEIGHTS_SEED_HELP)]


@bench_app.command("generate")
@reports_usage_errors
def bench_generate_command(
    preset: Annotated[str, typer.Option("--preset", help="tiny (CPU) or sd15-random (GPU).")] = "tiny",
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs rendered per timed repetition.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Engine pairs per UNet call.")] = 8,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (preset default if unset).")] = None,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions (median reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    model: BenchModel = None,
    weights_seed: BenchWeightsSeed = 0,
) -> None:
    """Pairs/s of the paired sampler against a batch-1 reference-style loop, same models."""
    from magicseg_engine.bench.common import bench_vocabulary
    from magicseg_engine.bench.generate import bench_generate
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_sampler
    from magicseg_engine.prompts import build_prompts

    if min(pairs, batch_size, reps) <= 0 or warmup < 0:
        raise UsageError("--pairs, --batch-size and --reps must be positive, --warmup not negative")
    device = _resolve_device(device)
    config = load_preset(preset, {"weights_seed": weights_seed, "diffusion": {"steps": steps, "dtype": dtype, "model": model}})
    records = build_prompts(config.prompts, vocab=bench_vocabulary(config), num=pairs).records
    sampler = build_sampler(config, device)
    stderr.print(f"benchmarking {pairs} pairs on {device}: engine (batch {batch_size}) vs reference loop (batch 1)")
    result = bench_generate(sampler, [r.prompt for r in records], [r.negative_prompt for r in records],
                            [r.seed for r in records], batch_size, warmup=warmup, reps=reps)
    result["settings"]["preset"] = preset
    _write_bench_json(result, json_out)
    frac = result["fraction_of_ceiling"]
    stderr.print(
        f"engine {result['engine']['pairs_per_s']:.3f} pairs/s, reference {result['reference']['pairs_per_s']:.3f} pairs/s: "
        f"[bold]{result['speedup']:.2f}x[/]; UNet step {result['engine']['ms_per_unet_step']:.1f} ms "
        f"({result['engine']['unet_rows_per_step']} rows) vs {result['reference']['ms_per_unet_step']:.1f} ms (2 rows); "
        + (f"{100 * frac:.1f}% of the FLOP ceiling" if frac is not None else "no FLOP ceiling known for this device"),
        highlight=False)


@bench_app.command("flops")
@reports_usage_errors
def bench_flops_command(
    presets: Annotated[str, typer.Option("--presets", help="Comma-separated presets; the first is the baseline.")] =
        "sd15-random,sd21-random,sdxl-random",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (preset default if unset).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """FLOPs per guided pair of each family at its native size, counted on the meta device, and the pairs/s ceiling per GPU."""
    from rich.table import Table

    from magicseg_engine.bench.flops import CEILING_GPUS, bench_flops

    if steps is not None and steps <= 0:
        raise UsageError(f"--steps {steps}: give a positive number of denoising steps")
    names = [p.strip() for p in presets.split(",") if p.strip()]
    result = bench_flops(names, steps)
    _write_bench_json(result, json_out)
    table = Table(title=f"TFLOP per guided pair (vs {result['baseline']}); pairs/s at each GPU's dense peak")
    for column in ("preset", "size", "steps", "UNet/row", "pair", "vs first", *CEILING_GPUS):
        table.add_column(column)
    for r in result["rows"]:
        table.add_row(r["preset"], f"{r['height']}x{r['width']}", str(r["steps"]), f"{r['unet_tflops_per_row']:.3g}",
                      f"{r['pair_tflops']:.4g}", f"{r['vs_first']:.2f}x",
                      *(f"{r['ceiling_pairs_per_s'][gpu]:.3g}" for gpu in CEILING_GPUS))
    stderr.print(table)


@bench_app.command("masks")
@reports_usage_errors
def bench_masks_command(
    preset: Annotated[str, typer.Option("--preset", help="tiny (CPU) or sd15-random (GPU).")] = "tiny",
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs in the measured batch.")] = 4,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions (median reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    size: Annotated[Optional[int], typer.Option("--size", help="Square image side (preset default if unset): sd15-random at 256 fits a CPU.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (preset default if unset).")] = None,
    no_sam: Annotated[bool, typer.Option("--no-sam", help="Capture overhead only, without the SAM comparison.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    weights_seed: BenchWeightsSeed = 0,
) -> None:
    """Attention-capture overhead on the UNet, and batched SAM against one prompt at a time."""
    from magicseg_engine.bench.common import bench_vocabulary
    from magicseg_engine.bench.masks import bench_masks
    from magicseg_engine.config import load_preset
    from magicseg_engine.masks.sam import SamRefiner, build_sam
    from magicseg_engine.pipeline import build_sampler
    from magicseg_engine.prompts import build_prompts

    if min(pairs, reps, 1 if size is None else size, 1 if steps is None else steps) <= 0 or warmup < 0:
        raise UsageError("--pairs, --reps, --size and --steps must be positive, --warmup not negative")
    device = _resolve_device(device)
    config = load_preset(preset, {"weights_seed": weights_seed, "diffusion": {"height": size, "width": size, "steps": steps}})
    records = build_prompts(config.prompts, vocab=bench_vocabulary(config), num=pairs).records
    sampler = build_sampler(config, device)
    refiner = None if no_sam else SamRefiner(build_sam(config.sam.model_type, config.sam.checkpoint, device=device,
                                                       dtype=sampler.dtype, seed=config.weights_seed))
    result = bench_masks(sampler, refiner, [r.prompt for r in records], [r.negative_prompt for r in records],
                         [r.seed for r in records], [tuple(r.classes) for r in records], warmup=warmup, reps=reps)
    result["settings"] = {"preset": preset, "pairs": pairs, "warmup": warmup, "size": size, "steps": steps}
    _write_bench_json(result, json_out)
    capture = result["capture"]
    line = (f"capture overhead {100 * capture['overhead']:.1f}% of denoising ({capture['kernel']}), "
            f"{100 * capture['overhead_positives_only']:.1f}% reading the positives only")
    if "sam" in result:
        line += f"; SAM batched {result['sam']['speedup']:.2f}x faster than one at a time"
    stderr.print(line, highlight=False)


@bench_app.command("fast")
@reports_usage_errors
def bench_fast_command(
    preset: Annotated[str, typer.Option("--preset", help="Any generate preset: sd15-random for the real architecture.")] = "tiny",
    model: BenchModel = None,
    levels: Annotated[str, typer.Option("--levels", help="Comma-separated fast levels compared with level 0.")] = "1,2",
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs in the compared batch.")] = 4,
    size: Annotated[Optional[int], typer.Option("--size", help="Square image side (preset default if unset).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (preset default if unset).")] = None,
    reps: Annotated[int, typer.Option("--reps", help="Timed renderings per mode, the modes taking turns.")] = 3,
    device: BenchDevice = "auto",
    json_out: BenchJson = None,
    weights_seed: BenchWeightsSeed = 0,
) -> None:
    """Fast mode against full mode on the same pairs: pairs/s, attention-map and mask agreement, image PSNR."""
    from magicseg_engine.bench.fast import fast_bench
    from magicseg_engine.config import load_preset
    from magicseg_engine.generate.fast import FAST_LEVELS

    try:
        chosen = [int(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--levels {levels!r}: give fast levels separated by commas, e.g. 1,2") from None
    if not chosen or any(v not in FAST_LEVELS or v == 0 for v in chosen):
        raise UsageError(f"--levels {levels!r}: choose from {', '.join(str(v) for v in sorted(FAST_LEVELS) if v)}")
    if min(pairs, reps, 1 if size is None else size, 1 if steps is None else steps) <= 0:
        raise UsageError("--pairs, --reps, --size and --steps must be positive")
    device = _resolve_device(device)
    config = load_preset(preset, {"weights_seed": weights_seed,
                                  "diffusion": {"height": size, "width": size, "steps": steps, "model": model}})
    result = fast_bench(config, device, chosen, pairs, reps)
    result["settings"] = {"preset": preset, "pairs": pairs, "levels": chosen}
    _write_bench_json(result, json_out)
    for row in result["levels"]:
        iou = "n/a" if row["mask_iou"] is None else f"{row['mask_iou']:.3f}"
        stderr.print(f"fast {row['level']}: {row['speedup']:.2f}x the pairs/s of full mode; mask IoU {iou}, "
                     f"map cosine {row['map_cosine']:.4f}, PSNR {row['image_psnr']:.1f} dB against it", highlight=False)


@bench_app.command("backends")
@reports_usage_errors
def bench_backends_command(
    engines: Annotated[Path, typer.Option("--engines", help="Folder written by build-engines for this preset.")],
    preset: Annotated[str, typer.Option("--preset", help="The preset the engines were built for.")] = "tiny",
    model: BenchModel = None,
    # --seed is the older name, as for build-engines.
    weights_seed: Annotated[int, typer.Option("--weights-seed", "--seed", help="Seed of random weights, as given to build-engines. --seed: its older name.")] = 0,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,2,4",
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions (median reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    components: Annotated[str, typer.Option("--components", help="Comma-separated: text-encoder, unet, vae-decoder.")] =
        "text-encoder,unet,vae-decoder",
    backends: Annotated[Optional[str], typer.Option("--backends", help="Comma-separated, torch included (default: torch,onnxruntime; on a GPU also compile, and tensorrt where installed).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Text encoder, UNet and VAE decoder on each backend against eager torch, at several batch sizes."""
    from magicseg_engine.engine.backends import require_onnx

    require_onnx()
    from magicseg_engine.bench.backends import bench_backends
    from magicseg_engine.config import load_preset
    from magicseg_engine.engine.build import parse_batch_sizes, parse_components
    from magicseg_engine.engine.export import DIFFUSION_COMPONENTS
    from magicseg_engine.generate.models import load_diffusion, resolve_dtype

    if reps <= 0 or warmup < 0:
        raise UsageError("--reps must be positive, --warmup not negative")
    sizes = parse_batch_sizes(batch_sizes)
    device = _resolve_device(device)
    config = load_preset(preset, {"weights_seed": weights_seed, "diffusion": {"model": model}})
    models = load_diffusion(config.diffusion, device, resolve_dtype("float32", device), seed=config.weights_seed)
    names = parse_components(components)
    if any(c not in DIFFUSION_COMPONENTS for c in names):
        raise UsageError(f"--components {components}: bench backends times text-encoder, unet and vae-decoder")
    result = bench_backends(models, engines, components=names, batch_sizes=sizes, warmup=warmup, reps=reps,
                            backends=[b.strip() for b in backends.split(",")] if backends else None)
    _write_bench_json(result, json_out)
    for row in result["results"]:
        others = ", ".join(f"{b} {1e3 * row[b]['median_s']:.1f} ms ({row[b + '_speedup']:.2f}x)"
                           for b in result["backends"] if b != "torch")
        stderr.print(f"{row['component']:>12} batch {row['batch']:>2}: torch {1e3 * row['torch']['median_s']:.1f} ms, "
                     f"{others}", highlight=False)


@bench_app.command("pretrain")
@reports_usage_errors
def bench_pretrain_command(
    preset: Annotated[str, typer.Option("--preset", help="tiny (CPU) or sd15-random (GPU).")] = "tiny",
    samples: Annotated[int, typer.Option("--samples", help="Synthetic samples the loaders read.")] = 128,
    workers: Annotated[int, typer.Option("--workers", help="torch loader processes / DALI threads.")] = 2,
    reps: Annotated[int, typer.Option("--reps", help="Timed steps (median reported).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Loader images/s (torch vs DALI) and step time and peak memory (fused vs eager losses)."""
    import torch

    from magicseg_engine.bench.pretrain import bench_pretrain

    if samples <= 0 or reps <= 0 or warmup < 0 or workers < 0:
        raise UsageError("--samples and --reps must be positive, --warmup and --workers not negative")
    result = bench_pretrain(preset, torch.device(_resolve_device(device)), samples, workers, warmup, reps)
    _write_bench_json(result, json_out)
    loaders, step = result["loaders"], result["step"]
    dali = loaders["dali"].get("images_per_s")
    stderr.print(f"loader: torch {loaders['torch']['images_per_s']:.0f} images/s, "
                 + (f"DALI {dali:.0f} images/s" if dali else f"DALI skipped ({loaders['dali']['skipped']})")
                 + f"; step: eager {1e3 * step['eager']['median_s']:.1f} ms"
                 + (f", fused {1e3 * step['fused']['median_s']:.1f} ms" if "median_s" in step["fused"] else ""),
                 highlight=False)


@bench_app.command("quality")
@reports_usage_errors
def bench_quality_command(
    preset: Annotated[str, typer.Option("--preset", help="shapes: the only preset whose images can be checked against a truth.")] = "shapes",
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs to generate and score.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the classes, floors and noise of the pairs.")] = 0,
    model: Annotated[Optional[str], typer.Option("--model", help="A train-world folder instead of the shipped weights.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (preset default if unset).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="The shapes architecture with random weights: the floor any trained model must clear.")] = False,
    weights_seed: Annotated[int, typer.Option("--weights-seed", help="Seed of the --random-weights model, and of the detector's random weights.")] = 0,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also score the attention route over layers, steps, thresholds and self-attention refinement.")] = False,
    batch_size: BenchBatch = 16,
    device: BenchDevice = "auto",
    json_out: BenchJson = None,
    chart_out: Annotated[Optional[Path], typer.Option("--chart", help="Write a PNG chart of the results here.")] = None,
    picture: Annotated[Optional[Path], typer.Option("--picture", help="Write a PNG of six pairs here: positive, masks, truth, negative.")] = None,
) -> None:
    """Mask mIoU per route, counterfactual fidelity and prompt adherence, measured against the shapes world's truth."""
    from magicseg_engine.bench.quality import chart, run_quality
    from magicseg_engine.config import load_preset
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    if preset != "shapes":
        raise UsageError(f"bench quality needs --preset shapes: only the shapes world has a truth to score "
                         f"against, and {preset!r} draws other images")
    if pairs <= 0 or batch_size <= 0:
        raise UsageError("--pairs and --batch-size must be positive")
    if random_weights and model:
        raise UsageError("--random-weights and --model exclude each other; pick one")
    device = _resolve_device(device)
    config = load_preset(preset, {"seed": seed, "prompts": {"seed": seed}, "weights_seed": weights_seed,
                                  "diffusion": {"steps": steps, "guidance": guidance, "model": model,
                                                "weights": "random" if random_weights else None}})
    records = build_prompts(config.prompts, vocab=load_vocabulary("shapes"), num=pairs).records
    with progress_bar() as bar:
        on_progress = staged_progress(bar)
        result = run_quality(config, records, device, batch_size, sweep=sweep, progress=on_progress, picture=picture)
    _write_bench_json(result, json_out)
    if chart_out:
        chart(result, chart_out)
    _print_quality(result)


@bench_app.command("schedulers")
@reports_usage_errors
def bench_schedulers_command(
    preset: Annotated[str, typer.Option("--preset", help="shapes: the only preset whose images can be checked against a truth.")] = "shapes",
    schedulers: Annotated[str, typer.Option("--schedulers", help="Comma-separated: ddim, dpm-solver++, euler, unipc; the first is the baseline.")] = "ddim,dpm-solver++,euler,unipc",
    steps: Annotated[str, typer.Option("--steps", help="Comma-separated step counts; the first is the baseline's.")] = "20,10,5",
    fast: Annotated[str, typer.Option("--fast", help="Comma-separated fast levels (generate --fast); the first is the baseline's.")] = "0",
    pairs: Annotated[int, typer.Option("--pairs", help="Pairs rendered for every combination (the same prompts and seeds).")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the classes, floors and noise of the pairs.")] = 0,
    model: Annotated[Optional[str], typer.Option("--model", help="A train-world folder instead of the shipped weights.")] = None,
    batch_size: BenchBatch = 16,
    device: BenchDevice = "auto",
    json_out: BenchJson = None,
) -> None:
    """Mask mIoU, counterfactual fidelity, adherence and seconds per pair for each scheduler and step count."""
    from magicseg_engine.bench.schedulers import check_grid, run_scheduler_sweep
    from magicseg_engine.config import load_preset
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    if preset != "shapes":
        raise UsageError(f"bench schedulers needs --preset shapes: only the shapes world has a truth to score "
                         f"against, and {preset!r} draws other images")
    if pairs <= 0 or batch_size <= 0:
        raise UsageError("--pairs and --batch-size must be positive")
    names = [s.strip() for s in schedulers.split(",") if s.strip()]
    try:
        counts = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--steps {steps!r}: give whole numbers separated by commas, e.g. 20,10,5") from None
    try:
        levels = [int(s) for s in fast.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--fast {fast!r}: give fast levels separated by commas, e.g. 0,1,2") from None
    check_grid(names, counts, levels)
    device = _resolve_device(device)
    config = load_preset(preset, {"seed": seed, "prompts": {"seed": seed}, "diffusion": {"model": model}})
    records = build_prompts(config.prompts, vocab=load_vocabulary("shapes"), num=pairs).records
    with progress_bar() as bar:
        result = run_scheduler_sweep(config, records, names, counts, device, batch_size, progress=staged_progress(bar),
                                     fast=levels)
    _write_bench_json(result, json_out)
    base = result["baseline"]
    table = Table(title=f"schedulers, {preset} preset, {pairs} pairs, masks by {result['mask_route']} "
                        f"(baseline {base['scheduler']}, {base['steps']} steps, fast {base['fast']})")
    # mIoU of the preset's masks; the negatives without their class; pixels shared outside the
    # object; positives showing every requested colour; render seconds (capturing every step).
    columns = {"mIoU": "mask_miou", "absent": "class_absent", "agree": "pixel_agreement_outside",
               "colour": "adherence_colour", "s/pair": "seconds_per_pair", "speed-up": "speedup"}
    table.add_column("scheduler", no_wrap=True)
    table.add_column("steps", justify="right")
    table.add_column("fast", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(row["scheduler"], str(row["steps"]), str(row["fast"]),
                      *(f"{row[k]:.2f}x" if k == "speedup" else f"{row[k]:.3f}" for k in columns.values()))
    stderr.print(table)


@bench_app.command("ablation")
@reports_usage_errors
def bench_ablation_command(
    work: Annotated[Path, typer.Option("--work", help="Folder for the generated run, the pretraining runs and the evaluation set (kept; run again to resume).")],
    pairs: Annotated[int, typer.Option("--pairs", help="Generated pairs, and true-mask scenes for the upper bound.")] = 512,
    steps: Annotated[int, typer.Option("--steps", help="Pretraining steps of each arm.")] = 1200,
    eval_images: Annotated[int, typer.Option("--eval-images", help="Held-out scenes to evaluate on.")] = 128,
    held_out: Annotated[Optional[str], typer.Option("--held-out", help="Comma-separated classes kept out of generation and training (default: one per colour and shape).")] = None,
    bg_threshold: Annotated[float, typer.Option("--bg-threshold", help="Evaluation: a pixel is background unless a class scores above this (0.15 scored best of 0.05-0.5 here; evaluate's default is 0.5).")] = 0.15,
    train_classes: Annotated[Optional[str], typer.Option("--train-classes", help="Comma-separated classes to generate and train on (default: every other class); must not overlap --held-out.")] = None,
    text_tower: Annotated[str, typer.Option("--text-tower", help="The segmentation model's text tower: shapes (the shapes model's text encoder, as the paper starts from a pretrained CLIP) or random.")] = "shapes",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: BenchDevice = "auto",
    json_out: BenchJson = None,
) -> None:
    """The paper's ablation in miniature: pretrain on generated pairs with and without the counterfactual loss, on true masks, and not at all; evaluate on held-out classes."""
    from magicseg_engine.bench.ablation import ARMS, DEFAULT_HELD_OUT, run_ablation

    def split(text: str) -> list[str]:
        return [" ".join(c.split()).lower() for c in text.split(",") if c.strip()]

    names = split(held_out) if held_out else list(DEFAULT_HELD_OUT)
    train = split(train_classes) if train_classes else None
    with progress_bar() as bar:
        on_progress = staged_progress(bar)
        result = run_ablation(work, pairs=pairs, steps=steps, eval_images=eval_images, held_out=names, train=train,
                              seed=seed, bg_threshold=bg_threshold, text_tower=text_tower,
                              device=_resolve_device(device), progress=on_progress)
    _write_bench_json(result, json_out)
    table = Table(title=f"pretraining ablation: {pairs} pairs, {steps} steps, {eval_images} held-out scenes, "
                        f"{len(names)} unseen classes, {text_tower} text tower")
    # mIoU, then where the mistakes are: objects found (IoU of any class against background), and
    # on found pixels the share given the true colour, the true shape. The JSON has the rest.
    columns = {"mIoU": "miou", "seen": "miou_seen", "unseen": "miou_unseen", "found": "foreground_iou",
               "colour": "colour_accuracy", "shape": "shape_accuracy"}
    labels = dict(zip(ARMS, ("generated + CF", "generated, no CF", "true masks", "untrained")))
    table.add_column("trained on", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for arm, r in result["arms"].items():
        table.add_row(labels.get(arm, arm), *(fmt(r[key]) for key in columns.values()))
    stderr.print(table)


def _print_quality(result: dict) -> None:
    table = Table(title=f"mask quality, {result['preset']} preset ({result['masks']['attention']['images']} "
                        f"of {result['pairs']} pairs show every requested colour)")
    for column in ("route", "mIoU", "weights"):
        table.add_column(column, justify="right" if column == "mIoU" else "left")
    for route, r in result["masks"].items():
        table.add_row(route, f"{r['miou']:.3f}", r["weights"])
    stderr.print(table)
    adh, cf = result["adherence"], result["counterfactual"]
    stderr.print(
        f"adherence: {adh['all_classes']:.1%} of positives show every requested class (colour alone: "
        f"{adh['all_classes_colour']:.1%}). counterfactual: class absent from {cf['shared_noise']['class_absent']:.1%} "
        f"of negatives, pixel agreement outside the object {cf['shared_noise']['pixel_agreement_outside']:.1%} "
        f"(independent noise: {cf['independent_noise']['class_absent']:.1%}, "
        f"{cf['independent_noise']['pixel_agreement_outside']:.1%}).", highlight=False)
    rank = result["denoiser_ranking"]
    stderr.print(f"denoiser ranking on {rank['images']} true images: the true shape first {rank['shape_first']:.1%}, "
                 f"the true colour first {rank['colour_first']:.1%} (chance {rank['chance']['shape']:.1%}).",
                 highlight=False)
    if "sweep" in result:
        best = max(result["sweep"], key=lambda r: r["miou"])
        stderr.print(f"sweep: {len(result['sweep'])} settings; best mIoU {best['miou']:.3f} with factors "
                     f"{best['factors']}, steps {best['steps']}, threshold {best['threshold']}, self-attention "
                     f"power {best['self_attention_power']}", highlight=False)


def _bench_context(preset: str, device: str, warmup: int, reps: int, pairs: int = 8, batch_size: int = 8,
                   model: str | None = None, weights_seed: int = 0):
    import torch

    from magicseg_engine.bench.suite import BenchContext

    if min(reps, pairs, batch_size) <= 0 or warmup < 0:
        raise UsageError("--reps, --pairs and --batch-size must be positive, --warmup not negative")
    return BenchContext(preset, torch.device(_resolve_device(device)), warmup, reps, pairs, batch_size, model=model,
                        weights_seed=weights_seed)


def _write_bench_json(result: dict, json_out: Path | None) -> None:
    """The result as JSON: to `json_out` (whole or not at all), or to stdout."""
    from magicseg_engine.atomic import atomic_write_text

    text = json.dumps(result, indent=2) + "\n"
    if json_out:
        atomic_write_text(json_out, text)
    else:
        sys.stdout.write(text)


def _headline_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column, justify in (("bench", "left"), ("compared", "left"), ("ours", "right"), ("baseline", "right"),
                            ("ratio", "right"), ("note", "left")):
        table.add_column(column, justify=justify)
    for r in rows:
        def num(v):
            return "-" if v is None else f"{v:.3g} {r['unit']}"
        table.add_row(r["bench"], r["compared"], num(r["ours"]), num(r["baseline"]),
                      "-" if r["ratio"] is None else f"[bold]{r['ratio']:.2f}x[/]", r["note"] or "")
    return table


# What `bench losses`, `loader` and `train` measure is the pretraining preset's model on synthetic
# shards: no diffusion model, no pairs and (loader) no repetitions, so they offer none of those
# options; `unet` times batch sizes, not pairs, and `sam` up to 4 pairs in one batch.
_SAMPLER_OPTIONS = ("pairs", "batch_size", "model", "weights_seed")


def _suite_command(name: str, doc: str, without: tuple[str, ...] = ()):
    import inspect

    def command(
        preset: BenchPreset = "tiny", reps: BenchReps = 3, warmup: BenchWarmup = 1, device: BenchDevice = "auto",
        pairs: BenchPairs = 8, batch_size: BenchBatch = 8, json_out: BenchJson = None, model: BenchModel = None,
        weights_seed: BenchWeightsSeed = 0,
    ) -> None:
        from magicseg_engine.bench.suite import run_bench

        ctx = _bench_context(preset, device, warmup, reps, pairs, batch_size, model, weights_seed)
        stderr.print(f"bench {name} ({preset}) on {ctx.device}", highlight=False)
        result = run_bench(name, ctx)
        _write_bench_json(result, json_out)
        stderr.print(_headline_table([result["headline"]], f"bench {name}"))

    command.__doc__ = doc
    command.__name__ = f"bench_{name}_command"
    # The options a bench does not read are left out of its signature, so typer does not offer them
    # (the body sees their defaults).
    signature = inspect.signature(command, eval_str=True)
    command.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name not in without])
    bench_app.command(name)(reports_usage_errors(command))


_suite_command("pipeline", "Pairs/s from prompts to shards with masks, against the reference's one-image-at-a-time pipeline.")
_suite_command("unet", "UNet rows/s, TFLOP/s and peak memory against batch size; the reference's 2 rows as baseline.",
               without=("pairs",))
_suite_command("sam", "Batched SAM refinement against SamPredictor one image and one prompt at a time.",
               without=("batch_size",))
_suite_command("losses", "Fused Triton focal/dice and counterfactual losses against torch, forward + backward.",
               without=_SAMPLER_OPTIONS)
_suite_command("loader", "Images/s of the DALI loader against the torch loader over the same shards.",
               without=(*_SAMPLER_OPTIONS, "warmup", "reps"))
_suite_command("train", "Time and peak memory of one training step, fused against eager losses.",
               without=_SAMPLER_OPTIONS)


@bench_app.command("all")
@reports_usage_errors
def bench_all_command(
    preset: BenchPreset = "tiny", reps: BenchReps = 3, warmup: BenchWarmup = 1, device: BenchDevice = "auto",
    pairs: BenchPairs = 8, batch_size: BenchBatch = 8, json_out: BenchJson = None, model: BenchModel = None,
    weights_seed: BenchWeightsSeed = 0,
) -> None:
    """Every benchmark in one run: generate, unet, pipeline, masks, sam, losses, loader, train, with a summary."""
    from magicseg_engine.bench.suite import BENCHES, run_all

    ctx = _bench_context(preset, device, warmup, reps, pairs, batch_size, model, weights_seed)
    with progress_bar() as bar:
        task = bar.add_task(f"bench all ({preset})", total=len(BENCHES), unit="benches")
        result = run_all(ctx, on_result=lambda name, _: bar.advance(task))
    _write_bench_json(result, json_out)
    stderr.print(_headline_table(result["summary"], f"bench all: {preset} on {ctx.device}"))


@bench_app.command("tune")
@reports_usage_errors
def bench_tune_command(
    preset: BenchPreset = "tiny", reps: BenchReps = 3, warmup: BenchWarmup = 1, device: BenchDevice = "auto",
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated backend:dtype[:layout[:attention]][@threads], e.g. torch:float16:nchw,compile:bfloat16:nhwc:flash,torch:float32:nhwc@4,onnxruntime:float32@4; @threads sets torch.set_num_threads (generate --threads), onnxruntime takes no layout or attention and is exported once into a temporary folder (default: a GPU sweep of eager/compile, float16/bfloat16, NCHW/NHWC, auto/math attention; on the CPU, float32 NCHW, NHWC and math attention, and bfloat16 where the CPU has AMX or AVX512-BF16, at all physical cores, half of them and on small machines 1 thread, plus onnxruntime).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated pairs per UNet call. With guidance a pair is 4 UNet rows, and build-engines --batch-sizes counts rows: a TensorRT engine for batch B needs 4B there.")] = "4,8,16",
    pairs: Annotated[Optional[int], typer.Option("--pairs", help="Pairs per timed repetition (default: twice the largest batch).")] = None,
    reference_pairs: Annotated[int, typer.Option("--reference-pairs", help="Pairs the reference pipeline renders per repetition.")] = 4,
    encode_workers: Annotated[int, typer.Option("--encode-workers", help="Threads that JPEG-encode images.")] = 4,
    json_out: BenchJson = None,
    model: BenchModel = None,
    weights_seed: BenchWeightsSeed = 0,
) -> None:
    """Sweep backend, precision, memory layout, attention kernel, CPU threads and batch size end to end with masks, against the reference pipeline."""
    import torch

    from magicseg_engine.bench.common import bench_vocabulary
    from magicseg_engine.bench.suite import headline
    from magicseg_engine.bench.tune import bench_tune, default_variants, parse_variants, skipped_variants
    from magicseg_engine.config import load_preset
    from magicseg_engine.engine.build import parse_batch_sizes
    from magicseg_engine.prompts import build_prompts

    sizes = parse_batch_sizes(batch_sizes)
    pairs = pairs if pairs is not None else 2 * max(sizes)
    if min(reps, pairs, reference_pairs, encode_workers) <= 0 or warmup < 0:
        raise UsageError("--reps, --pairs, --reference-pairs and --encode-workers must be positive, "
                         "--warmup not negative")
    dev = torch.device(_resolve_device(device))
    chosen = parse_variants(variants, dev) if variants is not None else default_variants(dev)
    skipped = skipped_variants(dev) if variants is None else []
    config = load_preset(preset, {"weights_seed": weights_seed, "diffusion": {"model": model}})
    records = build_prompts(config.prompts, vocab=bench_vocabulary(config), num=max(pairs, reference_pairs)).records
    with progress_bar() as bar:
        task = bar.add_task(f"bench tune ({preset})", total=len(chosen) + 1, unit="variants")
        result = bench_tune(preset, dev, chosen, records[:pairs], records[:reference_pairs], sizes, encode_workers,
                            warmup, reps, seed=config.weights_seed, on_step=lambda _: bar.advance(task), model=model,
                            skipped=skipped)
    result["headline"] = headline("tune", result)
    _write_bench_json(result, json_out)
    table = Table(title=f"bench tune: {preset} on {dev}")
    table.add_column("variant", no_wrap=True)
    for column in ("batch", "pairs/s", "UNet TFLOP/s", "of peak", "peak memory"):
        table.add_column(column, justify="right")
    for v in result["variants"]:
        if "error" in v:  # the error itself was logged when the variant failed, and is in the JSON
            table.add_row(v["variant"], "-", "failed", "", "", "")
            continue
        frac, mem = v["unet"]["fraction_of_peak"], v["best"]["peak_memory_bytes"]
        table.add_row(v["variant"], str(v["best"]["batch_size"]), f"{v['best']['pairs_per_s']:.3g}",
                      f"{v['unet']['tflops_per_s']:.3g}", "-" if frac is None else f"{100 * frac:.1f}%",
                      "-" if mem is None else f"{mem / 2**30:.1f} GiB")
    table.add_row("reference", "1", f"{result['reference']['pairs_per_s']:.3g}", "", "", "")
    stderr.print(table)
    for s in result["skipped"]:
        stderr.print(f"skipped {s['variant']}: {s['reason']}", highlight=False)
    stderr.print(_headline_table([result["headline"]], "bench tune"))
    best = result["best"]
    if best["build_engines"]:  # the sweep's own exports were temporary
        stderr.print(f"export first: {best['build_engines']}", highlight=False)
    stderr.print(f"fastest here: magicseg-engine generate --preset {preset} {best['generate_flags']} ...",
                 highlight=False)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return device


def main() -> None:
    app()


if __name__ == "__main__":
    main()
