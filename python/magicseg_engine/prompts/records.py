"""The prompt record: one positive/negative pair request, as written to prompts.jsonl."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from magicseg_engine.atomic import atomic_output
from magicseg_engine.errors import UsageError


def stable_hash(payload: dict, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload; independent of key order and Python version."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


# torch.Generator.manual_seed takes seeds below 2**64; a record must be renderable.
MAX_SEED = 2**64


class BadRecordsFile(UsageError, ValueError):
    """A prompts file that cannot be read as prompt records. A UsageError, so the CLI reports it
    in one line; a ValueError, so callers that tell a damaged file from a good one catch it."""


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of the `index`-th sample of a run: unique within a run and across run seeds."""
    return run_seed * 2**32 + index


class PromptRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    classes: tuple[str, ...] = Field(min_length=1)
    prompt: str = Field(min_length=1)
    negative_prompt: str
    seed: int = Field(ge=0, lt=MAX_SEED)
    source: str

    @model_validator(mode="after")
    def _fill_id(self) -> PromptRecord:
        expected = self.content_id()
        if not self.id:
            object.__setattr__(self, "id", expected)
        elif self.id != expected:
            raise ValueError(f"id {self.id!r} does not match the record's content (expected {expected!r})")
        return self

    def content_id(self) -> str:
        return stable_hash({
            "classes": list(self.classes), "prompt": self.prompt,
            "negative_prompt": self.negative_prompt, "seed": self.seed,
        })


def write_records(path: Path, records: Iterable[PromptRecord]) -> int:
    """Write records as JSON lines, atomically. Returns how many were written."""
    n = 0
    with atomic_output(path, site="prompts") as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_records(path: Path) -> list[PromptRecord]:
    """The records of a prompts file; BadRecordsFile names the file, the line and what to do
    when it is missing, not UTF-8, or holds a line that is not a whole, valid record."""
    path = Path(path)
    fix = "restore it from a copy, or write it again with `magicseg-engine prompts`"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadRecordsFile(f"cannot read the prompts file {path}: {err.strerror}; {fix}") from None
    records = []
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(PromptRecord.model_validate_json(line))
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(p) for p in problem.get("loc", ())) or "the line"
            raise BadRecordsFile(f"{path}:{lineno} is not a prompt record ({where}: {problem.get('msg', 'invalid')}); "
                                 f"{fix}") from None
    return records
