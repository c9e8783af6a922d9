"""Find class mentions in text and rewrite a positive prompt into its counterfactual negative.

The positive prompt names the object a mask is read for; the negative, rendered from the same
noise, must show the same scene without it. So the matcher tells two things apart:

* a **mention** is a whole-word, case-insensitive occurrence of a class name, singular or plural
  (person/people, mouse/mice, knife/knives), its words separated by spaces or hyphens
  ("traffic light", "traffic-light"), that names the object itself. Masks read mentions only,
  and the negative replaces each mention, with the determiner in front of it ("a", "two",
  "a group of", "3"), by the token: "a dog on the grass" -> "nothing on the grass".
* the same words in any other role name something else. Where that something is a different
  thing altogether, they are left alone; where the words could still draw the class, the
  negative drops them and keeps the rest of the phrase.

The rules, in the order they apply:

1. **The longest known name wins.** The known names are those of the shipped real-image
   vocabularies (or a vocabulary the caller passes), the classes at hand, and a few compounds
   whose last word is a class word but which name something else (`DIFFERENT_THINGS`: "corn
   dog", "sea lion"). "hot dog" and "teddy bear" are names of their own, so they are never
   mentions of "dog" or "bear", whether or not they are being removed: a hot dog shows no dog,
   and where both names are labels (COCO) its pixels belong to "hot dog". The same holds for a
   longer name that is a kind of the shorter one ("dining table", "brick wall", "stop sign"):
   it is a label of its own in the vocabularies that list it, so removing "table" keeps "a
   dining table".
2. **A class word that modifies a following noun is not a mention**, since the phrase names the
   noun ("bus stop", "dog bowl", "cat food", "car park"): the mask would outline the stop, not a
   bus. The following noun is a known name or one of `COMPOUND_HEADS`; only a singular form
   modifies (English compounds take "dog bowl", not "dogs bowl"). When a singular determiner
   introduces the class word, a plural-looking word after it is a verb ("a bus stops", "a person
   plants a tree"); elsewhere it is read as a compound ("the bus stops"), which can only cost a
   prompt, never put a stop in the bus's mask. In the
   negative the modifier is dropped and the head kept ("a bus stop" -> "a stop"), because the
   word alone can draw the class; when the head is removed its modifiers go with it ("a dog
   bed" without bed -> "nothing"). A class word hyphenated to a word that is no noun is part of
   an adjective ("horse-drawn", "dog-friendly"): the negative drops the whole adjective.
3. **A possessive is not a mention** either ("a dog's bowl" is about the bowl, and the picture
   may show no dog). The negative drops the possessor and its "'s", and the possessor's
   determiner now goes with the possessed noun: "a dog's bowl" -> "a bowl", "my cat's toy" ->
   "my toy", "the dogs' bowls" -> "the bowls".

Around every edit: "a"/"an" is re-chosen for the word that follows a dropped word ("an orange
cat" without orange -> "a cat"); a replacement or a dropped word at the start of a sentence
keeps the sentence's capital ("A sheep. A sheep." -> "Nothing. Nothing.", "Dog bowls on the
floor." -> "Bowls on the floor."); spacing and punctuation are tidied. Adjectives stay ("an
old mouse" -> "an old nothing").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import inflect

_inflect = inflect.engine()

# Words and phrases that introduce a noun phrase and make no sense once the noun is gone.
_DETERMINERS = (
    "a", "an", "the", "some", "any", "this", "that", "these", "those", "another", "each",
    "every", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "twelve", "dozens of", "hundreds of", "several", "many", "few", "a few", "multiple",
    "numerous", "lots of", "a lot of", "all", "all the", "both", "both the", "no",
    "a couple of", "a pair of", "a group of", "a herd of", "a flock of", "a pack of",
    "a bunch of", "a row of", "a pile of", "a stack of", "a set of", "a number of",
    "my", "your", "his", "her", "its", "our", "their",
)
DETERMINER_WORDS = frozenset(w for d in _DETERMINERS for w in d.split())
_DETERMINER_PHRASES = frozenset(tuple(d.split()) for d in _DETERMINERS)
_LONGEST_DETERMINER = max(len(d) for d in _DETERMINER_PHRASES)

# Determiners that take a singular noun: after them a plural-looking word is a verb
# ("a bus stops"), so the class word before it heads its phrase.
_SINGULAR_DETERMINERS = frozenset({"a", "an", "one", "this", "that", "another", "each", "every"})

# Compounds whose last word is a class word of the shipped vocabularies but which name another
# thing; the vocabularies hold more of them themselves ("hot dog", "teddy bear"). A compound
# that names a kind of its last word ("polar bear", "race car") is no such compound.
DIFFERENT_THINGS = (
    "hot dog", "corn dog", "prairie dog", "teddy bear", "gummy bear", "sea lion", "sea cow",
    "sea horse", "rocking horse", "hobby horse", "cable car",
)

# Nouns that class words commonly modify, besides the vocabularies' own names (which are nouns
# too: "dog bowl", "cat food", "bird cage"): places, gear and parts named after the object,
# people who handle it, food made of it. A class word in front of one of these names the
# noun, not the object; see rule 2 of the module docstring.
COMPOUND_HEADS = (
    "stop", "station", "park", "lot", "lane", "yard", "garage", "shop", "stand", "stall", "pen",
    "kennel", "stable", "dock", "race", "show", "toy", "leash", "collar", "treat", "seat",
    "wheel", "tire", "saddle", "rack", "cart", "crate", "case", "basket", "box", "pad",
    "feeder", "nest", "driver", "rider", "owner", "walker", "juice", "pie", "bread", "peel",
    "slope", "field", "trail", "path", "castle", "tank", "boot", "pole",
)

# The vocabularies whose names are labels of real images; the shapes world's names are not.
_KNOWN_VOCABULARIES = ("voc", "context", "coco-object", "coco-stuff")

_WORD = re.compile(r"[^\W_]+")
_APOSTROPHES = "'\u2019"
_JOINER = re.compile(r"[\s\-]+")
_SENTENCE_END = ".!?"
_OPENERS = "\"'\u201c\u2018([{"


class CounterfactualError(ValueError):
    """A prompt could not be turned into a negative that is free of its classes."""


def _normalise(name: str) -> str:
    return " ".join(name.strip().lower().split())


def is_plural_name(name: str) -> bool:
    """True for names that are already plural ("skis", "clouds", "leaves")."""
    name = name.strip().lower()
    return (
        name.endswith("s")
        and _inflect.plural_noun(name) == name + "s"
        and bool(_inflect.singular_noun(name))
    )


def _singular_form(name: str) -> str:
    """The form of a name that can modify a following noun ("ski" for "skis", "dog" for "dogs")."""
    return (_inflect.singular_noun(name) or name) if is_plural_name(name) else name


@lru_cache(maxsize=4096)
def name_forms(name: str) -> tuple[str, ...]:
    """The surface forms of a class name that count as a mention: itself and its other number."""
    name = _normalise(name)
    if not name:
        raise ValueError("a class name must contain at least one letter")
    other = _inflect.singular_noun(name) if is_plural_name(name) else _inflect.plural_noun(name)
    forms = {name}
    if other:
        forms.add(other.lower())
    # Longest first, so that an alternation prefers "traffic lights" over "traffic light".
    return tuple(sorted(forms, key=lambda f: (-len(f), f)))


@lru_cache(maxsize=1)
def _shipped_names() -> tuple[str, ...]:
    from magicseg_engine.vocab import load_vocabulary

    return tuple(sorted({c for v in _KNOWN_VOCABULARIES for c in load_vocabulary(v).classes}))


@lru_cache(maxsize=1)
def _head_words() -> tuple[frozenset[str], frozenset[str]]:
    """COMPOUND_HEADS in the singular, and their plurals."""
    singular = frozenset(COMPOUND_HEADS)
    return singular, frozenset(_inflect.plural_noun(h) for h in COMPOUND_HEADS)


@dataclass(frozen=True)
class _Index:
    # first word -> the known forms starting with it (word tuples), longest first
    forms: dict[str, tuple[tuple[str, ...], ...]]
    singular: frozenset[tuple[str, ...]]  # forms that may modify a following noun


@lru_cache(maxsize=256)
def _index(names: tuple[str, ...], vocabulary: tuple[str, ...] | None) -> _Index:
    known = set(DIFFERENT_THINGS) | set(names)
    known |= set(_shipped_names() if vocabulary is None else vocabulary)
    by_first: dict[str, set[tuple[str, ...]]] = {}
    singular: set[tuple[str, ...]] = set()
    for name in known:
        if not _normalise(name):
            continue
        single = tuple(_WORD.findall(_singular_form(_normalise(name))))
        for form in name_forms(name):
            words = tuple(_WORD.findall(form))
            if words:
                by_first.setdefault(words[0], set()).add(words)
                if words == single:
                    singular.add(words)
    return _Index(
        {w: tuple(sorted(f, key=lambda t: -len(t))) for w, f in by_first.items()}, frozenset(singular)
    )


@dataclass
class _Word:
    start: int
    end: int  # past the word, without a possessive marker
    text: str  # lower case
    poss_end: int | None = None  # past "'s" / "'" when the word is possessive

    @property
    def stop(self) -> int:
        return self.end if self.poss_end is None else self.poss_end


@dataclass
class _Unit:
    first: int  # word indices, inclusive
    last: int
    form: tuple[str, ...]
    role: str = "mention"  # mention | modifier | possessor | adjective
    head: int | None = None  # modifier: the unit it modifies, when the noun is a known name
    chain_end: int | None = None  # adjective: the last word of the hyphenated adjective
    independent: bool = False  # possessor with no noun after it ("the bowl is the dog's")


def _words(text: str) -> list[_Word]:
    words: list[_Word] = []
    for m in _WORD.finditer(text):
        start, end = m.span()
        prev = words[-1] if words else None
        # "dog's": the "s" after an apostrophe is the possessive marker of the word before.
        if (prev is not None and m.group().lower() == "s" and prev.poss_end is None
                and start == prev.end + 1 and text[prev.end] in _APOSTROPHES
                and (end == len(text) or not _WORD.match(text, end))):
            prev.poss_end = end
            continue
        words.append(_Word(start, end, m.group().lower()))
    for w in words:
        # "dogs'": a plural possessive, unless the apostrophe closes a quote that opened before the word.
        opened = w.start > 0 and text[w.start - 1] in _APOSTROPHES
        if (w.poss_end is None and w.text.endswith("s") and not opened and w.end < len(text)
                and text[w.end] in _APOSTROPHES and (w.end + 1 == len(text) or not _WORD.match(text, w.end + 1))):
            w.poss_end = w.end + 1
    return words


def _sep(text: str, words: list[_Word], i: int) -> str:
    """The text between word i-1 and word i (from the start of the text for i = 0; to the end for i = len)."""
    start = words[i - 1].stop if i > 0 else 0
    end = words[i].start if i < len(words) else len(text)
    return text[start:end]


def _units(text: str, words: list[_Word], index: _Index) -> list[_Unit]:
    """Known names in `text`, longest first, left to right."""
    units = []
    i = 0
    while i < len(words):
        match = None
        for form in index.forms.get(words[i].text, ()):
            n = len(form)
            if i + n > len(words) or tuple(w.text for w in words[i : i + n]) != form:
                continue
            inner = range(i + 1, i + n)
            if all(words[k - 1].poss_end is None and _JOINER.fullmatch(_sep(text, words, k)) for k in inner):
                match = form
                break
        if match is None:
            i += 1
            continue
        units.append(_Unit(i, i + len(match) - 1, match))
        i += len(match)
    return units


def _governed_by_singular(text: str, words: list[_Word], first: int, at_unit: set[int]) -> bool:
    """Whether the nearest determiner before word `first` (over adjectives) takes a singular noun."""
    k = first - 1
    for _ in range(4):
        if k < 0 or not _sep(text, words, k + 1).isspace() or words[k].poss_end is not None or k in at_unit:
            return False
        if words[k].text in DETERMINER_WORDS:
            return words[k].text in _SINGULAR_DETERMINERS
        k -= 1
    return False


def _assign_roles(text: str, words: list[_Word], units: list[_Unit], index: _Index) -> None:
    heads, plural_heads = _head_words()
    starts = {u.first: n for n, u in enumerate(units)}
    covered = {k for u in units for k in range(u.first, u.last + 1)}
    for n, u in enumerate(units):
        last = words[u.last]
        nxt = u.last + 1
        after = _sep(text, words, nxt)
        has_next = nxt < len(words)
        if last.poss_end is not None:
            if has_next and after == "-":
                u.role, u.chain_end = "adjective", _hyphen_chain_end(text, words, nxt)  # "bird's-eye"
            else:
                u.role = "possessor"
                u.independent = not (has_next and after.isspace())
            continue
        if not has_next:
            continue
        next_unit = starts.get(nxt)
        if next_unit is not None:
            plural_next = units[next_unit].form not in index.singular
        else:
            plural_next = words[nxt].text in plural_heads
        is_head = next_unit is not None or words[nxt].text in heads or words[nxt].text in plural_heads
        if after == "-":
            if is_head:
                u.role, u.head = "modifier", next_unit  # "dog-bed"
            else:
                u.role, u.chain_end = "adjective", _hyphen_chain_end(text, words, nxt)  # "horse-drawn"
        elif (after.isspace() and is_head and u.form in index.singular
              and not (plural_next and _governed_by_singular(text, words, u.first, covered))):
            u.role, u.head = "modifier", next_unit


def _hyphen_chain_end(text: str, words: list[_Word], k: int) -> int:
    while k + 1 < len(words) and words[k].poss_end is None and _sep(text, words, k + 1) == "-":
        k += 1
    return k


@lru_cache(maxsize=4096)
def _analyse(text: str, names: tuple[str, ...], vocabulary: tuple[str, ...] | None):
    index = _index(names, vocabulary)
    words = _words(text)
    units = _units(text, words, index)
    _assign_roles(text, words, units, index)
    return words, units


def _key(names: Iterable[str], vocabulary: Iterable[str] | None) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    names = tuple(sorted({_normalise(n) for n in names}))
    vocab = None if vocabulary is None else tuple(sorted({_normalise(n) for n in vocabulary}))
    return names, vocab


def _forms_of(name: str) -> set[tuple[str, ...]]:
    return {tuple(_WORD.findall(f)) for f in name_forms(name)}


def class_words(
    text: str, name: str, *, classes: Sequence[str] = (), vocabulary: Iterable[str] | None = None,
) -> list[tuple[tuple[int, int], str]]:
    """Every occurrence of `name`'s words in `text` that is not part of a longer known name, with
    its role: "mention", "modifier" ("bus" in "bus stop"), "possessor" ("dog's") or "adjective"
    ("horse-drawn"). `classes` are the other classes of the same prompt (known names too);
    `vocabulary`, when given, replaces the shipped vocabularies as the known names."""
    names, vocab = _key([name, *classes], vocabulary)
    words, units = _analyse(text, names, vocab)
    forms = _forms_of(name)
    return [((words[u.first].start, words[u.last].end), u.role) for u in units if u.form in forms]


def find_mentions(
    text: str, name: str, *, classes: Sequence[str] = (), vocabulary: Iterable[str] | None = None,
) -> list[tuple[int, int]]:
    """Character spans of every mention of `name` in `text` (see the module docstring)."""
    return [span for span, role in class_words(text, name, classes=classes, vocabulary=vocabulary)
            if role == "mention"]


def class_mentions(
    text: str, classes: Sequence[str], *, vocabulary: Iterable[str] | None = None,
) -> dict[str, list[tuple[int, int]]]:
    """For each class, the character spans of its mentions, with the prompt's classes known to each other."""
    return {c: find_mentions(text, c, classes=classes, vocabulary=vocabulary) for c in classes}


def mentions(text: str, name: str, *, vocabulary: Iterable[str] | None = None) -> bool:
    return bool(find_mentions(text, name, vocabulary=vocabulary))


def missing_classes(
    text: str, classes: list[str] | tuple[str, ...], *, vocabulary: Iterable[str] | None = None,
) -> list[str]:
    """The classes that `text` does not mention."""
    return [c for c in classes if not find_mentions(text, c, classes=classes, vocabulary=vocabulary)]


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def _at_sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip().rstrip(_OPENERS).rstrip()
    return not before or before[-1] in _SENTENCE_END


def _determiner_before(text: str, words: list[_Word], first: int, keep: list[bool]) -> int:
    """The first word of the determiner directly in front of word `first`, or `first` if there is none."""
    # The kept words in front, each separated from the next by spaces only.
    run: list[int] = []
    k = first - 1
    while k >= 0 and len(run) < _LONGEST_DETERMINER and keep[k] and words[k].poss_end is None:
        if not _sep(text, words, k + 1).isspace():
            break
        run.insert(0, k)
        k -= 1
    for n in range(len(run), 0, -1):
        phrase = tuple(words[j].text for j in run[-n:])
        if phrase in _DETERMINER_PHRASES or (n == 1 and phrase[0].isdigit()):
            return run[-n]
    return first


def _article(following: str, original: str) -> str:
    chosen = _inflect.a(following).split(" ", 1)[0]
    return chosen.capitalize() if original[:1].isupper() else chosen


def make_negative(
    prompt: str, classes: list[str] | tuple[str, ...], token: str = "nothing",
    *, vocabulary: Iterable[str] | None = None,
) -> str:
    """The counterfactual negative of `prompt`: every mention of every class (with its
    determiner) replaced by `token`, and the class words in other roles dropped (see the module
    docstring).

    Raises CounterfactualError when the prompt does not mention one of its classes (the pair
    would then show the same thing twice) or when a class still shows in the result (for
    example because `token` itself names one).
    """
    classes = tuple(classes)
    absent = missing_classes(prompt, classes, vocabulary=vocabulary)
    if absent:
        raise CounterfactualError(
            f"prompt does not mention {', '.join(repr(c) for c in absent)}: {prompt!r}"
        )
    names, vocab = _key(classes, vocabulary)
    words, units = _analyse(prompt, names, vocab)
    removed = set().union(*(_forms_of(c) for c in classes))

    keep = [True] * len(words)
    replaced = [False] * len(words)  # the first word of each removed mention
    absorbs = [False] * len(words)  # removals that take the determiner in front with them
    hyphen_after = [False] * len(words)  # a dropped modifier joined to its noun by "-"

    def drop(first: int, last: int) -> None:
        for k in range(first, last + 1):
            keep[k] = False

    def with_modifiers(n: int) -> int:
        """The first word of unit n with the modifiers in front of it ("dog bed", "lap-dog")."""
        first = units[n].first
        m = n - 1
        while m >= 0 and units[m].role == "modifier" and units[m].head == n and units[m].last == first - 1:
            first, n, m = units[m].first, m, m - 1
        while first > 0 and _sep(prompt, words, first) == "-" and not any(
                u.first <= first - 1 <= u.last for u in units):
            first -= 1  # "lap-dog": the word hyphenated in front is part of the noun
        return first

    for n, u in enumerate(units):
        if u.form not in removed:
            continue
        if u.role == "mention":
            first = with_modifiers(n)
            drop(first, u.last)
            replaced[first] = absorbs[first] = True
        elif u.role == "modifier":
            drop(u.first, u.last)
            hyphen_after[u.last] = _sep(prompt, words, u.last + 1) == "-"
        elif u.role == "adjective":
            drop(u.first, u.chain_end)
        else:  # possessor
            drop(u.first, u.last)
            absorbs[u.first] = u.independent

    # Removed words joined by spaces or hyphens make one edit; a mention's edit takes the
    # determiner in front of it.
    edits: list[tuple[int, int, int]] = []  # (first word, last word, tokens)
    k = 0
    while k < len(words):
        if keep[k]:
            k += 1
            continue
        first = k
        while k + 1 < len(words) and not keep[k + 1] and _JOINER.fullmatch(_sep(prompt, words, k + 1)):
            k += 1
        if any(absorbs[first : k + 1]):
            det = _determiner_before(prompt, words, first, keep)
            for j in range(det, first):
                keep[j] = False
            first = det
        edits.append((first, k, sum(replaced[first : k + 1])))
        k += 1

    # Character edits: (start, end, replacement, the next kept word takes the sentence's capital).
    changes: list[tuple[int, int, str, bool]] = []
    for first, last, tokens in edits:
        start, end = words[first].start, words[last].stop
        if hyphen_after[last] and prompt.startswith("-", end):
            end += 1
        # The removed words' first letter carries the sentence's capital ("3 Dogs." has one too).
        letters = [ch for ch in prompt[start:end] if ch.isalpha()]
        capital = bool(letters) and letters[0].isupper() and _at_sentence_start(prompt, start)
        replacement = " ".join([token] * tokens)
        if replacement and capital:
            replacement = replacement[:1].upper() + replacement[1:]
        if not tokens:
            # "a dog's apple" -> "an apple": the article in front now introduces the next word.
            before, after = first - 1, last + 1
            if (before >= 0 and keep[before] and words[before].text in ("a", "an")
                    and after < len(words) and keep[after]):
                word = words[before]
                article = _article(prompt[words[after].start : words[after].end], prompt[word.start : word.end])
                changes.append((word.start, word.end, article, False))
            # A dropped word takes the spaces after it, so "(dog bowl)" becomes "(bowl)".
            end += len(prompt[end:]) - len(prompt[end:].lstrip())
        changes.append((start, end, replacement, capital and not replacement))
    changes.sort()

    out: list[str] = []
    cursor = 0
    capitalise = False
    for start, end, replacement, capital_after in changes:
        kept = prompt[cursor:start]
        if capitalise and any(ch.isalpha() for ch in kept):
            kept, capitalise = _capitalised(kept), False
        out.append(kept)
        if capitalise and replacement.strip():
            replacement, capitalise = _capitalised(replacement), False
        out.append(replacement)
        capitalise = capitalise or capital_after
        cursor = end
    rest = prompt[cursor:]
    out.append(_capitalised(rest) if capitalise else rest)
    negative = _tidy("".join(out))

    survivors = [c for c in classes
                 if class_words(negative, c, classes=classes, vocabulary=vocabulary)]
    if survivors:
        raise CounterfactualError(
            f"negative prompt still mentions {', '.join(repr(c) for c in survivors)}: "
            f"{negative!r} (is the replacement token {token!r} a class name?)"
        )
    return negative


def _capitalised(text: str) -> str:
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1 :]
    return text

