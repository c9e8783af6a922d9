"""Stage 1-3 of the pipeline: classes -> scene descriptions -> positive and counterfactual prompts."""

from magicseg_engine.prompts.build import PromptsResult, build_prompts
from magicseg_engine.prompts.counterfactual import CounterfactualError, make_negative, mentions
from magicseg_engine.prompts.records import PromptRecord, read_records, write_records

__all__ = [
    "CounterfactualError", "PromptRecord", "PromptsResult", "build_prompts", "make_negative",
    "mentions", "read_records", "write_records",
]
