import logging

import pytest

from magicseg_engine.errors import UsageError
from magicseg_engine.vocab import BUILTIN, load_vocabulary


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
        (b"cat\ndog, wolf\n", ":2: class name 'dog, wolf' contains ','"),
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
