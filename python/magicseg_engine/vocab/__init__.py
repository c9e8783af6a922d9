"""Class vocabularies: the shipped benchmark lists and user files, one class per line.

A user file may weight its classes, to draw some more often than others (the rare classes of a
target benchmark, say): `name,weight` lines (a line without a weight weighs 1), or a JSON
object `{"name": weight, ...}` in a `.json` file. Weights are non-negative numbers, relative to
each other; a class of weight 0 stays in the list (its label keeps its place) but is never drawn.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)

BUILTIN = {
    "voc": "voc.txt",
    "context": "context.txt",
    "coco-object": "coco-object.txt",
    "coco-stuff": "coco-stuff.txt",
    "shapes": "shapes.txt",
}

# The reference prompt-file format is `cls1,cls2: description`, so these cannot be in a name.
_FORBIDDEN = (",", ":")


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[str, ...]
    duplicates: tuple[str, ...] = field(default=())
    # One weight per class, None where the file gives none: every class drawn equally often.
    weights: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Position of `name` (case-insensitive) in the list."""
        lowered = [c.lower() for c in self.classes]
        return lowered.index(name.strip().lower())


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise UsageError(f"{where}: weight {text!r} is not a non-negative number; write `name,weight` "
                         "with a weight such as 1 or 2.5")
    return weight


def parse_class_lines(text: str, origin: str) -> Vocabulary:
    """Parse one-class-per-line text: `#` starts a comment, blank lines are skipped,
    whitespace is normalised, and repeated names (case-insensitive) are dropped with a warning.
    A line `name,weight` weights its class (see the module docstring)."""
    classes: list[str] = []
    weights: list[float] = []
    weighted = False
    seen: set[str] = set()
    duplicates: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        weight = 1.0
        if "," in line:
            line, weight_text = line.rsplit(",", 1)
            weight = _weight(weight_text.strip(), f"{origin}:{lineno}")
            weighted = True
        name = " ".join(line.split())
        if not name:
            continue
        bad = [ch for ch in _FORBIDDEN if ch in name]
        if bad:
            raise UsageError(f"{origin}:{lineno}: class name {name!r} contains {bad[0]!r}; "
                             "write one class per line without commas or colons")
        if not any(ch.isalpha() for ch in name):
            raise UsageError(f"{origin}:{lineno}: class name {name!r} has no letters; write one class name per line")
        key = name.lower()
        if key in seen:
            duplicates.append(name)
            continue
        seen.add(key)
        classes.append(name)
        weights.append(weight)
    if not classes:
        raise UsageError(f"{origin} lists no classes; write one class name per line")
    if duplicates:
        log.warning("%s: removed %d duplicate class name(s): %s", origin, len(duplicates),
                    ", ".join(sorted(set(duplicates))))
    return _checked(Vocabulary(name=origin, classes=tuple(classes), duplicates=tuple(duplicates),
                               weights=tuple(weights) if weighted else None))


def parse_class_weights(text: str, origin: str) -> Vocabulary:
    """A JSON object of class name -> weight, in the object's order."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{origin} is not valid JSON (line {err.lineno}: {err.msg}); write an object "
                         '{"class name": weight, ...}') from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f'{origin} must hold a JSON object {{"class name": weight, ...}} with at least one class')
    lines = []
    for name, weight in data.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UsageError(f"{origin}: weight of {name!r} is {json.dumps(weight)}, not a non-negative number")
        lines.append(f"{name},{weight!r}")
    return parse_class_lines("\n".join(lines), origin)


def _checked(vocab: Vocabulary) -> Vocabulary:
    if vocab.weights is not None and not any(w > 0 for w in vocab.weights):
        raise UsageError(f"{vocab.name}: every class has weight 0, so none would be drawn; give some a positive weight")
    return vocab


def load_vocabulary(spec: str) -> Vocabulary:
    """A shipped vocabulary by name (voc, context, coco-object, coco-stuff) or a user file by path."""
    if spec in BUILTIN:
        text = resources.files(__package__).joinpath("data", BUILTIN[spec]).read_text(encoding="utf-8")
        return parse_class_lines(text, spec)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"unknown vocabulary {spec!r}: use one of {', '.join(BUILTIN)} or a path to a class file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"class file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UsageError(f"cannot read class file {path}: {err.strerror}") from None
    if path.suffix.lower() == ".json":
        return parse_class_weights(text, str(path))
    return parse_class_lines(text, str(path))
