"""Read prompts a user wrote: reference lines `cls1,cls2: description`, or our JSON lines."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from magicseg_engine.errors import UsageError
from magicseg_engine.prompts.counterfactual import missing_classes
from magicseg_engine.prompts.records import MAX_SEED
from magicseg_engine.vocab import decode_text_file


@dataclass(frozen=True)
class PromptLine:
    lineno: int
    classes: tuple[str, ...]
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


class InvalidLine(ValueError):
    pass


def _parse_reference(line: str) -> PromptLine:
    head, sep, description = line.partition(":")
    if not sep:
        raise InvalidLine("expected 'cls1,cls2: description'")
    classes = tuple(" ".join(c.split()) for c in head.split(","))
    if not all(classes):
        raise InvalidLine(f"empty class name in {head!r}")
    description = description.strip()
    if not description:
        raise InvalidLine("empty description")
    return PromptLine(0, classes, description)


def _parse_json(line: str) -> PromptLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InvalidLine(f"invalid JSON ({err.msg})") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise InvalidLine("invalid JSON (a number too long to read)") from None
    if not isinstance(obj, dict):
        raise InvalidLine("a JSON line must be an object")
    classes = obj.get("classes")
    if isinstance(classes, str):
        classes = classes.split(",")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise InvalidLine("'classes' must be a non-empty list of names")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidLine("'prompt' must be a non-empty string")
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidLine("'negative_prompt' must be a string")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED):
        raise InvalidLine("'seed' must be a non-negative integer below 2**64")
    return PromptLine(0, tuple(" ".join(c.split()) for c in classes), prompt.strip(), negative, seed)


def _check(entry: PromptLine, max_classes: int, allowed: set[str] | None) -> None:
    for name in entry.classes:
        if not any(ch.isalpha() for ch in name) or any(unicodedata.category(ch) == "Cc" for ch in name):
            raise InvalidLine(f"class name {name[:40]!r} needs letters and no control characters")
    if len(entry.classes) > max_classes:
        raise InvalidLine(f"{len(entry.classes)} classes, at most {max_classes} allowed")
    if allowed is not None:
        unknown = [c for c in entry.classes if c.lower() not in allowed]
        if unknown:
            raise InvalidLine(f"class {unknown[0]!r} is not in the vocabulary")
    absent = missing_classes(entry.prompt, entry.classes)
    if absent:
        raise InvalidLine(f"description does not mention {absent[0]!r}")
    if entry.negative_prompt is not None:
        still = [c for c in entry.classes if not missing_classes(entry.negative_prompt, [c])]
        if still:
            raise InvalidLine(f"negative_prompt still mentions {still[0]!r}")


def read_prompt_file(
    path: Path, max_classes: int, allowed: set[str] | None = None, skip_invalid: bool = False
) -> tuple[list[PromptLine], list[tuple[int, str]]]:
    """Valid entries, and (line number, reason) for each skipped line.

    Blank lines and lines starting with `#` are ignored. A line starting with `{` is JSON,
    anything else the reference format. Without `skip_invalid` the first bad line raises
    UsageError naming it.
    """
    try:
        text = decode_text_file(Path(path).read_bytes(), path, "prompt file")
    except FileNotFoundError:
        raise UsageError(f"prompt file {path} does not exist; pass an existing file to --prompt-file") from None
    except OSError as err:
        raise UsageError(f"cannot read prompt file {path}: {err.strerror}") from None
    entries: list[PromptLine] = []
    skipped: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = _parse_json(line) if line.startswith("{") else _parse_reference(line)
            _check(entry, max_classes, allowed)
        except InvalidLine as err:
            if not skip_invalid:
                raise UsageError(f"{path}:{lineno}: {err}; fix the line or pass --skip-invalid") from None
            skipped.append((lineno, str(err)))
            continue
        entries.append(PromptLine(lineno, entry.classes, entry.prompt, entry.negative_prompt, entry.seed))
    return entries, skipped
