import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magicseg_engine.prompts.counterfactual import (
    COMPOUND_HEADS,
    DETERMINER_WORDS,
    DIFFERENT_THINGS,
    CounterfactualError,
    class_mentions,
    class_words,
    find_mentions,
    is_plural_name,
    make_negative,
    mentions,
    missing_classes,
    name_forms,
)
from magicseg_engine.vocab import load_vocabulary

CORPUS = Path(__file__).parent / "data" / "counterfactual_corpus.jsonl"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person", {"person", "people"}),
        ("mouse", {"mouse", "mice"}),
        ("knife", {"knife", "knives"}),
        ("bus", {"bus", "buses"}),
        ("sheep", {"sheep"}),
        ("skis", {"skis", "ski"}),
        ("leaves", {"leaves", "leaf"}),
        ("traffic light", {"traffic light", "traffic lights"}),
        ("Potted  Plant", {"potted plant", "potted plants"}),
    ],
)
def test_name_forms_cover_regular_and_irregular_plurals(name, expected):
    assert set(name_forms(name)) == expected


def test_plural_names_are_recognised_but_singular_ones_ending_in_s_are_not():
    assert is_plural_name("clouds") and is_plural_name("stairs")
    assert not is_plural_name("bus") and not is_plural_name("glass") and not is_plural_name("dog")


@pytest.mark.parametrize(
    "prompt, classes, negative",
    [
        ("a dog on the grass", ["dog"], "nothing on the grass"),
        ("A dog on the grass", ["dog"], "Nothing on the grass"),
        ("two people next to a traffic light at night", ["person", "traffic light"], "nothing next to nothing at night"),
        ("The Traffic-Lights of a city", ["traffic light"], "Nothing of a city"),
        ("a group of sheep in a field", ["sheep"], "nothing in a field"),
        ("an old mouse and three mice", ["mouse"], "an old nothing and nothing"),
        ("a potted plant, a sofa, and a cat", ["potted plant", "cat"], "nothing, a sofa, and nothing"),
        ("a doghouse and a dog", ["dog"], "a doghouse and nothing"),
        ("people near a bus, buses everywhere", ["bus", "person"], "nothing near nothing, nothing everywhere"),
        ("A sheep. A sheep.", ["sheep"], "Nothing. Nothing."),
    ],
)
def test_negative_removes_every_mention_with_its_determiner(prompt, classes, negative):
    assert make_negative(prompt, classes) == negative


def test_a_longer_known_name_is_never_a_mention_of_its_last_word():
    # "hot dog" is a name of its own (a COCO class): removing "dog" keeps it, removing it keeps the dog.
    assert make_negative("a hot dog next to a dog", ["dog"]) == "a hot dog next to nothing"
    assert make_negative("a hot dog next to a dog", ["hot dog"]) == "nothing next to a dog"
    assert make_negative("a hot dog next to a dog", ["dog", "hot dog"]) == "nothing next to nothing"
    assert find_mentions("a hot dog next to a dog", "dog") == [(20, 23)]
    assert not mentions("a teddy bear", "bear") and not mentions("a dining table", "table")
    assert set(DIFFERENT_THINGS) >= {"hot dog", "teddy bear"}


def test_a_class_word_modifying_a_noun_is_dropped_not_replaced():
    assert make_negative("a bus at the bus stop", ["bus"]) == "nothing at the stop"
    assert make_negative("a dog bowl and a dog", ["dog"]) == "a bowl and nothing"
    assert make_negative("a car in a car park", ["car"]) == "nothing in a park"
    assert make_negative("an orange cat next to an orange", ["orange"]) == "a cat next to nothing"
    # The noun a removed class word modifies takes its modifiers with it.
    assert make_negative("a dog bed in a living room", ["bed"]) == "nothing in a living room"
    assert class_words("a bus stop", "bus") == [((2, 5), "modifier")]
    assert "stop" in COMPOUND_HEADS


def test_a_plural_looking_noun_after_a_singular_determiner_is_a_verb():
    assert make_negative("a bus stops at the corner", ["bus"]) == "nothing stops at the corner"
    assert make_negative("two bus stops and a bus", ["bus"]) == "two stops and nothing"


def test_possessives_lose_the_possessor_and_keep_its_determiner():
    assert make_negative("a dog's bowl next to a dog", ["dog"]) == "a bowl next to nothing"
    assert make_negative("a dog's apple and a dog", ["dog"]) == "an apple and nothing"
    assert make_negative("the dogs' bowls and two dogs", ["dog"]) == "the bowls and nothing"
    assert class_words("a dog's bowl", "dog") == [((2, 5), "possessor")]


def test_custom_and_empty_tokens():
    assert make_negative("a cat on a mat", ["cat"], "an empty spot") == "an empty spot on a mat"
    assert make_negative("a cat, on a mat", ["cat"], "") == "on a mat"
    assert make_negative("A cat, on a mat", ["cat"], "") == "On a mat"


@pytest.mark.parametrize(
    "prompt, classes",
    [
        ("a cat on a mat", ["dog"]),
        ("a bus stop at dusk", ["bus"]),
        ("a dog's bowl on the floor", ["dog"]),
        ("a hot dog on a plate", ["dog"]),
    ],
)
def test_prompt_without_its_class_as_an_object_is_refused(prompt, classes):
    with pytest.raises(CounterfactualError, match=f"does not mention {classes[0]!r}"):
        make_negative(prompt, classes)


def test_token_that_names_the_class_is_refused():
    with pytest.raises(CounterfactualError, match="still mentions 'cat'"):
        make_negative("a cat on a mat", ["cat"], token="another cat")
    with pytest.raises(CounterfactualError, match="still mentions 'cat'"):
        make_negative("a cat on a mat", ["cat"], token="cat food")


def test_mentions_are_whole_words_and_case_insensitive():
    assert mentions("A DOG barks", "dog")
    assert not mentions("a hotdog stand", "dog")
    assert not mentions("dogma", "dog")
    assert find_mentions("cats and a cat", "cat") == [(0, 4), (11, 14)]
    assert missing_classes("a cat", ["cat", "dog"]) == ["dog"]
    assert class_mentions("a hot dog and a dog", ["dog", "hot dog"]) == {"dog": [(16, 19)], "hot dog": [(2, 9)]}


def test_a_vocabulary_replaces_the_shipped_names():
    # With only its own classes known, "dining table" is an adjective and a table.
    assert not mentions("a dining table", "table")
    assert mentions("a dining table", "table", vocabulary=["table", "chair"])
    assert make_negative("a dining table", ["table"], vocabulary=["table"]) == "a dining nothing"
    # The compounds that name another thing stay known.
    assert not mentions("a hot dog", "dog", vocabulary=["dog"])


# --- the corpus ------------------------------------------------------------------------

def _corpus():
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpus_is_large_and_covers_each_case():
    rows = _corpus()
    assert len(rows) >= 200
    prompts = " ".join(r["prompt"] for r in rows)
    for needle in ("hot dog", "bus stop", "'s ", "A sheep. A sheep.", "-", "people", "mice"):
        assert needle in prompts
    assert any(r["expected"] is None for r in rows)


@pytest.mark.parametrize("row", _corpus(), ids=lambda r: f"{r['prompt']}->{','.join(r['remove'])}")
def test_corpus(row):
    if row["expected"] is None:
        with pytest.raises(CounterfactualError, match="does not mention"):
            make_negative(row["prompt"], row["remove"])
    else:
        assert make_negative(row["prompt"], row["remove"]) == row["expected"]


def test_clip_token_positions_from_mention_spans():
    # The attention capture reads the tokens of each mention. Encoding the text up to a span's start
    # and up to its end gives the span's token positions (start token = 0); this checks that recipe
    # against the CLIP tokenizer over the corpus: the tokens read spell the mention, hyphens left out.
    from magicseg_engine.generate.tokenizer import ClipTokenizer

    tok = ClipTokenizer(77, 49407)
    hyphen = set(tok.encode("-"))
    for row in _corpus():
        if row["expected"] is None:
            continue
        prompt = row["prompt"]
        ids = tok([prompt])[0].tolist()
        for name, spans in class_mentions(prompt, row["remove"]).items():
            assert spans, (prompt, name)
            for start, end in spans:
                first, stop = 1 + len(tok.encode(prompt[:start])), 1 + len(tok.encode(prompt[:end]))
                positions = [p for p in range(first, stop) if ids[p] not in hyphen]
                assert [ids[p] for p in positions] == [
                    i for i in tok.encode(prompt[start:end]) if i not in hyphen
                ], (prompt, name)


# --- properties ------------------------------------------------------------------------

VOCAB = load_vocabulary("coco-stuff").classes
KNOWN = sorted({c for v in ("voc", "context", "coco-object", "coco-stuff") for c in load_vocabulary(v).classes}
               | set(DIFFERENT_THINGS))
KNOWN_WORDS = {w for c in KNOWN for f in name_forms(c) for w in f.split()}
HEAD_WORDS = {w for h in COMPOUND_HEADS for w in (h, h + "s", h + "es")}
ARTICLE = {"an": "a"}
FUZZ_DETERMINERS = ("", "", "a", "an", "the", "two", "some", "my", "this", "several", "3", "a group of")


def _plain(word: str) -> bool:
    return (word not in KNOWN_WORDS and word not in HEAD_WORDS and word not in DETERMINER_WORDS
            and word not in {"nothing", "s"})


ADJECTIVES = [w for w in ("old", "small", "big", "red", "shiny", "happy", "wet", "tiny", "wooden", "fluffy")
              if _plain(w)]
FILLER = st.one_of(
    st.sampled_from(ADJECTIVES + ["on", "near", "beside", "under", "runs", "sleeping", "photo", "of", "at", "with"]),
    st.from_regex(r"[a-z]{1,9}", fullmatch=True),
).filter(_plain)


def _longer_names(name: str, removed: set[str]) -> list[str]:
    """Known names that contain a form of `name` as whole words and are not removed themselves."""
    out = []
    for other in KNOWN:
        if other in removed:
            continue
        if any(re.search(rf"(?<!\S){re.escape(f)}(?!\S)", other) and f != other for f in name_forms(name)):
            out.append(other)
    return out


def _cased(draw, text: str) -> str:
    return draw(st.sampled_from([text, text.upper(), text.title(), text.capitalize()]))


@st.composite
def fuzz_case(draw):
    classes = draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=3, unique=True))
    removed = set(classes)
    slots = []  # (kind, words kept, text)
    for _ in range(draw(st.integers(0, 8))):
        slots.append(("filler", draw(FILLER)))
    must = list(classes) + draw(st.lists(st.sampled_from(classes), max_size=3))
    for c in must:
        form = draw(st.sampled_from(name_forms(c)))
        if " " in form and draw(st.booleans()):
            form = form.replace(" ", "-")
        form = _cased(draw, form)
        det = draw(st.sampled_from(FUZZ_DETERMINERS))
        adjectives = draw(st.lists(st.sampled_from(ADJECTIVES), max_size=2))
        slots.insert(draw(st.integers(0, len(slots))), ("mention", det, adjectives, form))
    for c in classes:
        longer = _longer_names(c, removed)
        if longer and draw(st.booleans()):
            name = draw(st.sampled_from(longer))
            det = draw(st.sampled_from(FUZZ_DETERMINERS))
            slots.insert(draw(st.integers(0, len(slots))), ("kept", det, _cased(draw, name)))
        if draw(st.booleans()):
            form = _cased(draw, c)
            det = draw(st.sampled_from(FUZZ_DETERMINERS))
            slots.insert(draw(st.integers(0, len(slots))), ("possessor", det, form, draw(FILLER)))

    # Sentences of a few slots each; a name is never directly followed by another name (that is a compound).
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(slots) - 1)), max_size=2, unique=True)))
    sentences, start = [], 0
    for cut in [*cuts, len(slots)]:
        if slots[start:cut]:
            sentences.append(slots[start:cut])
        start = cut
    texts, expected_words, n_mentions = [], [], 0
    for sentence in sentences:
        parts = []
        for i, slot in enumerate(sentence):
            if slot[0] == "filler":
                parts.append(slot[1])
                expected_words.append(slot[1])
            elif slot[0] == "mention":
                _, det, adjectives, form = slot
                parts.append(" ".join(p for p in (det, *adjectives, form) if p))
                if adjectives:
                    expected_words += det.split() + adjectives
                n_mentions += 1
            elif slot[0] == "kept":
                _, det, name = slot
                parts.append(" ".join(p for p in (det, name) if p))
                expected_words += det.split() + re.findall(r"[^\W_]+", name.lower())
            else:
                _, det, form, filler = slot
                parts.append(" ".join(p for p in (det, form + "'s", filler) if p))
                expected_words += det.split() + [filler]
            if i + 1 < len(sentence):
                named_next = sentence[i + 1][0] != "filler"
                parts.append(", " if named_next and slot[0] != "filler" else draw(st.sampled_from([" ", "  ", ", "])))
        text = "".join(parts)
        if draw(st.booleans()):
            text = text[:1].upper() + text[1:]
        texts.append(text)
    prompt = draw(st.sampled_from([". ", "! ", ".  "])).join(texts) + draw(st.sampled_from(["", "."]))
    return classes, prompt, expected_words, n_mentions


def _words(text: str) -> list[str]:
    return [ARTICLE.get(w, w) for w in re.findall(r"[^\W_]+", text.lower())]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"[.!?]\s+", text) if s]


@settings(max_examples=400, deadline=None)
@given(fuzz_case())
@pytest.mark.slow
def test_fuzzed_fillers_keep_every_other_word_and_no_class(case):
    classes, prompt, expected_words, n_mentions = case
    negative = make_negative(prompt, classes)

    # No removed class is left in any role; its words may only stand inside a kept longer name.
    for c in classes:
        assert class_words(negative, c, classes=classes) == [], (c, prompt, negative)
        longer = _longer_names(c, set(classes))
        kept_spans = [m.span() for n in longer for f in name_forms(n)
                      for m in re.finditer(r"(?<![^\W_])" + r"[\s\-]+".join(map(re.escape, f.split())) + r"(?![^\W_])",
                                           negative, re.IGNORECASE)]
        for f in name_forms(c):
            pattern = r"(?<![^\W_])" + r"[\s\-]+".join(map(re.escape, f.split())) + r"(?![^\W_])"
            for m in re.finditer(pattern, negative, re.IGNORECASE):
                assert any(s <= m.start() and m.end() <= e for s, e in kept_spans), (c, prompt, negative)

    # Tidy: no doubled spaces, no space before punctuation, no determiner left hanging.
    assert "  " not in negative and negative == negative.strip()
    assert not re.search(r"\s[,.!?;:]", negative), negative
    hanging = "|".join(sorted({d for d in FUZZ_DETERMINERS if d} | {"an"}, key=len, reverse=True))
    assert not re.search(rf"(?<![^\W_])(?:{hanging})\s*(?:[,.!?;:]|$)", negative, re.IGNORECASE), (prompt, negative)

    # Every other word comes through, in order ("a"/"an" may follow the word after a dropped possessor).
    assert [w for w in _words(negative) if w != "nothing"] == [ARTICLE.get(w, w) for w in
                                                             (x.lower() for x in expected_words)], (prompt, negative)
    assert _words(negative).count("nothing") == n_mentions

    # A sentence that starts with a capital still does, one that starts in lower case still does.
    before, after = _sentences(prompt), _sentences(negative)
    assert len(before) == len(after), (prompt, negative)
    for b, a in zip(before, after):
        if b[:1].isalpha():
            assert a[:1].isupper() == b[:1].isupper(), (prompt, negative)


@settings(max_examples=200, deadline=None)
@given(fuzz_case())
@pytest.mark.slow
def test_fuzzed_mentions_are_the_mention_slots(case):
    classes, prompt, _, n_mentions = case
    spans = class_mentions(prompt, classes)
    assert sum(len(s) for s in spans.values()) == n_mentions, (prompt, spans)
    assert missing_classes(prompt, classes) == []
