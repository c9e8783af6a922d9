import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magicseg_engine.prompts.counterfactual import (
    DETERMINER_WORDS,
    CounterfactualError,
    find_mentions,
    is_plural_name,
    make_negative,
    mentions,
    missing_classes,
    name_forms,
)
from magicseg_engine.vocab import load_vocabulary


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
        ("a hot dog next to a dog", ["dog"], "a hot nothing next to nothing"),
        ("a doghouse and a dog", ["dog"], "a doghouse and nothing"),
        ("people near a bus, buses everywhere", ["bus", "person"], "nothing near nothing, nothing everywhere"),
    ],
)
def test_negative_removes_every_mention_with_its_determiner(prompt, classes, negative):
    assert make_negative(prompt, classes) == negative


def test_longer_class_names_win_over_their_parts():
    assert make_negative("a traffic light and a light bulb", ["traffic light", "light"], "X") == "X and X bulb"


def test_custom_and_empty_tokens():
    assert make_negative("a cat on a mat", ["cat"], "an empty spot") == "an empty spot on a mat"
    assert make_negative("a cat, on a mat", ["cat"], "") == "on a mat"


def test_prompt_without_its_class_is_refused():
    with pytest.raises(CounterfactualError, match="does not mention 'dog'"):
        make_negative("a cat on a mat", ["dog"])


def test_token_that_names_the_class_is_refused():
    with pytest.raises(CounterfactualError, match="still mentions 'cat'"):
        make_negative("a cat on a mat", ["cat"], token="another cat")


def test_mentions_are_whole_words_and_case_insensitive():
    assert mentions("A DOG barks", "dog")
    assert not mentions("a hotdog stand", "dog")
    assert not mentions("dogma", "dog")
    assert find_mentions("cats and a cat", "cat") == [(0, 4), (11, 14)]
    assert missing_classes("a cat", ["cat", "dog"]) == ["dog"]


# --- properties -----------------------------------------------------------------------

VOCAB = load_vocabulary("coco-stuff").classes
CLASS_WORDS = {w for c in VOCAB for f in name_forms(c) for w in f.split()}
FILLER = st.from_regex(r"[a-z]{1,9}", fullmatch=True).filter(
    lambda w: w not in CLASS_WORDS and w not in DETERMINER_WORDS and w != "nothing"
)


@st.composite
def prompt_with_mentions(draw):
    classes = draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=3, unique=True))
    fillers = draw(st.lists(FILLER, min_size=0, max_size=12))
    pieces = [("filler", w) for w in fillers]
    # Every class is mentioned at least once, in a random form and case, maybe with a determiner.
    for c in classes + draw(st.lists(st.sampled_from(classes), max_size=3)):
        form = draw(st.sampled_from(name_forms(c)))
        form = draw(st.sampled_from([form, form.upper(), form.title(), form.replace(" ", "-")]))
        det = draw(st.sampled_from(["", "a ", "the ", "two ", "a group of ", "The "]))
        pieces.insert(draw(st.integers(0, len(pieces))), ("mention", det + form))
    sep = draw(st.sampled_from([" ", ", ", "  "]))
    return classes, pieces, sep.join(text for _, text in pieces)


@settings(max_examples=300, deadline=None)
@given(prompt_with_mentions())
def test_no_class_survives_and_other_words_are_untouched(case):
    classes, pieces, prompt = case
    negative = make_negative(prompt, classes, token="nothing")
    # No form of any class, in any case, is left as a whole word.
    for c in classes:
        for form in name_forms(c):
            pattern = r"(?<!\w)" + r"[\s\-]+".join(map(re.escape, form.split())) + r"(?!\w)"
            assert not re.search(pattern, negative, re.IGNORECASE), (c, negative)
    # The words that were not mentions come through unchanged and in order.
    kept = [w for w in re.findall(r"[A-Za-z]+", negative) if w.lower() != "nothing"]
    assert kept == [text for kind, text in pieces if kind == "filler"]
    assert negative.lower().count("nothing") == sum(1 for kind, _ in pieces if kind == "mention")
