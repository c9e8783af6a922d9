"""Every text parser against hypothesis-generated input and a kept corpus of nasty real-world files
(tests/data/nasty_inputs/): class files, prompt files, LLM replies, the JSON-lines files of a run
(prompts.jsonl, manifest.jsonl, dropped.jsonl) and run.json edited by hand.

Each bad input must end in UsageError (the CLI's one line and exit code 2) or in a documented
skip that is counted; any other exception is a crash. Shards, images and checkpoints are in
test_fuzz_shards.py."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import LLMConfig
from magicseg_engine.data.shards import ShardInfo, _parse_manifest
from magicseg_engine.errors import UsageError
from magicseg_engine.pipeline import dropped_keys, open_run, read_run_file
from magicseg_engine.prompts import llm
from magicseg_engine.prompts.counterfactual import missing_classes
from magicseg_engine.prompts.prompt_file import read_prompt_file
from magicseg_engine.prompts.records import BadRecordsFile, read_records
from magicseg_engine.vocab import load_vocabulary, parse_class_weights

CORPUS = Path(__file__).parent / "data" / "nasty_inputs"
# Examples per property per CI run: enough to hit every branch of these small parsers (each
# property was run with 20x as many while the parsers were hardened), small enough that this
# file stays under half a minute on two cores.
FEW, SOME = 150, 300


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_exit_2(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr.replace("\n", " "), result.stderr


# Text a user might put in a file: every Unicode category, with the characters that mean something
# to the parsers (commas, colons, hashes, braces, line breaks of every kind) drawn more often.
SPECIAL = st.sampled_from([",", ":", "#", "{", "}", "\"", "\r\n", "\r", "\u2028", "\x0b", "\x00", "\ufeff",
                           " ", "\t", "1e999", "nan", "-1", "0", "2.5", "dog", "Dog", "traffic light", "\u72ac"])
USER_TEXT = st.lists(st.one_of(st.text(max_size=8), SPECIAL), max_size=30).map("".join)


# --- class files -----------------------------------------------------------------------------------

CLASS_FILES = {
    "bom_crlf.txt": (("dog", "cat", "traffic light"), None),
    "duplicates_blank.txt": (("dog", "cat"), None),
    "punctuation_unicode.txt": (("potted-plant", "O'Brien's hat", "café table", "ñandú", "犬",
                                 "stop sign (octagonal)", "\U0001f436 dog"), None),
    "weighted.txt": (("dog", "cat", "bird", "fish"), (2.0, 0.5, 1.0, 0.0)),
    "weights.json": (("dog", "cat", "hot#dog", "two lines"), (2.0, 0.5, 1.0, 1.0)),
    "utf16_bom.txt": "is UTF-16 text, not UTF-8",
    "utf16_no_bom.txt": "saved as UTF-16",
    "latin1.txt": "is not UTF-8 text (line 1, byte 3)",
    "commas_in_name.txt": ":2: class name 'hot dog, with mustard' contains ','",
    "negative_weight.txt": ":1: weight '-1' is not a non-negative number",
    "nan_weight.txt": ":1: weight 'nan' is not a non-negative number",
    "all_zero.txt": "every class has weight 0",
    "digits_only.txt": ":2: class name '42' has no letters",
    "control_char.txt": ":2: class name 'ca\\x07t' contains the control character U+0007",
    "weights_huge_int.json": "holds a number json cannot read",
    "weights_1e999.json": "weight of 'dog' is not a non-negative number",
    "weights_string.json": "weight of 'dog' is \"2\", not a non-negative number",
    "weights_list.json": "must hold a JSON object",
    "weights_truncated.json": "is not valid JSON (line 1",
    "weights_empty.json": "must hold a JSON object",
}


@pytest.mark.parametrize("name", sorted(CLASS_FILES))
def test_class_file_corpus(name):
    expected = CLASS_FILES[name]
    path = CORPUS / "classes" / name
    if isinstance(expected, str):
        with pytest.raises(UsageError) as err:
            load_vocabulary(str(path))
        assert expected in str(err.value) and "\n" not in str(err.value)
        return
    vocab = load_vocabulary(str(path))
    assert (vocab.classes, vocab.weights) == expected


def test_bad_class_file_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "prompts.jsonl"
    result = invoke("prompts", "--classes", CORPUS / "classes" / "utf16_bom.txt", "--num", 4, "--out", out)
    assert_one_line_exit_2(result, "UTF-16", "save it as UTF-8")
    assert list(tmp_path.iterdir()) == []


def check_vocabulary(vocab) -> None:
    """What every accepted vocabulary holds, whatever the file looked like."""
    assert vocab.classes
    lowered = [c.lower() for c in vocab.classes]
    assert len(set(lowered)) == len(lowered)
    for name in vocab.classes:
        assert name == " ".join(name.split()) and name
        assert "," not in name and ":" not in name
        assert any(ch.isalpha() for ch in name)
        assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in name), repr(name)
    if vocab.weights is not None:
        assert len(vocab.weights) == len(vocab.classes) and any(w > 0 for w in vocab.weights)
        assert all(w >= 0 and w == w and w != float("inf") for w in vocab.weights)


@fuzz(SOME)
@given(USER_TEXT)
def test_class_lines_parse_or_refuse_in_one_line_whatever_the_line_endings(text):
    logging.disable(logging.WARNING)  # duplicates are logged; hundreds of examples would flood the log
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = []
            # The same text saved by three editors: LF, CRLF with a byte-order mark, and UTF-8 bytes
            # read back through the file loader. All must agree.
            for variant, data in (("lf", text.encode("utf-8", "surrogatepass")),
                                  ("crlf", b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8", "surrogatepass"))):
                path = Path(tmp) / f"{variant}.txt"
                path.write_bytes(data)
                try:
                    vocab = load_vocabulary(str(path))
                except UsageError as err:
                    assert "\n" not in str(err)
                    results.append("refused")
                else:
                    check_vocabulary(vocab)
                    results.append((vocab.classes, vocab.weights))
            if "\ufeff" not in text and "\r" not in text and not any(0xD800 <= ord(c) < 0xE000 for c in text):
                assert results[0] == results[1]
    finally:
        logging.disable(logging.NOTSET)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@fuzz(SOME)
@given(st.one_of(st.dictionaries(USER_TEXT, st.one_of(JSON_VALUES, st.floats(0, 1e6), st.integers(0, 10**30)),
                                 max_size=6).map(json.dumps),
                 JSON_VALUES.map(json.dumps), USER_TEXT))
def test_class_weight_maps_parse_or_refuse_in_one_line(text):
    logging.disable(logging.WARNING)
    try:
        vocab = parse_class_weights(text, "w.json")
    except UsageError as err:
        assert "\n" not in str(err)
        return
    finally:
        logging.disable(logging.NOTSET)
    check_vocabulary(vocab)
    data = json.loads(text)
    # Each kept class has the weight its key gave (the first spelling of a repeated name wins).
    by_name = {}
    for key, weight in data.items():
        by_name.setdefault(" ".join(key.split()).lower(), float(weight))
    assert vocab.weights == tuple(by_name[c.lower()] for c in vocab.classes)


def test_a_class_file_of_100000_lines_loads_quickly(tmp_path):
    names = [f"class {i:06d}" for i in range(100_000)]
    lines = [f"{n},{1 + i % 3}" if i % 2 else n for i, n in enumerate(names)]
    path = tmp_path / "many.txt"
    path.write_text("\r\n".join(lines + ["CLASS 000007", "", "# done"]) + "\r\n", encoding="utf-8")
    start = time.perf_counter()
    vocab = load_vocabulary(str(path))
    assert time.perf_counter() - start < 10
    assert vocab.classes == tuple(names) and vocab.duplicates == ("CLASS 000007",)
    assert vocab.weights[:4] == (1.0, 2.0, 1.0, 1.0)


# --- prompt files ----------------------------------------------------------------------------------

def test_prompt_file_corpus_keeps_the_good_lines_and_counts_the_bad(tmp_path):
    path = CORPUS / "prompts" / "mixed_good_and_bad.txt"
    entries, skipped = read_prompt_file(path, max_classes=2, skip_invalid=True)
    # Line 7 names its class as a string, which the JSON format accepts ("cls1,cls2").
    assert [(e.lineno, e.classes, e.seed) for e in entries] == [(1, ("dog",), None), (2, ("cat",), 7),
                                                                 (7, ("dog",), None)]
    assert [n for n, _ in skipped] == [3, 4, 5, 6, *range(8, 19)]
    reasons = dict(skipped)
    assert "does not mention 'cat'" in reasons[6]
    assert "below 2**64" in reasons[9] and "too long" in reasons[10] and "control" in reasons[15]
    with pytest.raises(UsageError, match=r"mixed_good_and_bad.txt:3: expected 'cls1,cls2: description'"):
        read_prompt_file(path, max_classes=2)
    entries, skipped = read_prompt_file(CORPUS / "prompts" / "reference_crlf_bom.txt", max_classes=2)
    assert [e.classes for e in entries] == [("dog",), ("cat", "dog")] and not skipped


@pytest.mark.parametrize("name, message", [("latin1.txt", "is not UTF-8 text (line 1, byte 19)"),
                                           ("utf16.txt", "is UTF-16 text, not UTF-8")])
def test_prompt_files_in_other_encodings_are_refused(name, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_file(CORPUS / "prompts" / name, max_classes=2)


def test_prompt_file_through_the_cli(tmp_path):
    out = tmp_path / "p.jsonl"
    src = CORPUS / "prompts" / "mixed_good_and_bad.txt"
    assert_one_line_exit_2(invoke("prompts", "--source", "file", "--prompt-file", src, "--out", out),
                           ":3:", "--skip-invalid")
    assert not out.exists()
    result = invoke("prompts", "--source", "file", "--prompt-file", src, "--skip-invalid", "--out", out)
    assert result.exit_code == 0, result.output
    assert [r.classes for r in read_records(out)] == [("dog",), ("cat",), ("dog",)]


PROMPT_LINES = st.one_of(
    USER_TEXT,
    st.builds(lambda c, d: f"{c}: {d}", st.sampled_from(["dog", "cat,dog", "dog,", " ", "traffic light"]), USER_TEXT),
    st.dictionaries(st.sampled_from(["classes", "prompt", "negative_prompt", "seed", "extra"]),
                    st.one_of(JSON_VALUES, st.just(["dog"]), st.just("a dog on a mat"), st.integers(-5, 2**70)),
                    max_size=5).map(json.dumps),
)


@fuzz(SOME)
@given(st.lists(PROMPT_LINES, max_size=8))
@pytest.mark.slow
def test_prompt_file_lines_are_kept_or_skipped_never_crash(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.txt"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            entries, skipped = read_prompt_file(path, max_classes=2, skip_invalid=True)
        except UsageError as err:  # only the file as a whole (not UTF-8: a lone surrogate) is refused
            assert "not UTF-8" in str(err)
            return
        counted = [n for n, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
                   if raw.strip() and not raw.strip().startswith("#")]
        assert sorted([e.lineno for e in entries] + [n for n, _ in skipped]) == counted
        for entry in entries:
            assert 1 <= len(entry.classes) <= 2 and not missing_classes(entry.prompt, entry.classes)
            assert entry.seed is None or 0 <= entry.seed < 2**64
        try:
            strict, _ = read_prompt_file(path, max_classes=2)
        except UsageError as err:
            assert skipped and f":{skipped[0][0]}:" in str(err)
        else:
            assert not skipped and strict == entries


# --- LLM replies -----------------------------------------------------------------------------------

COMBOS = [("dog",), ("cat", "person"), ("traffic light",)]


def absorb(reply: str) -> tuple[list[str | None], llm.LLMStats]:
    descriptions: list[str | None] = [None] * len(COMBOS)
    stats = llm.LLMStats()
    llm.absorb_reply(reply, llm.ChatRequest("k", (0, 1, 2), ()), COMBOS, descriptions, stats)
    return descriptions, stats


REPLIES = {
    "fenced_json.txt": [None, None, None],
    "prose_around_lines.txt": ["a dog asleep on a porch", "a person stroking a cat on a bench",
                               "a traffic light over a wet street"],
    "truncated_json.txt": [None, None, None],  # names the dog, but as JSON
    "wrong_count.txt": ["a dog in the park", None, None],
    "class_missing.txt": [None, None, None],
    "non_utf8.bin": [None, None, None],  # mojibake is no caption: asked again
}


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_llm_reply_corpus(name):
    # What the endpoint's bytes become once the SDK decoded them; undecodable bytes are replaced.
    text = (CORPUS / "replies" / name).read_bytes().decode("utf-8", "replace")
    descriptions, stats = absorb(text)
    assert descriptions == REPLIES[name]
    assert stats.lines_received == (stats.lines_rejected + stats.lines_unassigned + stats.lines_too_long
                                    + sum(d is not None for d in descriptions))


REPLY_LINES = st.one_of(
    USER_TEXT,
    st.sampled_from(["dog: a dog on the grass", "1. cat,person: a person with a cat", "- traffic light: a traffic "
                     "light at dusk", "cat,person: a cat", "**dog:** a dog", "Here you go:", "```json", "persons: people",
                     '{"dog": "a dog"}', "\"a dog by the sea\"", "dog and cat: x", "dog: " + "very " * 500 + "dog"]),
)


@fuzz(SOME)
@given(st.lists(REPLY_LINES, max_size=10).map("\n".join))
def test_llm_replies_fill_only_with_lines_that_mention_their_classes(reply):
    descriptions, stats = absorb(reply)
    for text, combo in zip(descriptions, COMBOS):
        if text is not None:
            assert not missing_classes(text, combo) and 0 < len(text) <= llm.MAX_LINE_CHARS
            assert llm.is_caption_text(text)
            assert text == text.strip() and "\n" not in text
    assert stats.lines_received == (stats.lines_rejected + stats.lines_unassigned + stats.lines_too_long
                                    + sum(d is not None for d in descriptions))


@pytest.mark.parametrize("shape", ["one line", "many lines"])
@pytest.mark.slow
def test_a_10_mb_reply_is_read_in_seconds_and_its_runaway_line_skipped(shape):
    if shape == "one line":
        reply = "dog: a dog " + "and a dog " * 1_000_000
    else:
        reply = "\n".join(["Sure, here they are:"] + ["some prose about the weather"] * 350_000
                          + ["traffic light: a traffic light in the fog"])
    assert len(reply) >= 10_000_000
    start = time.perf_counter()
    descriptions, stats = absorb(reply)
    assert time.perf_counter() - start < 15
    if shape == "one line":
        assert descriptions == [None, None, None] and stats.lines_too_long == 1
    else:
        assert descriptions == [None, None, "a traffic light in the fog"]


class _RawReply(BaseHTTPRequestHandler):
    """Answers every chat request with the server's `body` bytes as they are, status 200."""

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def completion(content: bytes) -> bytes:
    return (b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [{"index": 0, '
            b'"finish_reason": "stop", "message": {"role": "assistant", "content": "' + content + b'"}}]}')


@pytest.mark.parametrize("body, outcome", [
    (completion(b"dog: a dog in a caf\xe9"), "UnicodeDecodeError"),
    (b"\xff\xfe not json at all", "JSONDecodeError"),
    (b'{"choices": "none"}', "AttributeError"),
    (b'{"choices": [{"message": {"content": 5}}]}', "the message content is int"),
    (completion(b"dog: a dog on a \\ud800 beach"), ["a dog on a ? beach"]),
])
def test_malformed_endpoint_bodies_are_one_line(tmp_path, body, outcome):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RawReply)
    server.body = body
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    config = LLMConfig(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m", max_retries=0,
                       timeout_s=5.0, max_rounds=1)
    try:
        if isinstance(outcome, list):
            descriptions, _ = llm.describe_with_llm([("dog",)], config, tmp_path / "cache.jsonl")
            assert descriptions == outcome
            # The lone surrogate was replaced before the cache line was written, so it reads back.
            assert llm.ReplyCache(tmp_path / "cache.jsonl").replies
            return
        with pytest.raises(UsageError) as err:
            llm.describe_with_llm([("dog",)], config, tmp_path / "cache.jsonl")
        assert "is not a chat completion" in str(err.value) and outcome in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


# --- JSON-lines files of a run ---------------------------------------------------------------------

def test_prompts_jsonl_torn_or_wrong_types_is_one_line_naming_the_line():
    with pytest.raises(BadRecordsFile, match=r"prompts_torn.jsonl:2 is not a prompt record \(the line: Invalid JSON"):
        read_records(CORPUS / "jsonl" / "prompts_torn.jsonl")
    with pytest.raises(UsageError, match=r"prompts_wrong_types.jsonl:1 is not a prompt record \(classes: "):
        read_records(CORPUS / "jsonl" / "prompts_wrong_types.jsonl")
    with pytest.raises(ValueError, match="cannot read the prompts file"):  # also a ValueError, as callers expect
        read_records(CORPUS / "jsonl" / "absent.jsonl")


@fuzz(SOME)
@given(st.binary(max_size=200) | st.lists(JSON_VALUES.map(json.dumps), max_size=4).map("\n".join).map(str.encode))
def test_prompts_jsonl_reads_or_refuses_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_bytes(data)
        try:
            records = read_records(path)
        except BadRecordsFile as err:
            assert "\n" not in str(err) and "prompts.jsonl" in str(err)
            return
        assert all(r.id == r.content_id() and 0 <= r.seed < 2**64 for r in records)


def test_manifest_corpus_lines_are_refused_with_their_line_number():
    torn = (CORPUS / "jsonl" / "manifest_torn_garbled.jsonl").read_bytes()
    with pytest.raises(UsageError, match=r"line 2 is not a shard entry \(bad shard name 5\)"):
        _parse_manifest(torn, Path("manifest.jsonl"))
    # The torn last line alone is ignored: that is what a kill in the middle of an append leaves.
    assert [e.name for e in _parse_manifest(torn.split(b"\n")[0] + b"\n" + torn.split(b"\n")[-1],
                                            Path("m"))] == ["magicseg-0-000000.tar"]
    with pytest.raises(UsageError, match="line 1 is not a shard entry \\('keys' lists sample a1 twice\\)"):
        _parse_manifest((CORPUS / "jsonl" / "manifest_key_twice.jsonl").read_bytes(), Path("m"))
    with pytest.raises(UsageError, match="'keys' must be a list"):
        _parse_manifest((CORPUS / "jsonl" / "manifest_wrong_types.jsonl").read_bytes(), Path("m"))


MANIFEST_LINES = st.one_of(
    st.binary(max_size=80),
    st.fixed_dictionaries({}, optional={
        "shard": st.sampled_from(["magicseg-0-000000.tar", "x.tar", "../magicseg-0-000001.tar"]) | JSON_VALUES,
        "keys": st.lists(st.sampled_from(["a1", "b2", "bad.key", ""]), max_size=3) | JSON_VALUES,
        "bytes": st.integers(-1, 2**70) | JSON_VALUES,
        "sha256": st.just("0" * 64) | JSON_VALUES,
    }).map(lambda d: json.dumps(d).encode()),
)


@fuzz(SOME)
@given(st.lists(MANIFEST_LINES, max_size=4))
@pytest.mark.slow
def test_manifest_lines_parse_or_are_refused_in_one_line(lines):
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    try:
        entries = _parse_manifest(data, Path("manifest.jsonl"))
    except UsageError as err:
        assert "\n" not in str(err) and "manifest.jsonl line" in str(err)
        return
    keys = [k for e in entries for k in e.keys]
    assert len(keys) == len(set(keys)) and len({e.name for e in entries}) == len(entries)
    for entry in entries:
        assert ShardInfo.parse(entry.line()) == entry  # what was accepted writes back the same


def test_dropped_jsonl_garbled_lines_are_ignored_and_counted(tmp_path, caplog):
    (tmp_path / "dropped.jsonl").write_bytes((CORPUS / "jsonl" / "dropped_garbled.jsonl").read_bytes())
    with caplog.at_level(logging.WARNING):
        assert dropped_keys(tmp_path) == {"aaa", "bbb"}
    assert "5 line(s) are not a dropped pair's record" in caplog.text


@fuzz(SOME)
@given(st.binary(max_size=120) | st.lists(JSON_VALUES.map(json.dumps), max_size=4).map("\n".join).map(str.encode))
@pytest.mark.slow
def test_dropped_jsonl_never_crashes_and_keeps_only_string_keys(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dropped.jsonl").write_bytes(data)
        logging.disable(logging.WARNING)
        try:
            keys = dropped_keys(Path(tmp))
        finally:
            logging.disable(logging.NOTSET)
        assert all(isinstance(k, str) for k in keys)


# --- run.json edited by hand -----------------------------------------------------------------------

RUN_FILES = {
    "no_config.json": '"config" is missing or not an object',
    "config_list.json": '"config" is missing or not an object',
    "vocabulary_string.json": '"vocabulary" is not a list of class names',
    "masks_null.json": '"config.masks" is not an object',
    "starting_list.json": '"starting" is not an object',
    "sessions_dict.json": '"sessions" is not a list',
    "balance_huge.json": '"balance.requested_pairs" is not a number of pairs',
    "not_utf8.json": "is not a JSON object",
    "extra_keys_ok.json": None,
}


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_run_json_corpus(tmp_path, name):
    (tmp_path / "run.json").write_bytes((CORPUS / "run" / name).read_bytes())
    if RUN_FILES[name] is None:
        assert read_run_file(tmp_path)["my_note"] == {"x": [1e300, None]}
        return
    with pytest.raises(UsageError) as err:
        read_run_file(tmp_path)
    assert RUN_FILES[name] in str(err.value) and "--overwrite" in str(err.value)


def test_a_run_json_nested_100000_deep_is_one_line(tmp_path):
    (tmp_path / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="is not a JSON object"):
        read_run_file(tmp_path)


RUN_JSON = st.fixed_dictionaries({}, optional={
    "config": st.dictionaries(st.sampled_from(["masks", "seed", "preset"]), JSON_VALUES, max_size=3) | JSON_VALUES,
    "vocabulary": st.lists(st.text(max_size=5), max_size=3) | JSON_VALUES,
    "starting": JSON_VALUES, "sessions": JSON_VALUES, "extra": JSON_VALUES,
    "balance": st.fixed_dictionaries({}, optional={"requested_pairs": JSON_VALUES | st.integers(-3, 10**30),
                                                   "rounds": JSON_VALUES}) | JSON_VALUES,
})


@fuzz(SOME)
@given(RUN_JSON)
@pytest.mark.slow
def test_run_json_entries_are_checked_before_anyone_reads_them(saved):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.json").write_text(json.dumps(saved))
        try:
            got = read_run_file(Path(tmp))
        except UsageError as err:
            assert "\n" not in str(err)
            return
        # What the commands read from an accepted run.json has the types they assume.
        assert isinstance(got["config"], dict) and isinstance(got["config"].get("masks", {}), dict)
        assert all(isinstance(v, str) for v in got.get("vocabulary") or [])
        assert isinstance(got.get("starting", {}), dict) and isinstance(got.get("sessions", []), list)
        balance = got.get("balance") or {}
        assert isinstance(balance.get("requested_pairs", 0), int) and isinstance(balance.get("rounds", []), list)


def test_generate_resume_over_a_hand_edited_run_json_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_bytes((CORPUS / "run" / "vocabulary_string.json").read_bytes())
    result = invoke("generate", "--classes", "voc", "--num-pairs", 2, "--out", out, "--resume", "--device", "cpu")
    assert_one_line_exit_2(result, '"vocabulary" is not a list', "--overwrite")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["run.json"]
    with pytest.raises(UsageError, match="vocabulary"):
        open_run(out, None, None, True, False)
