"""Class vocabularies: the shipped benchmark lists and user files, one class per line.

A user file may weight its classes, to draw some more often than others (the rare classes of a
target benchmark, say): `name,weight` lines (a line without a weight weighs 1), or a JSON
object `{"name": weight, ...}` in a `.json` file. Weights are non-negative numbers, relative to
each other; a class of weight 0 stays in the list (its label keeps its place) but is never drawn.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import unicodedata
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
    entries = []
    weighted = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        weight = 1.0
        if "," in line:
            line, weight_text = line.rsplit(",", 1)
            weight = _weight(weight_text.strip(), f"{origin}:{lineno}")
            weighted = True
        entries.append((f"{origin}:{lineno}", line, weight))
    return _collect(entries, origin, weighted)


def parse_class_weights(text: str, origin: str) -> Vocabulary:
    """A JSON object of class name -> weight, in the object's order."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{origin} is not valid JSON (line {err.lineno}: {err.msg}); write an object "
                         '{"class name": weight, ...}') from None
    except ValueError as err:  # an integer too long to convert (Python refuses over 4300 digits)
        raise UsageError(f"{origin} holds a number json cannot read ({str(err).split(';')[0]}); write weights "
                         "such as 1 or 2.5") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f'{origin} must hold a JSON object {{"class name": weight, ...}} with at least one class')
    entries = []
    for name, weight in data.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UsageError(f"{origin}: weight of {name!r} is {json.dumps(weight)[:40]}, not a non-negative number")
        # Through float as a line's weight would be: 1e999 and huge integers are infinite there.
        try:
            value = float(weight)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{origin}: weight of {name!r} is not a non-negative number; give weights such as 1 or 2.5")
        # Names are taken as they are, not re-parsed as lines: a "#" or a line break in a key
        # must not cut the name or make two classes of it.
        entries.append((f"{origin}: class {name[:60]!r}", name, value))
    return _collect(entries, origin, weighted=True)


def _collect(entries, origin: str, weighted: bool) -> Vocabulary:
    """The vocabulary of (where, raw name, weight) entries: names normalised and checked,
    blank ones skipped, repeats (case-insensitive) dropped with a warning."""
    classes: list[str] = []
    weights: list[float] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for where, raw, weight in entries:
        name = " ".join(raw.split())
        if not name:
            continue
        bad = [ch for ch in _FORBIDDEN if ch in name]
        if bad:
            raise UsageError(f"{where}: class name {name!r} contains {bad[0]!r}; "
                             "write one class per line without commas or colons")
        control = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
        if control is not None:
            # NUL between letters is what a UTF-16 file without its byte-order mark looks like.
            hint = " (NUL between letters: it was saved as UTF-16)" if control == "\0" else ""
            raise UsageError(f"{where}: class name {name[:40]!r} contains the control character "
                             f"U+{ord(control):04X}; save the file as UTF-8 text{hint}")
        if not any(ch.isalpha() for ch in name):
            raise UsageError(f"{where}: class name {name!r} has no letters; write one class name per line")
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


def decode_text_file(data: bytes, path: Path, what: str) -> str:
    """The text of a file a user wrote: UTF-8, with or without the byte-order mark some editors
    put in front. UTF-16 and UTF-32 (what Windows editors save as "Unicode") are recognised by
    their mark and refused with a word on how to save the file, as is anything else that is
    not UTF-8: a guess (latin-1 reads any bytes) would turn names into mojibake silently."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                       (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            raise UsageError(f"{what} {path} is {codec} text, not UTF-8 (it starts with a {codec} byte-order mark); "
                             "save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # utf-8-sig counts positions after a mark it removed; the user's editor counts from the start.
        offset = err.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data[:offset].count(b"\n") + 1
        raise UsageError(f"{what} {path} is not UTF-8 text (line {line}, byte {offset}); save it as UTF-8") from None


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
        text = decode_text_file(path.read_bytes(), path, "class file")
    except OSError as err:
        raise UsageError(f"cannot read class file {path}: {err.strerror}") from None
    if path.suffix.lower() == ".json":
        return parse_class_weights(text, str(path))
    return parse_class_lines(text, str(path))
