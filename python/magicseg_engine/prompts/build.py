"""Turn a prompts configuration into prompt records, whatever the description source."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magicseg_engine.config import PromptsConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.prompts.counterfactual import CounterfactualError, make_negative, mentions
from magicseg_engine.prompts.prompt_file import read_prompt_file
from magicseg_engine.prompts.records import PromptRecord, sample_seed
from magicseg_engine.prompts.sampling import sample_class_combos
from magicseg_engine.prompts.templates import describe_from_templates
from magicseg_engine.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class PromptsResult:
    records: list[PromptRecord]
    skipped_lines: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0
    llm_stats: Any = None


def _check_token(token: str, classes: tuple[str, ...]) -> None:
    named = [c for c in classes if mentions(token, c)]
    if named:
        raise UsageError(f"negative token {token!r} names the class {named[0]!r}; choose a token that is no class")


def _dedupe(records: list[PromptRecord]) -> tuple[list[PromptRecord], int]:
    seen: set[str] = set()
    unique = []
    for r in records:
        if r.id not in seen:
            seen.add(r.id)
            unique.append(r)
    return unique, len(records) - len(unique)


def build_prompts(
    config: PromptsConfig,
    *,
    vocab: Vocabulary | None,
    num: int | None,
    prompt_file: Path | None = None,
    skip_invalid: bool = False,
    llm_cache: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> PromptsResult:
    """Records for `num` samples (or every line of `prompt_file`), in a deterministic order."""
    if num is not None and num <= 0:
        raise UsageError(f"--num must be a positive number of prompts, got {num}")
    if vocab is not None:
        _check_token(config.negative_token, vocab.classes)

    if config.source == "file":
        if prompt_file is None:
            raise UsageError("--source file needs --prompt-file PATH")
        return _from_file(config, vocab, num, prompt_file, skip_invalid, progress)

    if vocab is None:
        raise UsageError(f"--source {config.source} needs --classes (a vocabulary name or class file)")
    if num is None:
        raise UsageError(f"--source {config.source} needs --num, the number of prompts to write")
    combos = sample_class_combos(vocab.classes, num, config.max_classes_per_sample, config.seed, vocab.weights)
    stats = None
    if config.source == "world":
        from magicseg_engine.world.prompts import describe_world

        combos, descriptions = describe_world(combos, config.seed)
        if progress:
            progress(len(combos))
    elif config.source == "templates":
        descriptions = []
        for i, combo in enumerate(combos):
            # One generator per sample: any sample can be rebuilt without the ones before it.
            descriptions.append(describe_from_templates(combo, random.Random(f"{config.seed}/{i}")))
            if progress:
                progress(1)
    else:
        from magicseg_engine.prompts.llm import describe_with_llm

        if llm_cache is None:
            raise UsageError("--source llm needs a cache path (--llm-cache)")
        descriptions, stats = describe_with_llm(combos, config.llm, llm_cache, progress)

    records = []
    for i, (combo, description) in enumerate(zip(combos, descriptions)):
        try:
            negative = make_negative(description, combo, config.negative_token)
        except CounterfactualError as err:
            raise UsageError(f"sample {i}: {err}") from None
        records.append(PromptRecord(classes=combo, prompt=description, negative_prompt=negative,
                                    seed=sample_seed(config.seed, i), source=config.source))
    records, duplicates = _dedupe(records)
    return PromptsResult(records, duplicates=duplicates, llm_stats=stats)


def _from_file(
    config: PromptsConfig, vocab: Vocabulary | None, num: int | None, path: Path,
    skip_invalid: bool, progress: Callable[[int], None] | None,
) -> PromptsResult:
    allowed = {c.lower() for c in vocab.classes} if vocab is not None else None
    entries, skipped = read_prompt_file(path, config.max_classes_per_sample, allowed, skip_invalid)
    records = []
    for i, entry in enumerate(entries):
        try:
            negative = entry.negative_prompt or make_negative(entry.prompt, entry.classes, config.negative_token)
        except CounterfactualError as err:
            if not skip_invalid:
                raise UsageError(f"{path}:{entry.lineno}: {err}; fix the line or pass --skip-invalid") from None
            skipped.append((entry.lineno, str(err)))
            continue
        seed = entry.seed if entry.seed is not None else sample_seed(config.seed, i)
        records.append(PromptRecord(classes=entry.classes, prompt=entry.prompt,
                                    negative_prompt=negative, seed=seed, source="file"))
        if progress:
            progress(1)
    records, duplicates = _dedupe(records)
    if duplicates:
        log.warning("%s: dropped %d duplicate prompt(s) (same classes, prompts and seed)", path, duplicates)
    if num is not None:
        if len(records) < num:
            raise UsageError(f"{path} has {len(records)} usable prompts, fewer than --num {num}")
        records = records[:num]
    if not records:
        raise UsageError(f"{path} holds no usable prompts")
    return PromptsResult(records, skipped_lines=skipped, duplicates=duplicates)
