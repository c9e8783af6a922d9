"""Class vocabularies: the shipped benchmark lists and user files, one class per line."""

from __future__ import annotations

import logging
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

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Position of `name` (case-insensitive) in the list."""
        lowered = [c.lower() for c in self.classes]
        return lowered.index(name.strip().lower())


def parse_class_lines(text: str, origin: str) -> Vocabulary:
    """Parse one-class-per-line text: `#` starts a comment, blank lines are skipped,
    whitespace is normalised, and repeated names (case-insensitive) are dropped with a warning."""
    classes: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        name = " ".join(raw.split("#", 1)[0].split())
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
    if not classes:
        raise UsageError(f"{origin} lists no classes; write one class name per line")
    if duplicates:
        log.warning("%s: removed %d duplicate class name(s): %s", origin, len(duplicates),
                    ", ".join(sorted(set(duplicates))))
    return Vocabulary(name=origin, classes=tuple(classes), duplicates=tuple(duplicates))


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
    return parse_class_lines(text, str(path))
