"""The prompt record: one positive/negative pair request, as written to prompts.jsonl."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from magicseg_engine.atomic import atomic_output


def stable_hash(payload: dict, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload; independent of key order and Python version."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of the `index`-th sample of a run: unique within a run and across run seeds."""
    return run_seed * 2**32 + index


class PromptRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    classes: tuple[str, ...] = Field(min_length=1)
    prompt: str = Field(min_length=1)
    negative_prompt: str
    seed: int = Field(ge=0)
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
    with atomic_output(path) as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_records(path: Path) -> list[PromptRecord]:
    with open(path, encoding="utf-8") as f:
        return [PromptRecord.model_validate_json(line) for line in f if line.strip()]
