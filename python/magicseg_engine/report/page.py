"""The report as one self-contained HTML page: images and charts inline, no network, no server.

Plain string building with `html.escape` on every value that comes from the run (class names,
prompts and paths are user text). The small script at the end filters the grid by class.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from magicseg_engine.report.gather import RunDigest, SampleRef
from magicseg_engine.report.thumbnails import PairImages

MAX_REASONS = 10  # skipped shards listed one by one; the rest are counted


@dataclass(frozen=True)
class ShownPair:
    ref: SampleRef
    images: PairImages


@dataclass(frozen=True)
class Charts:
    samples_per_class: bytes
    classes_per_image: bytes
    mask_area: bytes | None
    quality: bytes | None


@dataclass(frozen=True)
class UnreadablePair:
    key: str
    reason: str


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _chip(name: str, colours: dict, extra: str = "") -> str:
    return (f'<button type="button" class="chip" data-class="{escape(name)}" title="show only {escape(name)}">'
            f'<span class="swatch" style="background:{_hex(colours[name])}"></span>{escape(name)}{extra}</button>')


STYLE = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f4f5f7}
header,section{padding:14px 24px}
header{background:#1d2330;color:#fff}
header h1{margin:0 0 4px;font-size:20px}
header .path{margin:0;color:#b9c0cc;font-family:ui-monospace,monospace;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.card{background:#2c3444;border-radius:6px;padding:6px 12px;min-width:110px}
.card b{display:block;font-size:18px}
.card span{color:#b9c0cc;font-size:12px}
.card.bad b{color:#ff8f85}
.notice{margin:10px 0 0;padding:8px 12px;border-radius:6px;background:#fff4d6;color:#5a4300;border:1px solid #e8c66a}
.notice ul{margin:4px 0 0;padding-left:20px}
h2{font-size:17px;margin:6px 0 10px}
.toolbar{display:flex;align-items:center;gap:14px;flex-wrap:wrap;margin-bottom:8px}
select{font-size:14px;padding:3px}
.legend{display:flex;flex-wrap:wrap;gap:4px;margin-bottom:10px}
.chip{display:inline-flex;align-items:center;gap:5px;border:1px solid #cfd4dc;background:#fff;border-radius:12px;
 padding:1px 8px;font-size:12px;cursor:pointer;color:inherit}
.chip.active{border-color:#1d2330;box-shadow:0 0 0 1px #1d2330}
.swatch{width:11px;height:11px;border-radius:2px;border:1px solid rgba(0,0,0,.35);display:inline-block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.pair{margin:0;background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.pair[hidden]{display:none}
.pair.failed{border-left:4px solid #d1493f}
.images{display:grid;grid-template-columns:repeat(3,1fr);gap:6px}
.images figure{margin:0;text-align:center;font-size:11px;color:#5b6474}
.images img{width:100%;aspect-ratio:1/1;object-fit:contain;background:#e9ebef;border-radius:4px;display:block}
.nomask{display:flex;align-items:center;justify-content:center;aspect-ratio:1/1;background:#e9ebef;border-radius:4px}
.pair .chips{margin:6px 0 2px;display:flex;flex-wrap:wrap;gap:4px}
.prompt{margin:2px 0;font-size:12px}
.prompt.neg{color:#5b6474}
.check{margin:4px 0 0;font-size:12px;font-weight:600}
.check.pass{color:#2e9e55}.check.fail{color:#d1493f}.check.none{color:#5b6474}
.key{font-family:ui-monospace,monospace;font-size:11px;color:#8a93a3;float:right}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-bottom:12px}
.column{display:flex;flex-direction:column;gap:12px;max-width:520px}
.charts figure{margin:0;background:#fff;border-radius:8px;padding:8px}
.charts img{display:block;max-width:100%}
table{border-collapse:collapse;background:#fff;margin:0 0 12px;font-size:13px}
.note{margin:0;background:#fff;border-radius:8px;padding:8px 10px}
th,td{padding:3px 10px;border-bottom:1px solid #e3e6eb;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#eef0f3}
details pre{background:#fff;padding:10px;border-radius:6px;overflow:auto;max-height:420px;font-size:12px}
"""

SCRIPT = """
(function () {
  var select = document.getElementById("class-filter");
  var pairs = Array.prototype.slice.call(document.querySelectorAll(".pair"));
  var counter = document.getElementById("shown-count");
  var chips = Array.prototype.slice.call(document.querySelectorAll(".chip"));
  function apply() {
    var wanted = select.value, shown = 0;
    pairs.forEach(function (pair) {
      var visible = !wanted || JSON.parse(pair.getAttribute("data-classes")).indexOf(wanted) >= 0;
      pair.hidden = !visible;
      if (visible) shown += 1;
    });
    chips.forEach(function (chip) {
      chip.classList.toggle("active", chip.getAttribute("data-class") === wanted);
    });
    counter.textContent = "showing " + shown + " of " + pairs.length + " pairs";
  }
  chips.forEach(function (chip) {
    chip.addEventListener("click", function () {
      var name = chip.getAttribute("data-class");
      select.value = select.value === name ? "" : name;
      apply();
    });
  });
  select.addEventListener("change", apply);
  apply();
})();
"""


def render_page(digest: RunDigest, shown: Sequence[ShownPair], unreadable: Sequence[UnreadablePair],
                charts: Charts, colours: dict) -> str:
    title = f"magicseg-engine report: {digest.run_dir}"
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        _header(digest, shown, unreadable),
        _pairs(digest, shown, colours),
        _statistics(digest, shown, charts, colours),
        _run(digest),
        f"<script>{SCRIPT}</script></body></html>\n",
    ]
    return "\n".join(parts)


def _header(digest: RunDigest, shown: Sequence[ShownPair], unreadable: Sequence[UnreadablePair]) -> str:
    checked = digest.checked
    cards = [
        (f"{digest.samples:,}", "samples read", False),
        (f"{len(digest.classes):,}", "classes", False),
        (f"{digest.shards_read:,} / {digest.shards_listed:,}", "shards read / finished", bool(digest.skipped_shards)),
        (f"{len(shown)}", "pairs shown", False),
    ]
    if checked:
        cards.append((f"{digest.flagged:,} / {checked:,}", "failed the counterfactual check (kept, flagged)",
                      digest.flagged > 0))
    cards.append((f"{digest.dropped:,}", "dropped by the check (not in shards)", False))
    throughput = _throughput(digest.run_meta)
    if throughput:
        cards.append(throughput)
    html = ['<header><h1>Dataset report</h1>', f'<p class="path">{escape(str(digest.run_dir))}</p>',
            '<div class="cards">']
    html += [f'<div class="card{" bad" if bad else ""}"><b>{escape(value)}</b><span>{escape(label)}</span></div>'
             for value, label, bad in cards]
    html.append("</div>")
    html.append(_skipped_notice(digest, unreadable))
    if digest.shards_in_progress:
        html.append(f'<p class="notice" id="in-progress">{_plural(digest.shards_in_progress, "shard")} '
                    "being written (or not yet listed in manifest.jsonl) are not included; "
                    "run the report again when the run has finished.</p>")
    html.append("</header>")
    return "\n".join(html)


def _throughput(run_meta: dict | None) -> tuple[str, str, bool] | None:
    sessions = [s for s in (run_meta or {}).get("sessions", []) if isinstance(s, dict)]
    generated = sum(s.get("generated", 0) for s in sessions if isinstance(s.get("generated"), (int, float)))
    seconds = sum(s.get("seconds", 0) for s in sessions if isinstance(s.get("seconds"), (int, float)))
    if not generated or not seconds:
        return None
    return f"{generated / seconds:,.2f}", f"pairs/s ({generated:,} pairs in {seconds:,.0f} s)", False


def _skipped_notice(digest: RunDigest, unreadable: Sequence[UnreadablePair]) -> str:
    if not (digest.skipped_shards or digest.skipped_manifest_lines or unreadable):
        return ""
    lines = []
    if digest.skipped_shards:
        lines.append(f"<b>{_plural(len(digest.skipped_shards), 'shard')} skipped "
                     f"({_plural(digest.skipped_samples, 'sample')} not counted)</b>: they could not be read; "
                     "the report is built from the rest.")
    if digest.skipped_manifest_lines:
        lines.append(f"<b>{_plural(len(digest.skipped_manifest_lines), 'manifest line')} skipped</b>.")
    if unreadable:
        lines.append(f"<b>{_plural(len(unreadable), 'chosen pair')} not shown</b>: their images could not be decoded.")
    reasons = ([f"{s.name}: {s.reason}" for s in digest.skipped_shards] + list(digest.skipped_manifest_lines)
               + [u.reason for u in unreadable])
    items = "".join(f"<li>{escape(r)}</li>" for r in reasons[:MAX_REASONS])
    if len(reasons) > MAX_REASONS:
        items += f"<li>and {len(reasons) - MAX_REASONS} more</li>"
    return f'<div class="notice" id="skipped">{" ".join(lines)}<ul>{items}</ul></div>'


def _pairs(digest: RunDigest, shown: Sequence[ShownPair], colours: dict) -> str:
    in_grid: dict[str, int] = {}
    for pair in shown:
        for name in dict.fromkeys(pair.ref.classes):
            in_grid[name] = in_grid.get(name, 0) + 1
    options = [f'<option value="">all classes ({len(shown)})</option>']
    options += [f'<option value="{escape(n)}">{escape(n)} ({in_grid[n]})</option>' for n in sorted(in_grid)]
    legend = "".join(_chip(n, colours) for n in sorted(in_grid))
    intro = (f"{len(shown)} of {digest.samples:,} pairs, chosen evenly across classes. Each shows the positive, "
             "its counterfactual negative (same noise, class removed) and the mask over the positive.")
    html = ['<section id="pairs"><h2>Pairs</h2>', f"<p>{escape(intro)}</p>",
            '<div class="toolbar"><label for="class-filter">Class</label>'
            f'<select id="class-filter">{"".join(options)}</select>'
            f'<span id="shown-count">showing {len(shown)} of {len(shown)} pairs</span></div>',
            f'<div class="legend">{legend}</div>', '<div class="grid">']
    html += [_pair(pair, colours) for pair in shown]
    html.append("</div></section>")
    return "\n".join(html)


def _pair(pair: ShownPair, colours: dict) -> str:
    ref, images = pair.ref, pair.images
    hover = f"positive: {ref.prompt}\nnegative: {ref.negative_prompt}"
    pictures = [
        f'<figure><img src="{_data_uri(images.positive, "image/jpeg")}" alt="positive {escape(ref.key)}">positive</figure>',
        f'<figure><img src="{_data_uri(images.negative, "image/jpeg")}" alt="negative {escape(ref.key)}">negative</figure>',
        (f'<figure><img src="{_data_uri(images.overlay, "image/jpeg")}" alt="mask {escape(ref.key)}">mask</figure>'
         if images.overlay else '<figure><div class="nomask">no mask</div>mask</figure>'),
    ]
    if ref.counterfactual_passed is None:
        check = '<p class="check none">no counterfactual check</p>'
    else:
        quality = (f", quality {ref.counterfactual_quality:.2f}" if ref.counterfactual_quality is not None else "")
        verdict = "passed" if ref.counterfactual_passed else "failed (flagged)"
        check = (f'<p class="check {"pass" if ref.counterfactual_passed else "fail"}">'
                 f"counterfactual check {verdict}{quality}</p>")
    failed = " failed" if ref.counterfactual_passed is False else ""
    return (f'<figure class="pair{failed}" data-classes="{escape(json.dumps(list(ref.classes)))}" '
            f'title="{escape(hover)}"><div class="images">{"".join(pictures)}</div>'
            f'<div class="chips">{"".join(_chip(n, colours) for n in dict.fromkeys(ref.classes))}'
            f'<span class="key">{escape(ref.key)}</span></div>'
            f'<p class="prompt"><b>+</b> {escape(ref.prompt)}</p>'
            f'<p class="prompt neg"><b>&minus;</b> {escape(ref.negative_prompt)}</p>{check}</figure>')


def _img(data: bytes | None, alt: str) -> str:
    if data is None:
        return ""
    return f'<figure><img src="{_data_uri(data, "image/png")}" alt="{escape(alt)}"></figure>'


def _statistics(digest: RunDigest, shown: Sequence[ShownPair], charts: Charts, colours: dict) -> str:
    html = ['<section id="statistics"><h2>Statistics</h2>',
            f"<p>Over all {digest.samples:,} samples read (from their JSON; images are read only for the pairs shown).</p>",
            '<div class="charts">', _img(charts.samples_per_class, "samples per class"),
            '<div class="column">', _img(charts.classes_per_image, "classes per image"),
            _img(charts.quality, "counterfactual quality"), _quality_line(digest), "</div></div>",
            '<div class="charts">', _img(charts.mask_area, "mask area per class"),
            _class_table(digest, shown, colours), "</div></section>"]
    return "\n".join(h for h in html if h)


def _quality_line(digest: RunDigest) -> str:
    if not digest.checked:
        return '<p class="note">These samples hold no counterfactual check.</p>'
    threshold = ""
    if digest.quality_threshold is not None:
        threshold = (f" A pair fails when its negative still shows more than "
                     f"{1 - digest.quality_threshold:.0%} of a class mask (quality below {digest.quality_threshold:.2f}).")
    passed = digest.checked - digest.flagged
    return (f'<p class="note" id="quality-summary">Counterfactual check: {passed:,} of {digest.checked:,} kept pairs passed, '
            f"{digest.flagged:,} failed and are flagged in their JSON; {digest.dropped:,} more were dropped "
            f"during generation (dropped.jsonl).{escape(threshold)}</p>")


def _class_table(digest: RunDigest, shown: Sequence[ShownPair], colours: dict) -> str:
    in_grid: dict[str, int] = {}
    for pair in shown:
        for name in dict.fromkeys(pair.ref.classes):
            in_grid[name] = in_grid.get(name, 0) + 1
    rows = []
    for name in digest.class_names():
        s = digest.classes[name]
        mean = f"{s.mean_area:.1%}" if s.mean_area is not None else "–"
        flagged = f"{s.flagged / s.samples:.0%}" if s.samples else "–"
        rows.append(f'<tr><td><span class="swatch" style="background:{_hex(colours[name])}"></span> {escape(name)}</td>'
                    f"<td>{s.samples:,}</td><td>{s.masks:,}</td><td>{s.no_mask:,}</td><td>{mean}</td>"
                    f"<td>{flagged}</td><td>{in_grid.get(name, 0)}</td></tr>")
    return ('<table id="class-table"><thead><tr><th>class</th><th>samples</th><th>masks</th><th>no mask</th>'
            "<th>mean mask area</th><th>flagged</th><th>shown</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


# Settings worth seeing at a glance, as (label, path in run.json's "config").
SETTINGS = (
    ("preset", ("preset",)), ("diffusion model", ("diffusion", "model")),
    ("architecture", ("diffusion", "architecture")), ("weights", ("diffusion", "weights")),
    ("steps", ("diffusion", "steps")), ("guidance", ("diffusion", "guidance")),
    ("scheduler", ("diffusion", "scheduler")), ("height", ("diffusion", "height")), ("width", ("diffusion", "width")),
    ("shared noise", ("diffusion", "independent_noise")), ("mask source", ("masks", "source")),
    ("SAM refinement", ("masks", "refine_with_sam")), ("SAM model", ("sam", "model_type")),
    ("mask threshold", ("masks", "threshold")),
    ("max counterfactual coverage", ("masks", "max_counterfactual_coverage")),
    ("drop failed pairs", ("masks", "drop_failed_pairs")), ("prompt source", ("prompts", "source")),
    ("classes per sample (max)", ("prompts", "max_classes_per_sample")), ("seed", ("seed",)),
)
SESSION_COLUMNS = ("device", "backend", "requested", "already_done", "generated", "written", "flagged", "dropped",
                   "seconds", "pairs_per_second", "batch_size", "final_batch_size")


def _lookup(config: dict, path: tuple[str, ...]):
    value = config
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _cell(value) -> str:
    if isinstance(value, float):
        return escape(f"{value:,.4g}")
    if isinstance(value, int) and not isinstance(value, bool):
        return escape(f"{value:,}")
    return escape("–" if value is None else str(value))


def _run(digest: RunDigest) -> str:
    html = ['<section id="run"><h2>Run</h2>']
    meta = digest.run_meta
    if meta is None:
        html.append(f"<p>{escape(digest.run_meta_problem or '')}</p>")
    else:
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        rows = []
        for label, path in SETTINGS:
            value = _lookup(config, path)
            if path == ("diffusion", "independent_noise") and isinstance(value, bool):
                value = not value
            if value is not None:
                rows.append(f"<tr><td>{escape(label)}</td><td>{_cell(value)}</td></tr>")
        if rows:
            html.append('<table id="settings"><tbody>' + "".join(rows) + "</tbody></table>")
        html.append(_sessions(meta))
        html.append(_balance(meta.get("balance")))
        versions = meta.get("versions")
        if isinstance(versions, dict):
            html.append("<p>Versions: " + escape(", ".join(f"{k} {v}" for k, v in sorted(versions.items()))) + "</p>")
        html.append("<details><summary>run.json</summary><pre>"
                    + escape(json.dumps(meta, indent=2, sort_keys=True)) + "</pre></details>")
    if digest.mask_sources:
        html.append("<p>Mask sources: " + escape(", ".join(f"{k} ({v:,})" for k, v in digest.mask_sources.most_common()))
                    + "</p>")
    html.append("</section>")
    return "\n".join(html)


def _balance(balance) -> str:
    """generate --balance: its rounds, and per class the target, what is usable and why pairs were lost."""
    if not isinstance(balance, dict) or not isinstance(balance.get("classes"), dict) or not balance["classes"]:
        return ""
    rounds = [r for r in balance.get("rounds", []) if isinstance(r, dict)]
    short = set(balance.get("short") or [])
    intro = (f"Balanced (--balance): {len(rounds)} top-up rounds, {sum(int(r.get('pairs', 0)) for r in rounds):,} "
             f"pairs beyond the {int(balance.get('requested_pairs', 0)):,} requested; "
             + (f"{len(short)} classes still short of {1 - float(balance.get('tolerance', 0)):.0%} of their target."
                if short else "every class reached its target within tolerance."))
    rows = []
    for name, c in sorted(balance["classes"].items(), key=lambda kv: (kv[0] not in short, kv[0])):
        if not isinstance(c, dict):
            continue
        reasons = c.get("drop_reasons") if isinstance(c.get("drop_reasons"), dict) else {}
        lost = ", ".join(f"{n} dropped: {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        for label, key in (("flagged", "flagged"), ("no mask", "no_mask")):
            if c.get(key):
                lost += (", " if lost else "") + f"{c[key]} {label}"
        rows.append(f'<tr class="{"short" if name in short else "level"}"><td>{escape(name)}</td>'
                    f"<td>{_cell(c.get('target'))}</td><td>{_cell(c.get('usable'))}</td>"
                    f"<td>{_cell(c.get('attempts'))}</td><td>{escape(lost or '–')}</td></tr>")
    return (f'<p id="balance-summary">{escape(intro)}</p><table id="balance"><thead><tr><th>class</th><th>target</th>'
            "<th>usable</th><th>pairs tried</th><th>lost</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _sessions(meta: dict) -> str:
    sessions = [s for s in meta.get("sessions", []) if isinstance(s, dict)]
    if not sessions:
        return "<p>No finished generation session is recorded yet (run.json gets one when a session ends).</p>"
    columns = [c for c in SESSION_COLUMNS if any(c in s for s in sessions)]
    columns += sorted({k for s in sessions for k in s if k not in columns and not isinstance(s[k], (dict, list))})
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in columns)
    body = "".join("<tr><td>" + str(i) + "</td>" + "".join(f"<td>{_cell(s.get(c))}</td>" for c in columns) + "</tr>"
                   for i, s in enumerate(sessions, 1))
    return (f'<h3>Generation sessions and timings</h3><table id="sessions"><thead><tr><th>session</th>{head}'
            f"</tr></thead><tbody>{body}</tbody></table>")
