"""The `magicseg-engine` command line: thin wrappers that parse flags and call the stages."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except UsageError as err:
            stderr.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=UsageError.exit_code) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=stderr, transient=True,
    )


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


class Source(str, Enum):
    templates = "templates"
    llm = "llm"
    file = "file"


@app.command()
@reports_usage_errors
def prompts(
    out: Annotated[Path, typer.Option("--out", help="Output JSON-lines file.")],
    classes: Annotated[Optional[str], typer.Option("--classes", help="voc, context, coco-object, coco-stuff, or a class file (one per line).")] = None,
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
    llm_cache: Annotated[Optional[Path], typer.Option("--llm-cache", help="Cache of answered requests (default: beside --out).")] = None,
) -> None:
    """Write positive and counterfactual negative prompts as JSON lines."""
    from pydantic import ValidationError

    from magicseg_engine.atomic import check_writable_dir
    from magicseg_engine.config import PromptsConfig, describe_validation_error, save_config
    from magicseg_engine.prompts import build_prompts, write_records
    from magicseg_engine.vocab import load_vocabulary

    llm = {"base_url": llm_base_url, "model": llm_model, "api_key_env": llm_api_key_env, "concurrency": llm_concurrency}
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


def main() -> None:
    app()
