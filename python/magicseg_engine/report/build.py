"""`report`: gather a run, draw its pairs and charts, write the page whole or not at all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from magicseg_engine.atomic import atomic_write_text
from magicseg_engine.errors import UsageError
from magicseg_engine.report import charts
from magicseg_engine.report.gather import RunDigest, gather_run
from magicseg_engine.report.page import Charts, ShownPair, UnreadablePair, render_page
from magicseg_engine.report.thumbnails import class_colours, pair_images

MAX_SAMPLES = 1000  # about 3 MB of thumbnails per 100 pairs: beyond this a browser struggles


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    digest: RunDigest
    shown: int
    unreadable: tuple[UnreadablePair, ...]


def build_report(data: Path | str, out: Path | str | None = None, samples: int = 64, *,
                 progress: Callable[[int, int], None] | None = None) -> ReportSummary:
    """Write the HTML report of the run in `data` to `out` (default `data/report.html`).

    Raises UsageError for bad arguments, a directory that holds no finished shard, or a run
    of which nothing can be read; then no file is written. Unreadable shards and pairs are
    skipped, listed in the summary and on the page.
    """
    data = Path(data)
    out = Path(out) if out is not None else data / "report.html"
    if not 1 <= samples <= MAX_SAMPLES:
        raise UsageError(f"--samples {samples}: choose between 1 and {MAX_SAMPLES} pairs to show")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name the HTML file to write, like {out / 'report.html'}")
    digest = gather_run(data, samples, progress=progress)
    colours = class_colours(list(digest.classes))
    shown, unreadable = [], []
    for ref in digest.chosen:
        try:
            shown.append(ShownPair(ref, pair_images(ref, colours)))
        except (ValueError, OSError) as err:
            unreadable.append(UnreadablePair(ref.key, str(err)))
    drawn = Charts(
        samples_per_class=charts.samples_per_class(digest, colours),
        classes_per_image=charts.classes_per_image(digest),
        mask_area=charts.mask_area_per_class(digest, colours),
        quality=charts.counterfactual_quality(digest),
    )
    atomic_write_text(out, render_page(digest, shown, unreadable, drawn, colours), site="report")
    return ReportSummary(out, digest, len(shown), tuple(unreadable))
