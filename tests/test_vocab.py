import logging

import pytest

from magicseg_engine.errors import UsageError
from magicseg_engine.vocab import BUILTIN, Vocabulary, load_vocabulary


@pytest.mark.parametrize("name, size", [("voc", 20), ("context", 59), ("coco-object", 80), ("coco-stuff", 171)])
def test_builtin_vocabularies_have_their_standard_sizes_and_no_duplicates(name, size):
    vocab = load_vocabulary(name)
    assert len(vocab) == size
    assert len({c.lower() for c in vocab.classes}) == size
    assert vocab.duplicates == ()


def test_builtin_orders_follow_the_standard_label_order():
    assert load_vocabulary("voc").classes[0] == "aeroplane"
    assert load_vocabulary("voc").index("TV Monitor") == 19
    coco = load_vocabulary("coco-object").classes
    assert coco[0] == "person" and coco[-1] == "toothbrush"
    stuff = load_vocabulary("coco-stuff").classes
    assert stuff[:80] == coco  # things first, then stuff
    assert stuff[80] == "banner" and stuff[-1] == "wood"


def test_user_file_comments_blanks_whitespace_and_duplicates(tmp_path, caplog):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\n\ncat\n  traffic   light  # inline comment\nCat\ndog\n\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        vocab = load_vocabulary(str(path))
    assert vocab.classes == ("cat", "traffic light", "dog")
    assert vocab.duplicates == ("Cat",)
    assert "removed 1 duplicate" in caplog.text


def test_user_file_keeps_non_ascii_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("café table\nñandú\n", encoding="utf-8")
    assert load_vocabulary(str(path)).classes == ("café table", "ñandú")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "lists no classes"),
        (b"# only a comment\n\n", "lists no classes"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (b"cat\ndog, wolf\n", ":2: weight 'wolf' is not a non-negative number"),
        (b"cat,1\ndog,-2\n", ":2: weight '-2' is not a non-negative number"),
        (b"cat,nan\n", ":1: weight 'nan' is not"),
        (b"cat,0\ndog,0\n", "every class has weight 0"),
        (b"a,b,2\n", ":1: class name 'a,b' contains ','"),
        (b"cat\n1234\n", ":2: class name '1234' has no letters"),
    ],
)
def test_bad_user_files_are_usage_errors(tmp_path, content, message):
    path = tmp_path / "classes.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_vocabulary(str(path))


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(UsageError) as err:
        load_vocabulary("pascal")
    for name in BUILTIN:
        assert name in str(err.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read class file"):
        load_vocabulary(str(tmp_path))  # a directory exists but cannot be read as a file


def test_weighted_class_files_as_lines_or_json(tmp_path):
    lines = tmp_path / "classes.txt"
    lines.write_text("cat, 3  # rare in the target set\ndog\nbird,0\n", encoding="utf-8")
    vocab = load_vocabulary(str(lines))
    assert vocab.classes == ("cat", "dog", "bird") and vocab.weights == (3.0, 1.0, 0.0)
    as_json = tmp_path / "classes.json"
    as_json.write_text('{"cat": 3, "dog": 1, "bird": 0}', encoding="utf-8")
    assert load_vocabulary(str(as_json)) == Vocabulary(str(as_json), vocab.classes, weights=vocab.weights)
    plain = tmp_path / "plain.txt"
    plain.write_text("cat\ndog\n", encoding="utf-8")
    assert load_vocabulary(str(plain)).weights is None
    for content, message in (('["cat"]', "must hold a JSON object"), ('{"cat": "x"}', 'weight of \'cat\' is "x"'),
                             ('{"cat": true}', "weight of 'cat' is true"), ("{", "is not valid JSON")):
        as_json.write_text(content, encoding="utf-8")
        with pytest.raises(UsageError, match=message):
            load_vocabulary(str(as_json))
