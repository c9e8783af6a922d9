"""Scene descriptions for class combinations from an OpenAI-compatible chat endpoint, cached so runs resume."""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai

from magicseg_engine.atomic import DISK_ERRNOS, append_text, check_writable_dir
from magicseg_engine.config import LLMConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.prompts.counterfactual import mentions, missing_classes, name_forms
from magicseg_engine.prompts.records import stable_hash

log = logging.getLogger(__name__)

# Local servers (vLLM, llama.cpp, Ollama) ignore the key, but the SDK will not start without one.
PLACEHOLDER_API_KEY = "not-set"

SYSTEM_MESSAGE = (
    "You write captions of photographs. Each caption is one sentence describing a realistic, "
    "everyday scene as a camera would see it."
)

EXAMPLE_LINE = "dog,frisbee: a photo of a dog leaping to catch a red frisbee in a sunny park"

_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
# Bullets and numbering a model puts in front of list lines: "-", "*", "•", "1.", "2)", "(3)".
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022\u00b7\u2013]+\s*|\(?\d{1,3}[.)]\s*)")
# What a class name in a `cls1,cls2:` prefix looks like: up to four words, no other punctuation.
_NAME_LIKE = re.compile(r"[^\W\d_]+(?:[ '\-][^\W\d_]+){0,3}")
_OTHER_SEPARATORS = re.compile(r"\s+(?:and|&|\+)\s+|\s*[/;&+]\s*")
_PREFIX_DECORATION = " \t*_`[]()\"'\u201c\u201d\u2018\u2019"
# A caption is one sentence, and text encoders read 77 tokens (a few hundred characters). A
# longer line is a model gone astray; matching class mentions in it costs seconds per megabyte,
# so a runaway reply of megabytes on one line is skipped (and counted) before it is searched.
MAX_LINE_CHARS = 2000


@dataclass
class LLMStats:
    """What it took to get the descriptions; a request retried by the SDK counts once."""

    requests_sent: int = 0
    requests_cached: int = 0
    lines_received: int = 0
    lines_rejected: int = 0  # named their classes in the prefix but did not mention them all
    lines_unassigned: int = 0  # prose, markup, damaged text, duplicates, or lines that fit no open combination
    lines_too_long: int = 0  # over MAX_LINE_CHARS: never a caption
    rounds: int = 0


@dataclass(frozen=True)
class ChatRequest:
    key: str
    positions: tuple[int, ...]  # indices into the caller's combos, in the order they are listed
    messages: tuple[dict[str, str], ...]


def describe_with_llm(
    combos: Sequence[tuple[str, ...]],
    config: LLMConfig,
    cache_path: Path,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], LLMStats]:
    """One description per combination, in order, each mentioning all of its classes.

    `progress` is called with the number of combinations a request (answered by the server or
    from the cache) has just described. Raises UsageError when the endpoint fails or when some
    combinations are still undescribed after `config.max_rounds` rounds that asked the server.
    """
    combos = [tuple(c) for c in combos]
    if any(not c for c in combos):
        raise ValueError("every combination needs at least one class name")
    stats = LLMStats()
    descriptions: list[str | None] = [None] * len(combos)
    if not combos:
        return [], stats

    cache = ReplyCache(Path(cache_path))
    api_key = os.environ.get(config.api_key_env) or PLACEHOLDER_API_KEY
    times_asked: Counter[str] = Counter()
    server_rounds = 0
    with openai.OpenAI(base_url=config.base_url, api_key=api_key,
                       max_retries=config.max_retries, timeout=config.timeout_s) as client:
        while pending := [i for i, d in enumerate(descriptions) if d is None]:
            requests = plan_round(pending, combos, config, times_asked)
            needs_server = any(r.key not in cache for r in requests)
            # Rounds replayed from the cache are free, so a re-run gets fresh rounds for what
            # an earlier run left undescribed instead of repeating its failure.
            if needs_server and server_rounds == config.max_rounds:
                break
            server_rounds += needs_server
            stats.rounds += 1
            log.info("LLM round %d: %d combinations in %d requests", stats.rounds, len(pending), len(requests))
            for request, reply in answer_round(requests, client, config, cache, combos, api_key, stats):
                filled = absorb_reply(reply, request, combos, descriptions, stats)
                if progress is not None and filled:
                    progress(filled)

    missing = [i for i, d in enumerate(descriptions) if d is None]
    if missing:
        example = ",".join(combos[missing[0]])
        raise UsageError(
            f"the LLM gave no usable description for {len(missing)} of {len(combos)} class combinations "
            f"(for example {example!r}) in {config.max_rounds} rounds; answered requests are kept in "
            f"{cache_path}, so running the same command again continues with the missing ones"
        )
    log.info("LLM descriptions: %s", stats)
    return [d for d in descriptions if d is not None], stats


def plan_round(
    pending: list[int], combos: list[tuple[str, ...]], config: LLMConfig, times_asked: Counter[str],
) -> list[ChatRequest]:
    """Split the undescribed combinations, in order, into requests with deterministic keys."""
    size = config.descriptions_per_request
    requests = []
    for start in range(0, len(pending), size):
        positions = tuple(pending[start:start + size])
        messages = build_messages([combos[i] for i in positions])
        base = request_key(config, messages)
        requests.append(ChatRequest(request_key(config, messages, times_asked[base]), positions, messages))
        times_asked[base] += 1
    return requests


def build_messages(combos: Sequence[tuple[str, ...]]) -> tuple[dict[str, str], ...]:
    """The chat messages asking for one `cls1,cls2: description` line per combination."""
    items = "\n".join(f"{n}. {','.join(combo)}" for n, combo in enumerate(combos, start=1))
    user = (
        f"Write one short description of a natural, photo-like scene for each of the {len(combos)} "
        "numbered items below. Each description must mention every class name of its item by name, "
        "as something visible in the scene, and no other class name from the list.\n"
        "Answer with one line per item, in the same order, written as the item's class names, "
        f"a colon and the description, for example:\n{EXAMPLE_LINE}\n"
        "Write nothing else.\n\n"
        f"{items}"
    )
    return ({"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user})


def request_key(config: LLMConfig, messages: Sequence[dict[str, str]], repeat: int = 0) -> str:
    # The base URL is left out: the answer depends on the model, not on the address it is reached
    # through (localhost vs 127.0.0.1, a proxy, a new port), and URLs can carry credentials.
    # `repeat` numbers identical requests within a run (the same combinations asked twice, or
    # asked again after a reply missed a class) so they get fresh answers, not the cached one.
    return stable_hash({
        "model": config.model, "messages": list(messages),
        "temperature": config.temperature, "repeat": repeat,
    }, length=32)


def answer_round(
    requests: list[ChatRequest], client: openai.OpenAI, config: LLMConfig, cache: ReplyCache,
    combos: list[tuple[str, ...]], api_key: str, stats: LLMStats,
) -> Iterator[tuple[ChatRequest, str]]:
    """Yield (request, reply) for every request, from the cache or from the server.

    Fresh replies are cached as they arrive. On the first request that fails after the SDK's
    retries, queued requests are dropped, the ones in flight are still awaited and cached, and
    UsageError is raised.
    """
    for request in requests:
        if request.key in cache:
            stats.requests_cached += 1
            yield request, cache[request.key]
    fresh = [r for r in requests if r.key not in cache]
    if not fresh:
        return
    failure: openai.APIError | MalformedAnswer | None = None
    with ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="llm") as pool:
        futures: dict[Future[str], ChatRequest] = {
            pool.submit(ask_endpoint, client, config, r.messages): r for r in fresh
        }
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    reply = future.result()
                except (openai.APIError, MalformedAnswer) as err:
                    failure = failure or err
                    for queued in futures:
                        queued.cancel()
                    continue
                request = futures[future]
                stats.requests_sent += 1
                cache.append(request.key, config.model, [combos[i] for i in request.positions], reply)
                yield request, reply
        finally:
            # Ctrl-C or an error in the caller should not wait for the whole queue.
            for queued in futures:
                queued.cancel()
    if failure is not None:
        raise UsageError(redact(describe_endpoint_failure(failure, config, cache.path), api_key)) from None


class MalformedAnswer(Exception):
    """The endpoint answered 200 with a body that is no chat completion: not JSON, not UTF-8, or
    JSON of another shape. The SDK hands such bodies through without checking them."""


def ask_endpoint(client: openai.OpenAI, config: LLMConfig, messages: Sequence[dict[str, str]]) -> str:
    try:
        response = client.chat.completions.create(
            model=config.model, messages=list(messages), temperature=config.temperature,
        )
        choices = getattr(response, "choices", None) or []
        message = choices[0].message if choices else None
        content = getattr(message, "content", None) if message is not None else None
    except openai.APIError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:  # UnicodeDecodeError is a ValueError
        raise MalformedAnswer(f"{type(err).__name__}: {str(err)[:120]}") from None
    if content is None:
        return ""
    if not isinstance(content, str):
        raise MalformedAnswer(f"the message content is {type(content).__name__}, not text")
    # JSON may carry lone surrogates ("\ud800"), which no file can hold: the cache write would fail.
    return content.encode("utf-8", "replace").decode("utf-8")


def describe_endpoint_failure(err: openai.APIError, config: LLMConfig, cache_path: Path) -> str:
    """One line naming the endpoint, what went wrong, and what to do."""
    url = display_url(config.base_url)
    kind = type(err).__name__
    retries = f"{config.max_retries} retr{'y' if config.max_retries == 1 else 'ies'}"
    kept = f"finished requests are cached in {cache_path}"
    if isinstance(err, openai.APIConnectionError):  # timeouts included
        return f"LLM endpoint {url} did not answer after {retries} ({kind}); {kept}; check --llm-base-url or try again"
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        detail = server_detail(err)
        if status in (408, 409, 429) or status >= 500:
            return (f"LLM endpoint {url} kept failing after {retries} (HTTP {status}, {kind}{detail}); "
                    f"{kept}; try again later or lower --llm-concurrency")
        if status in (401, 403):
            hint = f"check the API key in the environment variable {config.api_key_env}"
        else:
            hint = "check --llm-base-url and --llm-model"
        return f"LLM endpoint {url} refused the request (HTTP {status}, {kind}{detail}); {kept}; {hint}"
    if isinstance(err, MalformedAnswer):
        kind = str(err)
    return (f"LLM endpoint {url} sent an answer that is not a chat completion ({kind}); "
            f"{kept}; check that --llm-base-url points at an OpenAI-compatible /v1 endpoint")


def server_detail(err: openai.APIStatusError) -> str:
    body = err.body
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message.strip():
        return ""
    text = " ".join(message.split())
    return f": {text[:200]}{'...' if len(text) > 200 else ''}"


def display_url(url: str) -> str:
    """`url` without a user:password part, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def redact(text: str, secret: str) -> str:
    # A server may echo the key back in an error body; it must not reach the user's terminal.
    if secret and secret != PLACEHOLDER_API_KEY:
        return text.replace(secret, "***")
    return text


def absorb_reply(
    reply: str, request: ChatRequest, combos: list[tuple[str, ...]],
    descriptions: list[str | None], stats: LLMStats,
) -> int:
    """Store the reply's usable lines as descriptions of the request's open combinations.

    Returns how many combinations it described.
    """
    open_positions = [i for i in request.positions if descriptions[i] is None]
    canonical = class_form_lookup([combos[i] for i in request.positions])
    filled = 0
    for raw in reply.splitlines():
        if len(raw) > 4 * MAX_LINE_CHARS:  # too long even before its whitespace is collapsed
            stats.lines_received += 1
            stats.lines_too_long += 1
            continue
        line = clean_line(raw)
        if not line:
            continue
        stats.lines_received += 1
        if len(line) > MAX_LINE_CHARS:
            stats.lines_too_long += 1
            log.debug("LLM line of %d characters is no caption", len(line))
            continue
        position, text = assign_line(line, open_positions, combos, canonical)
        if position is not None and not is_caption_text(text):
            position = None
        if position is None:
            stats.lines_unassigned += 1
            log.debug("LLM line fits no open combination: %r", raw)
            continue
        if missing_classes(text, combos[position]):
            stats.lines_rejected += 1
            log.debug("LLM line does not mention %s: %r", missing_classes(text, combos[position]), raw)
            continue
        descriptions[position] = text
        open_positions.remove(position)
        filled += 1
    return filled


def is_caption_text(text: str) -> bool:
    """False for text no caption looks like: JSON or markup that happens to name the classes
    (a reply cut off inside a JSON list), or text with control characters or U+FFFD, which is
    what bytes that were not UTF-8 become; such text would be drawn as it is."""
    if not text or text[0] in "{[<" or text.startswith("```"):
        return False
    return not any(ch == "\ufffd" or unicodedata.category(ch) == "Cc" for ch in text)


def assign_line(
    line: str, open_positions: list[int], combos: list[tuple[str, ...]], canonical: dict[str, str],
) -> tuple[int | None, str]:
    """The open combination a cleaned reply line describes, and its description text."""
    named, description = split_class_prefix(line, canonical)
    if named is not None:
        for i in open_positions:
            if class_set(combos[i], canonical) == named:
                return i, description
        return None, description  # a combination already described, or one not asked for here
    if not open_positions or line.endswith(":"):
        return None, line  # an introduction such as "Here are the descriptions:"
    nxt = open_positions[0]
    others = set(canonical.values()) - class_set(combos[nxt], canonical)
    if missing_classes(line, combos[nxt]) or any(mentions(line, c) for c in others):
        return None, line
    return nxt, line


def split_class_prefix(line: str, canonical: dict[str, str]) -> tuple[frozenset[str] | None, str]:
    """Split `cls1,cls2: description` into the named classes and the description.

    The classes are None when the line has no prefix, and empty when the prefix names something
    other than the request's classes ("persons:", "Sure, here you go:"): that matches no
    combination, so a description is never stored with a stray prefix still attached.
    """
    head, colon, tail = line.partition(":")
    if not colon:
        return None, line
    names = [normalise_name(part) for part in head.split(",")]
    if not all(n in canonical for n in names):
        # Models sometimes write "dog and cat:" or "dog & cat:" instead of "dog,cat:".
        joined = [normalise_name(p) for n in names for p in _OTHER_SEPARATORS.split(n)]
        names = joined if all(n in canonical for n in joined) else names
    if not all(n in canonical or _NAME_LIKE.fullmatch(n) for n in names):
        return None, line
    named = frozenset(canonical[n] for n in names) if all(n in canonical for n in names) else frozenset()
    # lstrip only: "**dog:** a photo" leaves "**" in front, while a trailing ")" is the text's own.
    return named, strip_quotes(tail.lstrip(" *_"))


def class_form_lookup(combos: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """Every accepted spelling (lower case, singular or plural) of the classes → its class name."""
    lookup: dict[str, str] = {}
    for combo in combos:
        for name in combo:
            key = normalise_name(name)
            lookup.setdefault(key, key)
            for form in name_forms(name):
                lookup.setdefault(form, key)
    return lookup


def class_set(combo: tuple[str, ...], canonical: dict[str, str]) -> frozenset[str]:
    return frozenset(canonical[normalise_name(c)] for c in combo)


def normalise_name(name: str) -> str:
    return " ".join(name.strip(_PREFIX_DECORATION).lower().split())


def clean_line(raw: str) -> str:
    """A reply line without list markers, surrounding quotes and extra whitespace."""
    line = " ".join(raw.split())
    for _ in range(3):  # "- 1. dog: ..." carries two markers
        stripped = _LIST_MARKER.sub("", line, count=1)
        if stripped == line:
            break
        line = stripped
    return strip_quotes(line)


def strip_quotes(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


class ReplyCache:
    """Chat replies by request key, in a JSON-lines file that grows by one fsynced line per answer.

    Lines hold the key, the model, the combinations asked for and the reply text; never the API
    key or the endpoint address.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        check_writable_dir(path.parent if str(path.parent) else Path("."))
        if path.exists() and not path.is_file():
            raise UsageError(f"LLM cache {path} is not a file; choose another --llm-cache path")
        self.replies = self._load()

    def __contains__(self, key: str) -> bool:
        return key in self.replies

    def __getitem__(self, key: str) -> str:
        return self.replies[key]

    def append(self, key: str, model: str, combos: list[tuple[str, ...]], reply: str) -> None:
        line = json.dumps({"key": key, "model": model, "classes": [list(c) for c in combos], "reply": reply},
                          ensure_ascii=False)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                append_text(f, line + "\n", site="llm_cache", path=self.path)
                os.fsync(f.fileno())
        except OSError as err:
            if err.errno in DISK_ERRNOS:  # a full or failing disk, not a wrong path: the CLI says so
                raise
            raise UsageError(f"cannot write the LLM cache {self.path}: {err.strerror}; "
                             "choose a writable --llm-cache path") from None
        self.replies[key] = reply

    def _load(self) -> dict[str, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise UsageError(f"cannot read the LLM cache {self.path}: {err.strerror}") from None
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            self._drop_torn_tail(len(complete))
        replies: dict[str, str] = {}
        for lineno, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, reply = record["key"], record["reply"]
                if not isinstance(key, str) or not isinstance(reply, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{self.path}:{lineno}: not an LLM cache record; delete that line "
                                 "or the file (its requests are then asked again)") from None
            replies[key] = reply
        return replies

    def _drop_torn_tail(self, keep: int) -> None:
        # Appends are whole lines, so a last line without its newline is a write cut short by a
        # crash; dropping it means at most one request is asked again.
        log.warning("LLM cache %s ends in an incomplete line (interrupted write); dropping it", self.path)
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
