"""`generate --balance`: every class ends with about as many usable pairs as was asked for.

Classes are dealt evenly (or by weight) when the prompts are made, but what a run keeps is
uneven: the counterfactual check drops or flags pairs, and the masks miss some classes. With
`--balance`, after the requested pairs are rendered the run counts, per class, the pairs it
can use (written, with a non-empty mask of the class, and not failing the counterfactual
check), and renders more pairs for the classes below (1 - tolerance) of their target, the
number of pairs of that class the request held. The top-up for a class is its shortfall
divided by the share of its pairs that were usable so far, so a class that fails often gets
more tries. Rounds go on until every class is within tolerance, or the budget (extra pairs,
as a fraction of the request) or the rounds are spent; the classes still short are then
named with their counts and why their pairs were lost.

Top-up prompts are drawn like the first ones (same source, same settings) from the short
classes, weighted by what each still needs, with a seed of their own per round, and are
appended to prompts.jsonl; run.json keeps the settings, each round and the per-class counts,
so `--resume` continues a balanced run where it stopped, rounds included. The schedule runs
where the prompts are made (the driver, with --ray); the renderers only see records.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from magicseg_engine.atomic import atomic_write_text
from magicseg_engine.errors import UsageError

# A class whose pairs were never usable is retried as if one in this many were.
MIN_SUCCESS_RATE = 0.1
# Each round's top-up seed: far from the run seed's own per-sample seeds.
ROUND_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class BalanceSettings:
    tolerance: float = 0.1  # each class at least (1 - tolerance) x its target
    budget: float = 0.5  # extra pairs over all rounds, as a fraction of the requested pairs
    max_rounds: int = 4

    def check(self) -> None:
        if not 0 <= self.tolerance < 1:
            raise UsageError(f"--balance-tolerance {self.tolerance}: give a fraction in [0, 1)")
        if self.budget <= 0:
            raise UsageError(f"--balance-budget {self.budget}: give a positive fraction of the requested pairs")
        if self.max_rounds < 1:
            raise UsageError(f"--balance-rounds {self.max_rounds}: give at least 1")

    def as_json(self) -> dict:
        return {"tolerance": self.tolerance, "budget": self.budget, "max_rounds": self.max_rounds}


@dataclass(frozen=True)
class ClassCount:
    target: int  # pairs of the class in the request
    attempts: int  # pairs of the class rendered so far (all rounds)
    usable: int  # written, non-empty mask, not failing the counterfactual check
    dropped: int  # left out of the shards (--drop-failed-pairs), with the reasons in drop_reasons
    flagged: int  # failed the counterfactual check and kept, marked
    no_mask: int  # written, but the class was not found or its mask is empty
    drop_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def short_reason(self) -> str:
        lost = {f"dropped: {why}": n for why, n in self.drop_reasons.items()}
        lost.update({"flagged by the counterfactual check": self.flagged, "no mask found": self.no_mask})
        parts = [f"{n} {why}" for why, n in sorted(lost.items(), key=lambda kv: -kv[1]) if n]
        return ", ".join(parts) or "no pair rendered yet"


def count_classes(run_dir: Path, records: Sequence, keys: Sequence[str], targets: dict[str, int]) -> dict[str, ClassCount]:
    """Per-class counts of the run as it is on disk. `keys` are the records' sample keys, in order."""
    from magicseg_engine.pipeline import DROPPED_FILE
    from magicseg_engine.report.gather import gather_run

    try:
        stats = gather_run(run_dir, samples=1).classes
    except UsageError:  # no finished shard yet: every pair so far was dropped
        stats = {}
    dropped_why: dict[str, str] = {}
    path = run_dir / DROPPED_FILE
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                dropped_why[entry["key"]] = str(entry.get("reason") or "unknown")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    attempts: Counter = Counter()
    reasons: dict[str, Counter] = {}
    for key, record in zip(keys, records):
        attempts.update(record.classes)
        if key in dropped_why:
            for name in record.classes:
                reasons.setdefault(name, Counter())[dropped_why[key]] += 1
    counts = {}
    for name, target in targets.items():
        s = stats.get(name)
        why = dict(reasons.get(name, {}))
        counts[name] = ClassCount(target=target, attempts=attempts[name], usable=s.usable if s else 0,
                                  dropped=sum(why.values()), flagged=s.flagged if s else 0,
                                  no_mask=s.no_mask if s else 0, drop_reasons=why)
    return counts


def shortfalls(counts: dict[str, ClassCount], tolerance: float) -> dict[str, int]:
    """Usable pairs each class lacks to reach (1 - tolerance) of its target; only those short."""
    short = {}
    for name, c in counts.items():
        need = math.ceil((1 - tolerance) * c.target) - c.usable
        if need > 0:
            short[name] = need
    return short


def top_up_plan(counts: dict[str, ClassCount], short: dict[str, int]) -> dict[str, float]:
    """Expected pairs to render per short class: its shortfall over its success rate so far."""
    plan = {}
    for name, need in short.items():
        c = counts[name]
        rate = max(MIN_SUCCESS_RATE, c.usable / c.attempts) if c.attempts else 1.0
        plan[name] = need / rate
    return plan


def top_up_records(prompts_config, plan: dict[str, float], pairs: int, round_index: int, existing_ids: set[str]):
    """`pairs` new records drawn from the planned classes, weighted by their plan, for round `round_index`."""
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import Vocabulary

    names = sorted(plan)
    vocab = Vocabulary("balance top-up", tuple(names), weights=tuple(plan[n] for n in names))
    config = prompts_config.model_copy(update={"seed": prompts_config.seed + ROUND_SEED_STRIDE * round_index})
    records = build_prompts(config, vocab=vocab, num=pairs).records
    return [r for r in records if r.id not in existing_ids]


@dataclass
class BalanceResult:
    rounds: int
    counts: dict[str, ClassCount]
    short: dict[str, int]  # classes still short, and by how many usable pairs
    extra_pairs: int


def run_balanced(run_dir: Path, prompts_config, records: list, requested: int, key_of: Callable[[object], str],
                 settings: BalanceSettings, render: Callable[[list], None],
                 on_round: Callable[[int, dict[str, int], int], None] | None = None) -> BalanceResult:
    """Render `records`, then top up short classes round by round (see the module docstring).

    `requested` is how many of `records` the user asked for (the rest are earlier rounds' top-ups,
    on a resumed run); `render(records)` renders every record the run does not hold yet.
    `on_round(round, short, pairs)` is told of each top-up before it renders.
    """
    from magicseg_engine.pipeline import PROMPTS_FILE, RUN_FILE
    from magicseg_engine.prompts.records import write_records

    targets = Counter(c for r in records[:requested] for c in r.classes)
    saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    rounds = list(saved.get("balance", {}).get("rounds", []))
    budget = math.floor(settings.budget * requested)
    while True:
        render(records)
        counts = count_classes(run_dir, records, [key_of(r) for r in records], dict(targets))
        short = shortfalls(counts, settings.tolerance)
        extra = len(records) - requested
        if not short or len(rounds) >= settings.max_rounds or extra >= budget:
            break
        plan = top_up_plan(counts, short)
        pairs = min(budget - extra, max(1, math.ceil(sum(plan.values()) / _classes_per_pair(records))))
        new = top_up_records(prompts_config, plan, pairs, len(rounds) + 1, {r.id for r in records})
        if not new:
            break
        if on_round:
            on_round(len(rounds) + 1, short, len(new))
        records = records + new
        rounds.append({"round": len(rounds) + 1, "pairs": len(new), "short": short})
        # The records first: a run killed here resumes with them, and renders them.
        write_records(run_dir / PROMPTS_FILE, records)
        _save(run_dir, settings, requested, rounds, counts, short)
    _save(run_dir, settings, requested, rounds, counts, short)
    return BalanceResult(len(rounds), counts, short, len(records) - requested)


def _classes_per_pair(records: Sequence) -> float:
    return sum(len(r.classes) for r in records) / max(1, len(records))


def _record(settings: BalanceSettings, requested: int, rounds: list, counts: dict[str, ClassCount],
            short: dict[str, int]) -> dict:
    return {
        **settings.as_json(), "requested_pairs": requested, "rounds": rounds,
        "classes": {name: {**vars(c), **({"short_by": short[name], "why": c.short_reason} if name in short else {})}
                    for name, c in sorted(counts.items())},
        "short": sorted(short),
    }


def _save(run_dir: Path, settings: BalanceSettings, requested: int, rounds: list, counts: dict[str, ClassCount],
          short: dict[str, int]) -> None:
    from magicseg_engine.pipeline import RUN_FILE

    path = run_dir / RUN_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["balance"] = _record(settings, requested, rounds, counts, short)
    atomic_write_text(path, json.dumps(saved, indent=2, sort_keys=True) + "\n", site="run_file")


def start_record(settings: BalanceSettings, requested: int) -> dict:
    """The run.json entries that mark a new run as balanced. `pipeline.start_run` writes them with
    the run's start marker, before its first pair, so a run killed at any point is resumed with
    --balance."""
    return {"balance": _record(settings, requested, [], {}, {})}


def check_resumable(saved: dict, settings: BalanceSettings | None) -> None:
    """UsageError when --balance (or its settings) differ from the run's."""
    had = saved.get("balance")
    if had is None and settings is None:
        return
    if had is None or settings is None:
        raise UsageError("--resume: the run was generated " + ("with" if had else "without") + " --balance; "
                         "use the same flags, or --overwrite to start again")
    mine = settings.as_json()
    if {k: had.get(k) for k in mine} != mine:
        raise UsageError(f"--resume: the --balance settings differ from the run's ({ {k: had.get(k) for k in mine} }); "
                         "use the same flags, or --overwrite to start again")
