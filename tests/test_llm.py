"""Scene descriptions from an OpenAI-compatible endpoint, against a scripted server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from magicseg_engine.config import LLMConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.prompts.counterfactual import missing_classes
from magicseg_engine.prompts.llm import LLMStats, describe_with_llm

KEY_ENV = "MAGICSEG_TEST_LLM_KEY"
SECRET = "sk-magicseg-7Qx9wZ-do-not-leak"


@dataclass
class Call:
    index: int  # 0-based position among all HTTP requests the server received, retries included
    combos: list[tuple[str, ...]]
    body: dict


@dataclass
class Reply:
    status: int = 200
    content: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    error_message: str = "scripted failure"


def requested_combos(body: dict) -> list[tuple[str, ...]]:
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return [tuple(item.split(",")) for item in re.findall(r"^\d+\. (.+)$", user, flags=re.MULTILINE)]


def photo_of(combo: tuple[str, ...], tag: str = "") -> str:
    things = " and ".join(f"a {c}" for c in combo)
    return f"a photo of {things} in a sunny park{tag}"


def well_formed(call: Call) -> Reply:
    lines = [f"{','.join(c)}: {photo_of(c, f', take {call.index}')}" for c in call.combos]
    return Reply(content="\n".join(lines))


class ScriptedLLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.respond: Callable[[Call], Reply] = well_formed
        self.calls: list[Call] = []
        self.authorizations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def hits(self) -> int:
        return len(self.calls)

    def begin(self, body: dict, authorization: str) -> Call:
        with self.lock:
            call = Call(len(self.calls), requested_combos(body), body)
            self.calls.append(call)
            self.authorizations.append(authorization)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return call

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1


class ChatHandler(BaseHTTPRequestHandler):
    server: ScriptedLLMServer

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        call = self.server.begin(body, self.headers.get("Authorization", ""))
        try:
            reply = self.server.respond(call)
            time.sleep(reply.delay_s)
        finally:
            self.server.end()
        if reply.status == 200:
            payload = {
                "id": f"chatcmpl-{call.index}", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply.content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        else:
            payload = {"error": {"message": reply.error_message, "type": "scripted", "code": None}}
        self.send_json(reply.status, payload, reply.headers)

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow reply

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server():
    srv = ScriptedLLMServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def make_config(base_url: str, **overrides) -> LLMConfig:
    settings = dict(base_url=base_url, model="scripted-model", api_key_env=KEY_ENV, concurrency=2,
                    max_retries=1, timeout_s=5.0, descriptions_per_request=3, max_rounds=3)
    settings.update(overrides)
    return LLMConfig(**settings)


def cache_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_all_mention_their_classes(descriptions: list[str], combos: list[tuple[str, ...]]) -> None:
    assert len(descriptions) == len(combos)
    for text, combo in zip(descriptions, combos):
        assert missing_classes(text, combo) == [], (text, combo)


def test_descriptions_come_back_in_order_without_their_prefix(server, tmp_path):
    combos = [("dog", "frisbee"), ("car",), ("traffic light", "bus"), ("person",), ("boat",),
              ("cat", "sofa"), ("bird",)]

    def shuffled_prefixes(call: Call) -> Reply:
        # Lines in reverse order, prefixes in another order and case: matched by class set.
        lines = [f"{','.join(reversed(c)).upper()}: {photo_of(c)}" for c in reversed(call.combos)]
        return Reply(content="\n".join(lines))

    server.respond = shuffled_prefixes
    progressed: list[int] = []
    descriptions, stats = describe_with_llm(combos, make_config(server.url), tmp_path / "llm.jsonl",
                                            progress=progressed.append)

    assert descriptions == [photo_of(c) for c in combos]
    assert_all_mention_their_classes(descriptions, combos)
    # Requests run concurrently, so they may reach the server in any order.
    assert sorted(call.combos for call in server.calls) == sorted([combos[0:3], combos[3:6], combos[6:]])
    assert stats == LLMStats(requests_sent=3, requests_cached=0, lines_received=7, lines_rejected=0,
                             lines_unassigned=0, rounds=1)
    assert sum(progressed) == len(combos)
    assert len(cache_records(tmp_path / "llm.jsonl")) == 3


def test_numbering_bullets_quotes_and_prose_are_tolerated(server, tmp_path):
    combos = [("dog",), ("cat", "car"), ("bird",), ("person",), ("boat",), ("bus",)]
    server.respond = lambda call: Reply(content="\n".join([
        "Sure, here are the descriptions you asked for:",
        "",
        '1. "dog: a dog running along a beach"',
        "2) Car and Cat: a cat sitting on the roof of a car (a red one)",
        "(3) \u2022 bird: \u201ca bird perched on a wire\u201d",
        "- People: two people walking under umbrellas",
        "* a boat drifting on a calm lake",
        '\u2022 "bus: a red bus stuck in traffic"',
        "",
        "Hope this helps!",
    ]))
    descriptions, stats = describe_with_llm(combos, make_config(server.url, descriptions_per_request=6),
                                            tmp_path / "llm.jsonl")

    assert descriptions == [
        "a dog running along a beach",
        "a cat sitting on the roof of a car (a red one)",
        "a bird perched on a wire",
        "two people walking under umbrellas",
        "a boat drifting on a calm lake",
        "a red bus stuck in traffic",
    ]
    assert stats.lines_received == 8
    assert stats.lines_unassigned == 2
    assert stats.lines_rejected == 0
    assert server.hits == 1


def test_unprefixed_line_is_taken_only_for_the_next_open_combo(server, tmp_path):
    combos = [("dog",), ("cat",)]

    def script(call: Call) -> Reply:
        if call.index == 0:
            # An introduction naming the dog, the cat while the dog is still open, a line naming
            # both, and a prefix that is not a requested class: none of them fits.
            return Reply(content="Here is a short description of the dog:\n"
                                 "a cat on a windowsill\na dog chasing a cat\n"
                                 "doggy: a dog in the snow\ndog: a dog on the beach")
        return well_formed(call)

    server.respond = script
    descriptions, stats = describe_with_llm(combos, make_config(server.url), tmp_path / "llm.jsonl")

    assert descriptions[0] == "a dog on the beach"
    assert descriptions[1] == photo_of(("cat",), ", take 1")
    assert server.calls[1].combos == [("cat",)]
    assert stats.lines_unassigned == 4
    assert stats.rounds == 2
    assert stats.requests_sent == 2


def test_lines_missing_a_class_are_rejected_and_asked_again(server, tmp_path):
    combos = [("dog", "frisbee"), ("car",), ("bird",)]

    def script(call: Call) -> Reply:
        if call.index == 0:
            return Reply(content="dog,frisbee: a dog lying in the grass\ncar: a car\nbird: a bird")
        return well_formed(call)

    server.respond = script
    descriptions, stats = describe_with_llm(combos, make_config(server.url), tmp_path / "llm.jsonl")

    assert_all_mention_their_classes(descriptions, combos)
    assert descriptions[0] == photo_of(("dog", "frisbee"), ", take 1")
    assert server.calls[1].combos == [("dog", "frisbee")]
    assert stats.lines_rejected == 1
    assert stats.rounds == 2
    assert stats.requests_sent == 2


def test_gives_up_after_max_rounds_and_a_rerun_continues(server, tmp_path):
    combos = [("dog", "cat"), ("car",), ("bird",)]
    cache = tmp_path / "llm.jsonl"
    forget_the_cat = lambda call: Reply(content="\n".join(  # noqa: E731
        f"{','.join(c)}: {photo_of(tuple(x for x in c if x != 'cat'))}" for c in call.combos))
    server.respond = forget_the_cat
    config = make_config(server.url, max_rounds=2)

    with pytest.raises(UsageError) as excinfo:
        describe_with_llm(combos, config, cache)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "1 of 3" in message and str(cache) in message
    assert server.hits == 2
    assert len(cache_records(cache)) == 2

    server.respond = well_formed
    descriptions, stats = describe_with_llm(combos, config, cache)
    assert_all_mention_their_classes(descriptions, combos)
    assert stats.requests_cached == 2
    assert stats.requests_sent == 1
    assert server.calls[-1].combos == [("dog", "cat")]


def test_rate_limits_and_server_errors_are_retried(server, tmp_path):
    def script(call: Call) -> Reply:
        fast_retry = {"retry-after-ms": "1"}
        if call.index == 0:
            return Reply(status=429, headers=fast_retry, error_message="slow down")
        if call.index == 1:
            return Reply(status=500, headers=fast_retry)
        return well_formed(call)

    server.respond = script
    combos = [("dog",), ("cat",)]
    descriptions, stats = describe_with_llm(combos, make_config(server.url, max_retries=2),
                                            tmp_path / "llm.jsonl")

    assert_all_mention_their_classes(descriptions, combos)
    assert server.hits == 3
    assert stats.requests_sent == 1


def test_slow_reply_times_out_and_is_retried(server, tmp_path):
    def script(call: Call) -> Reply:
        return Reply(delay_s=2.0) if call.index == 0 else well_formed(call)

    server.respond = script
    started = time.monotonic()
    descriptions, stats = describe_with_llm([("dog",)], make_config(server.url, timeout_s=0.3),
                                            tmp_path / "llm.jsonl")

    assert descriptions == [photo_of(("dog",), ", take 1")]
    assert server.hits == 2
    assert stats.requests_sent == 1
    assert time.monotonic() - started < 2.0


def test_endpoint_that_never_answers_in_time_raises_one_line(server, tmp_path):
    server.respond = lambda call: Reply(delay_s=1.0)
    with pytest.raises(UsageError) as excinfo:
        describe_with_llm([("dog",)], make_config(server.url, timeout_s=0.2, max_retries=0),
                          tmp_path / "llm.jsonl")
    message = str(excinfo.value)
    assert "\n" not in message
    assert server.url in message and "APITimeoutError" in message


@pytest.mark.slow
def test_failing_endpoint_keeps_finished_requests_in_the_cache(server, tmp_path):
    combos = [("dog",), ("cat",), ("car",), ("bird",), ("boat",), ("bus",)]
    cache = tmp_path / "llm.jsonl"
    server.respond = lambda call: well_formed(call) if call.index == 0 else Reply(status=500)
    config = make_config(server.url, concurrency=1, descriptions_per_request=2)

    with pytest.raises(UsageError) as excinfo:
        describe_with_llm(combos, config, cache)
    message = str(excinfo.value)
    assert "\n" not in message
    assert server.url in message
    assert "InternalServerError" in message and "HTTP 500" in message
    assert str(cache) in message
    records = cache_records(cache)
    assert len(records) == 1
    assert records[0]["classes"] == [["dog"], ["cat"]]

    server.respond = well_formed
    descriptions, stats = describe_with_llm(combos, config, cache)
    assert descriptions[:2] == [photo_of(("dog",), ", take 0"), photo_of(("cat",), ", take 0")]
    assert_all_mention_their_classes(descriptions, combos)
    assert stats.requests_cached == 1
    assert stats.requests_sent == 2


def test_closed_port_raises_one_line_naming_the_endpoint(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cache = tmp_path / "llm.jsonl"

    with pytest.raises(UsageError) as excinfo:
        describe_with_llm([("dog",)], make_config(url), cache)
    message = str(excinfo.value)
    assert "\n" not in message
    assert url in message and "APIConnectionError" in message and "after 1 retry" in message
    assert not cache.exists() or cache_records(cache) == []


def test_concurrency_stays_within_the_limit(server, tmp_path):
    server.respond = lambda call: Reply(content=well_formed(call).content, delay_s=0.1)
    combos = [(name,) for name in ("dog", "cat", "car", "bird", "boat", "bus", "horse", "sheep", "cow",
                                   "chair", "sofa", "train")]
    descriptions, stats = describe_with_llm(
        combos, make_config(server.url, concurrency=3, descriptions_per_request=1), tmp_path / "llm.jsonl")

    assert_all_mention_their_classes(descriptions, combos)
    assert stats.requests_sent == 12
    assert server.max_in_flight == 3


def test_second_call_is_answered_from_the_cache(server, tmp_path):
    combos = [("dog", "cat"), ("car",), ("bird",), ("boat",)]
    cache = tmp_path / "llm.jsonl"
    config = make_config(server.url)
    first, _ = describe_with_llm(combos, config, cache)
    hits = server.hits

    progressed: list[int] = []
    second, stats = describe_with_llm(combos, config, cache, progress=progressed.append)
    assert server.hits == hits
    assert second == first
    assert stats.requests_sent == 0 and stats.requests_cached == 2
    assert sum(progressed) == len(combos)


def test_a_changed_model_is_not_answered_from_the_cache(server, tmp_path):
    cache = tmp_path / "llm.jsonl"
    describe_with_llm([("dog",)], make_config(server.url), cache)
    _, stats = describe_with_llm([("dog",)], make_config(server.url, model="another-model"), cache)
    assert stats.requests_sent == 1
    assert server.hits == 2


def test_a_torn_last_line_is_dropped_and_asked_again(server, tmp_path):
    combos = [("dog",), ("cat",), ("car",), ("bird",)]
    cache = tmp_path / "llm.jsonl"
    config = make_config(server.url, concurrency=1, descriptions_per_request=2)
    describe_with_llm(combos, config, cache)
    data = cache.read_bytes()
    cache.write_bytes(data[:-15])  # a crash in the middle of the second append

    descriptions, stats = describe_with_llm(combos, config, cache)
    assert_all_mention_their_classes(descriptions, combos)
    assert stats.requests_cached == 1 and stats.requests_sent == 1
    assert server.hits == 3
    assert cache.read_bytes().endswith(b"\n")
    assert len(cache_records(cache)) == 2


def test_a_corrupt_line_inside_the_cache_is_reported(server, tmp_path):
    cache = tmp_path / "llm.jsonl"
    cache.write_text('not json\n{"key": "k", "reply": "r"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"llm\.jsonl:1: not an LLM cache record"):
        describe_with_llm([("dog",)], make_config(server.url), cache)
    assert server.hits == 0


def test_identical_requests_get_their_own_answers(server, tmp_path):
    combos = [("dog",)] * 4
    cache = tmp_path / "llm.jsonl"
    config = make_config(server.url, descriptions_per_request=2)
    descriptions, stats = describe_with_llm(combos, config, cache)

    assert stats.requests_sent == 2
    assert descriptions[0] == descriptions[1] != descriptions[2] == descriptions[3]
    _, again = describe_with_llm(combos, config, cache)
    assert again.requests_sent == 0


def test_the_api_key_reaches_the_server_and_nowhere_else(server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "magicseg_engine"):
        caplog.set_level(logging.DEBUG, logger=name)
    cache = tmp_path / "llm.jsonl"
    describe_with_llm([("dog",), ("cat",)], make_config(server.url), cache)

    # A server that echoes the key in its error body must not get it onto the terminal.
    server.respond = lambda call: Reply(status=401, error_message=f"Incorrect API key provided: {SECRET}")
    with pytest.raises(UsageError) as excinfo:
        describe_with_llm([("bird",)], make_config(server.url), cache)
    message = str(excinfo.value)

    assert server.authorizations[0] == f"Bearer {SECRET}"
    assert "HTTP 401" in message and KEY_ENV in message
    assert SECRET not in message and "Incorrect API key provided: ***" in message
    chained = excinfo.value.__cause__ or excinfo.value.__context__
    assert chained is None or SECRET not in str(chained)
    text = cache.read_text(encoding="utf-8")
    assert SECRET not in text and server.url not in text and "127.0.0.1" not in text
    out, err = capsys.readouterr()
    assert SECRET not in out and SECRET not in err
    assert caplog.records, "debug logging was not captured"
    assert SECRET not in caplog.text


def test_an_unset_key_variable_sends_a_placeholder(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    descriptions, _ = describe_with_llm([("dog",)], make_config(server.url), tmp_path / "llm.jsonl")
    assert descriptions == [photo_of(("dog",), ", take 0")]
    assert server.authorizations == ["Bearer not-set"]


# --- through the command line ------------------------------------------------------------------

def test_prompts_command_with_the_llm_source(server, tmp_path):
    from typer.testing import CliRunner

    from magicseg_engine.cli import app
    from magicseg_engine.prompts import read_records

    out = tmp_path / "prompts.jsonl"
    args = ["prompts", "--source", "llm", "--classes", "voc", "--num", "7", "--seed", "1", "--out", str(out),
            "--llm-base-url", server.url, "--llm-model", "scripted-model", "--llm-api-key-env", KEY_ENV,
            "--llm-concurrency", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert len(records) == 7 and all(r.source == "llm" for r in records)
    for r in records:
        assert missing_classes(r.prompt, r.classes) == []
        assert missing_classes(r.negative_prompt, r.classes) == list(r.classes)
    cache = tmp_path / "prompts.llm-cache.jsonl"
    saved = (tmp_path / "prompts.config.json").read_text()
    assert cache.exists() and SECRET not in cache.read_text() and SECRET not in saved
    assert json.loads(saved)["summary"]["llm"]["requests_sent"] == server.hits
    assert all(a == f"Bearer {SECRET}" for a in server.authorizations)

    # A second run asks nothing and writes the same file.
    hits, first = server.hits, out.read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert server.hits == hits and out.read_bytes() == first


def test_prompts_command_with_a_failing_endpoint_writes_no_output(server, tmp_path):
    from typer.testing import CliRunner

    from magicseg_engine.cli import app

    server.respond = lambda call: Reply(status=503)
    out = tmp_path / "prompts.jsonl"
    result = CliRunner().invoke(app, ["prompts", "--source", "llm", "--classes", "voc", "--num", "3", "--out", str(out),
                                      "--llm-base-url", server.url, "--llm-api-key-env", KEY_ENV,
                                      "--llm-max-retries", "1", "--llm-timeout", "5"])
    assert result.exit_code == 2
    assert server.url in result.stderr and "HTTP 503" in result.stderr
    assert server.hits == 2  # the request and its one retry
    assert not out.exists() and not (tmp_path / "prompts.config.json").exists()


def test_prompts_llm_cache_option_puts_the_cache_where_asked(server, tmp_path):
    """--llm-cache names the cache file: a second run with another --out is answered from it."""
    from typer.testing import CliRunner

    from magicseg_engine.cli import app

    cache = tmp_path / "shared" / "answers.jsonl"
    cache.parent.mkdir()
    args = ["prompts", "--source", "llm", "--classes", "voc", "--num", "3", "--llm-base-url", server.url,
            "--llm-api-key-env", KEY_ENV, "--llm-cache", str(cache)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 0, result.output
    assert cache.exists() and not (tmp_path / "a.llm-cache.jsonl").exists()  # not the default beside --out
    hits = server.hits
    assert hits > 0
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.jsonl")])
    assert result.exit_code == 0, result.output
    assert server.hits == hits  # nothing asked again
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
