"""Find class mentions in text and rewrite a positive prompt into its counterfactual negative.

A mention is a whole-word, case-insensitive occurrence of a class name in its singular or
plural form (irregular plurals included: person/people, mouse/mice, knife/knives). The words
of a multi-word name may be separated by spaces or hyphens ("traffic light", "traffic-light").
When the counterfactual is built, a determiner directly in front of a mention ("a", "the",
"two", "a group of", ...) goes with it, so "a dog on the grass" becomes "nothing on the grass"
rather than "a nothing on the grass".
"""

from __future__ import annotations

import re
from functools import lru_cache

import inflect

_inflect = inflect.engine()

# Words and phrases that introduce a noun phrase and make no sense once the noun is gone.
_DETERMINERS = (
    "a", "an", "the", "some", "any", "this", "that", "these", "those", "another", "each",
    "every", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "several", "many", "few", "a few", "multiple", "numerous", "lots of", "a lot of",
    "a couple of", "a pair of", "a group of", "a herd of", "a flock of", "a pack of",
    "a bunch of", "a row of", "a pile of", "a stack of", "a set of",
    "my", "your", "his", "her", "its", "our", "their",
)
DETERMINER_WORDS = frozenset(w for d in _DETERMINERS for w in d.split())


class CounterfactualError(ValueError):
    """A prompt could not be turned into a negative that is free of its classes."""


def is_plural_name(name: str) -> bool:
    """True for names that are already plural ("skis", "clouds", "leaves")."""
    name = name.strip().lower()
    return (
        name.endswith("s")
        and _inflect.plural_noun(name) == name + "s"
        and bool(_inflect.singular_noun(name))
    )


@lru_cache(maxsize=4096)
def name_forms(name: str) -> tuple[str, ...]:
    """The surface forms of a class name that count as a mention: itself and its other number."""
    name = " ".join(name.strip().lower().split())
    if not name:
        raise ValueError("a class name must contain at least one letter")
    other = _inflect.singular_noun(name) if is_plural_name(name) else _inflect.plural_noun(name)
    forms = {name}
    if other:
        forms.add(other.lower())
    # Longest first, so that an alternation prefers "traffic lights" over "traffic light".
    return tuple(sorted(forms, key=lambda f: (-len(f), f)))


def _form_regex(form: str) -> str:
    return r"[\s\-]+".join(re.escape(w) for w in form.split())


def _names_regex(names: tuple[str, ...]) -> str:
    forms = sorted({f for n in names for f in name_forms(n)}, key=lambda f: (-len(f), f))
    return "|".join(_form_regex(f) for f in forms)


@lru_cache(maxsize=4096)
def _mention_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w])(?:{_names_regex(names)})(?![\w])", re.IGNORECASE)


_DETERMINER_REGEX = "|".join(
    _form_regex(d) for d in sorted(_DETERMINERS, key=lambda d: (-len(d), d))
)


@lru_cache(maxsize=4096)
def _removal_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(
        rf"(?<![\w])(?:(?:{_DETERMINER_REGEX})\s+)?(?:{_names_regex(names)})(?![\w])",
        re.IGNORECASE,
    )


def find_mentions(text: str, name: str) -> list[tuple[int, int]]:
    """Character spans of every mention of `name` in `text`."""
    return [m.span() for m in _mention_pattern((name,)).finditer(text)]


def mentions(text: str, name: str) -> bool:
    return _mention_pattern((name,)).search(text) is not None


def missing_classes(text: str, classes: list[str] | tuple[str, ...]) -> list[str]:
    """The classes that `text` does not mention."""
    return [c for c in classes if not mentions(text, c)]


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def make_negative(prompt: str, classes: list[str] | tuple[str, ...], token: str = "nothing") -> str:
    """Replace every mention of every class (with its determiner) by `token`.

    Raises CounterfactualError when the prompt does not mention one of its classes (the pair
    would then show the same thing twice) or when a class still shows in the result (for
    example because `token` itself names one).
    """
    classes = tuple(classes)
    absent = missing_classes(prompt, classes)
    if absent:
        raise CounterfactualError(
            f"prompt does not mention {', '.join(repr(c) for c in absent)}: {prompt!r}"
        )

    def replace(match: re.Match[str]) -> str:
        at_start = not prompt[: match.start()].strip()
        if at_start and match.group(0)[:1].isupper() and token:
            return token[:1].upper() + token[1:]
        return token

    negative = _tidy(_removal_pattern(tuple(sorted(set(classes)))).sub(replace, prompt))
    survivors = [c for c in classes if mentions(negative, c)]
    if survivors:
        raise CounterfactualError(
            f"negative prompt still mentions {', '.join(repr(c) for c in survivors)}: "
            f"{negative!r} (is the replacement token {token!r} a class name?)"
        )
    return negative
