import json

import pytest

from magicseg_engine.config import PromptsConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.prompts import build_prompts, read_records, write_records
from magicseg_engine.prompts.prompt_file import read_prompt_file
from magicseg_engine.vocab import load_vocabulary

REFERENCE_LINES = """\
# written by an LLM
dog: a photo of a dog running on a beach
1. cat,sofa: a cat sleeping on a sofa
person , bicycle: two people riding bicycles in a park

"""


def write(tmp_path, text, name="prompts.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reference_format_lines(tmp_path):
    path = write(tmp_path, REFERENCE_LINES.replace("1. cat", "cat"))
    entries, skipped = read_prompt_file(path, max_classes=2)
    assert skipped == []
    assert [(e.lineno, e.classes) for e in entries] == [(2, ("dog",)), (3, ("cat", "sofa")), (4, ("person", "bicycle"))]
    assert entries[2].prompt == "two people riding bicycles in a park"


def test_broken_line_names_its_number(tmp_path):
    path = write(tmp_path, REFERENCE_LINES)
    with pytest.raises(UsageError, match=r"prompts.txt:3: class '1\. cat' is not in the vocabulary"):
        read_prompt_file(path, max_classes=2, allowed={"dog", "cat", "sofa", "person", "bicycle"})


@pytest.mark.parametrize(
    "line, reason",
    [
        ("no colon here", "expected 'cls1,cls2: description'"),
        ("dog:", "empty description"),
        ("dog,: a dog", "empty class name"),
        ("dog: a cat on a mat", "does not mention 'dog'"),
        ("dog,cat,cow: a dog, a cat and a cow", "3 classes, at most 2"),
        ('{"classes": ["dog"], "prompt": "a dog", "negative_prompt": "a dog gone"}', "negative_prompt still mentions 'dog'"),
        ('{"classes": [], "prompt": "a dog"}', "'classes' must be a non-empty list"),
        ('{"classes": ["dog"], "prompt": "a dog", "seed": -1}', "'seed' must be a non-negative integer"),
        ('{"classes": ["dog"], "prompt": "a dog"', "invalid JSON"),
        ("wolf: a wolf in the snow", "class 'wolf' is not in the vocabulary"),
    ],
)
def test_each_kind_of_bad_line_is_reported_or_skipped_and_counted(tmp_path, line, reason):
    path = write(tmp_path, f"dog: a dog on a beach\n{line}\ncat: a cat\n")
    with pytest.raises(UsageError) as err:
        read_prompt_file(path, max_classes=2, allowed={"dog", "cat", "cow"})
    assert str(err.value).startswith(f"{path}:2: ")
    assert reason in str(err.value)
    entries, skipped = read_prompt_file(path, max_classes=2, allowed={"dog", "cat", "cow"}, skip_invalid=True)
    assert [e.lineno for e in entries] == [1, 3]
    assert len(skipped) == 1 and skipped[0][0] == 2 and reason in skipped[0][1]


def test_file_source_builds_records_and_keeps_given_negatives_and_seeds(tmp_path):
    path = write(tmp_path, REFERENCE_LINES.replace("1. cat", "cat") + json.dumps(
        {"classes": ["dog"], "prompt": "a dog asleep", "negative_prompt": "an empty bed", "seed": 99}) + "\n")
    result = build_prompts(PromptsConfig(source="file", seed=5), vocab=None, num=None, prompt_file=path)
    records = result.records
    assert [r.negative_prompt for r in records] == [
        "a photo of nothing running on a beach", "nothing sleeping on nothing",
        "nothing riding nothing in a park", "an empty bed"]
    assert [r.seed for r in records] == [5 * 2**32, 5 * 2**32 + 1, 5 * 2**32 + 2, 99]
    assert all(r.source == "file" for r in records)


def test_our_jsonl_round_trips_through_the_file_source(tmp_path):
    vocab = load_vocabulary("voc")
    original = build_prompts(PromptsConfig(seed=2), vocab=vocab, num=30).records
    out = tmp_path / "prompts.jsonl"
    write_records(out, original)
    again = build_prompts(PromptsConfig(source="file"), vocab=vocab, num=None, prompt_file=out).records
    assert [r.id for r in again] == [r.id for r in original]
    assert read_records(out) == original


def test_num_limits_and_too_few_lines(tmp_path):
    path = write(tmp_path, REFERENCE_LINES.replace("1. cat", "cat"))
    assert len(build_prompts(PromptsConfig(source="file"), vocab=None, num=2, prompt_file=path).records) == 2
    with pytest.raises(UsageError, match="3 usable prompts, fewer than --num 5"):
        build_prompts(PromptsConfig(source="file"), vocab=None, num=5, prompt_file=path)


def test_duplicate_lines_are_dropped(tmp_path):
    line = json.dumps({"classes": ["dog"], "prompt": "a dog", "seed": 1})
    path = write(tmp_path, f"{line}\n{line}\n")
    result = build_prompts(PromptsConfig(source="file"), vocab=None, num=None, prompt_file=path)
    assert len(result.records) == 1 and result.duplicates == 1


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt", max_classes=2)
