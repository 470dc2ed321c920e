"""The evaluate stage's ``report.html``: each query, its results marked right or wrong, plots.

Numbers say how good a ranking is; the report shows *why*. It is one self-contained HTML file
(no external CSS, JavaScript or fonts) so it opens offline, from S3 or attached to a ticket.

- The header repeats the summary figures of ``metrics`` (Easy/Medium/Hard mAP for revisited
  sets, mAP and recall@k for scene folders) and the counts.
- A PNG plot (matplotlib, Agg, no pyplot state): per-query AP sorted, and at each rank the share
  of queries whose result there is right, junk or wrong.
- One row per query, worst AP first so that problems are on top. The query is its whole photo
  with the part outside its box dimmed and the box outlined: the crop is what the network saw,
  the context shows what was left out (a bad box is a common cause of a bad query).
- Each result has a border and a label from the ground truth: green for positives (``easy``,
  ``hard`` or ``right``), grey for images the protocol ignores (``junk``, the query itself:
  ``self``), red for the rest (``wrong``, ``distractor``); without ground truth, neutral.

Each distinct image is decoded and encoded once and defined once, as a CSS class whose
``background-image`` is a JPEG data URI, however many rows show it: a database image that
answers many queries costs its bytes once.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from model import storage
from model.datasets.sets import RetrievalSet
from model.evaluation import compute_map
from model.images import BadImage, open_image, read_size

__all__ = ["VERDICT_COLOURS", "query_aps", "write_report"]

logger = logging.getLogger(__name__)

# Border colours by verdict; the tests look for the first two in a screenshot.
VERDICT_COLOURS: dict[str, str] = {
    "right": "#2f9e44",
    "wrong": "#e03131",
    "junk": "#adb5bd",
    "neutral": "#ced4da",
}
_JPEG_QUALITY = 80
_BOX_COLOUR = (255, 212, 59)
_DIM = 0.45  # brightness kept outside a query's box


def write_report(
    path: str | Path,
    rset: RetrievalSet,
    ranks: np.ndarray,
    *,
    metrics: Mapping[str, Any],
    db_paths: Sequence[Path] | None = None,
    aps: np.ndarray | None = None,
    title: str = "",
    top_k: int = 10,
    thumb_size: int = 160,
    verified: Sequence[Mapping[int, int]] | None = None,
    match_figures: Mapping[int, bytes] | None = None,
    baseline: tuple[str, Mapping[str, Any]] | None = None,
) -> str:
    """Write ``report.html`` for one ranking of ``rset`` and its ``metrics``; returns the path.

    ``ranks`` is ``[n_q, n]`` (a row per query, best first, as ``pipeline.evaluate.score``
    returns it; its top ``top_k`` are shown); indices from ``len(rset.db_paths)`` on are
    distractors, whose files ``db_paths`` (the whole database) names. ``aps`` gives each
    query's AP when ``ranks`` is only a top-k (else it is computed from ``ranks``). ``path`` is
    a local path or an ``s3://`` URI, written whole or not at all. After spatial re-ranking,
    ``verified[j]`` gives query j's verified database indices and their inliers (shown on
    each result) and ``match_figures[j]`` a JPEG of the inliers to its best one; ``baseline``
    names and gives the figures before it, shown beside the others.
    """
    all_paths = [Path(p) for p in (rset.db_paths if db_paths is None else db_paths)]
    ranks = _check_inputs(rset, ranks, all_paths, top_k=top_k, thumb_size=thumb_size)
    n_gt = len(rset.db_paths)
    if aps is None:
        aps = query_aps(rset, ranks, n_db=len(all_paths))
    aps = np.asarray(aps, dtype=np.float64)
    if aps.shape != (len(rset.query_paths),):
        raise ValueError(f"aps must have one value per query, got shape {aps.shape}")
    _check_consistent(aps, metrics)
    shown = ranks[:, :top_k]
    judged = [
        [_judge(rset, j, idx, n_gt=n_gt, path=all_paths[idx]) for idx in row]
        for j, row in enumerate(shown.tolist())
    ]
    order = _worst_first(aps)

    thumbs = _Thumbnails(thumb_size, rset.exif_transpose)
    rows = [
        _query_row(
            rset,
            j,
            aps[j],
            shown=shown[j],
            judged=judged[j],
            all_paths=all_paths,
            thumbs=thumbs,
            inliers=verified[j] if verified is not None else {},
            figure=(match_figures or {}).get(j),
        )
        for j in order.tolist()
    ]
    page = _page(
        title=title or f"Retrieval report: {rset.name}",
        rset=rset,
        metrics=metrics,
        counts=_counts(rset, len(all_paths), aps),
        plot=_plot_png(aps, judged, rset.protocol) if rset.protocol != "none" else None,
        rows=rows,
        thumb_css=thumbs.css(),
        baseline=baseline,
    )
    out = storage.write_text(path, page)
    logger.info(
        "report %s: %d queries, %d distinct images, %.1f MB",
        out,
        len(rows),
        thumbs.count,
        len(page) / 2**20,
    )
    return out


def query_aps(rset: RetrievalSet, ranks: np.ndarray, n_db: int | None = None) -> np.ndarray:
    """Each query's AP (NaN where it has no positives or there is no ground truth).

    Revisited sets use the medium protocol (easy and hard positive, junk ignored), the one
    papers headline; scene folders use their ground truth as it is.
    """
    ranks = np.asarray(ranks)
    if rset.gnd is None or rset.protocol == "none":
        return np.full(len(ranks), np.nan)
    gnd = [{"ok": rset.positives(j), "junk": g["junk"]} for j, g in enumerate(rset.gnd)]
    _, aps, _, _ = compute_map(ranks.T, gnd, n_db=n_db)
    return aps


def _check_inputs(
    rset: RetrievalSet, ranks: np.ndarray, all_paths: list[Path], *, top_k: int, thumb_size: int
) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a 2-D integer array, got {ranks.dtype} {ranks.shape}")
    if ranks.shape[0] != len(rset.query_paths):
        raise ValueError(
            f"ranks has {ranks.shape[0]} rows for {len(rset.query_paths)} queries "
            "(pass a row per query, as score returns it)"
        )
    if len(all_paths) < len(rset.db_paths):
        raise ValueError(
            f"db_paths names {len(all_paths)} images, fewer than the set's {len(rset.db_paths)}"
        )
    if ranks.size and (ranks.min() < 0 or ranks.max() >= len(all_paths)):
        raise ValueError(
            f"ranks indexes [{ranks.min()}, {ranks.max()}] outside the {len(all_paths)} database "
            "images (pass db_paths with the distractors)"
        )
    if top_k < 1 or thumb_size < 16:
        raise ValueError(f"need top_k >= 1 and thumb_size >= 16, got {top_k}, {thumb_size}")
    return ranks.astype(np.int64, copy=False)


def _check_consistent(aps: np.ndarray, metrics: Mapping[str, Any]) -> None:
    """Warn when ``metrics`` were not computed from this ranking (the rows would mislead)."""
    expected = metrics.get("medium", metrics).get("map") if metrics else None
    if expected is None or not math.isfinite(float(expected)) or np.isnan(aps).all():
        return
    got = float(np.nanmean(aps))
    if not math.isclose(got, float(expected), abs_tol=1e-6):
        logger.warning("report: the ranking's mAP %.4f differs from metrics' %.4f", got, expected)


def _judge(rset: RetrievalSet, query: int, idx: int, *, n_gt: int, path: Path) -> tuple[str, str]:
    """(label, verdict) of database image ``idx`` (at ``path``) as an answer to ``query``.

    Scene folders query with their own photos; the query finding itself is neither right nor
    wrong (the protocol ignores it), so it is recognised by path and shown grey.
    """
    judged = rset.gnd is not None and rset.protocol != "none"
    if idx >= n_gt:
        return "distractor", "wrong" if judged else "neutral"
    if rset.queries_are_database and path == rset.query_paths[query]:
        return "self", "junk"
    if not judged:
        return "", "neutral"
    if rset.gnd is None:  # judged needs a ground truth; none means nothing to mark
        return "", "neutral"
    g = rset.gnd[query]
    if rset.protocol == "revisited":
        for key in ("easy", "hard"):
            if idx in g[key]:
                return key, "right"
    elif idx in g["ok"]:
        return "right", "right"
    if idx in g["junk"]:
        return "junk", "junk"
    return "wrong", "wrong"


def _worst_first(aps: np.ndarray) -> np.ndarray:
    """Query order by ascending AP; queries without an AP last, in their own order."""
    key = np.where(np.isnan(aps), np.inf, aps)
    return np.argsort(key, kind="stable")


@dataclass(frozen=True)
class _Thumb:
    css_class: str
    problem: str | None = None  # why a placeholder stands in for the image


class _Thumbnails:
    """Each distinct (image, box) decoded, thumbnailed and encoded once, named by a CSS class."""

    def __init__(self, size: int, exif_transpose: bool) -> None:
        self.size = size
        self.exif_transpose = exif_transpose
        self._seen: dict[tuple[Path, tuple[float, ...] | None], _Thumb] = {}
        self._rules: list[str] = []

    @property
    def count(self) -> int:
        return len(self._rules)

    def get(self, path: Path, box: Sequence[float] | None = None) -> _Thumb:
        key = (path, None if box is None else tuple(float(v) for v in box))
        if key not in self._seen:
            self._seen[key] = self._make(path, box)
        return self._seen[key]

    def _make(self, path: Path, box: Sequence[float] | None) -> _Thumb:
        image = _thumbnail(path, self.size, box, exif_transpose=self.exif_transpose)
        if isinstance(image, BadImage):
            logger.warning("report: %s (%s); showing a placeholder", path, image.reason)
            problem = "missing" if image.reason.startswith("missing") else "unreadable"
            return _Thumb("ph", problem)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        name = f"t{len(self._rules)}"
        self._rules.append(
            f".{name}{{width:{image.width}px;height:{image.height}px;"
            f"background-image:url(data:image/jpeg;base64,{data})}}"
        )
        return _Thumb(name)

    def css(self) -> str:
        placeholder = (
            f".ph{{width:{self.size}px;height:{self.size * 3 // 4}px;background:#dee2e6;"
            "color:#495057;display:flex;align-items:center;justify-content:center;"
            "font-size:12px;font-style:italic}"
        )
        return "\n".join([placeholder, *self._rules])


def _thumbnail(
    path: Path, size: int, box: Sequence[float] | None, *, exif_transpose: bool
) -> Image.Image | BadImage:
    """RGB thumbnail, longer side ``size``; with a box, the outside dimmed and the box drawn.

    The box is in the frame the network saw (rotated by EXIF only when ``exif_transpose``).
    """
    full = read_size(path, exif_transpose=exif_transpose)
    if isinstance(full, BadImage):
        return full
    width, height = full
    # JPEG: decode at a reduced scale, much faster.
    image = open_image(path, exif_transpose=exif_transpose, draft=(size, size))
    if isinstance(image, BadImage):
        return image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    if box is None:
        return image
    sx, sy = image.width / width, image.height / height
    x1, y1, x2, y2 = (float(v) for v in box)
    rect = (
        max(0, round(x1 * sx)),
        max(0, round(y1 * sy)),
        min(image.width - 1, round(x2 * sx)),
        min(image.height - 1, round(y2 * sy)),
    )
    rect = (rect[0], rect[1], max(rect[0] + 1, rect[2]), max(rect[1] + 1, rect[3]))
    dimmed = Image.eval(image, lambda v: int(v * _DIM))
    dimmed.paste(image.crop(rect), rect[:2])
    ImageDraw.Draw(dimmed).rectangle(rect, outline=_BOX_COLOUR, width=2)
    return dimmed


def _query_row(
    rset: RetrievalSet,
    j: int,
    ap: float,
    *,
    shown: np.ndarray,
    judged: list[tuple[str, str]],
    all_paths: list[Path],
    thumbs: _Thumbnails,
    inliers: Mapping[int, int],
    figure: bytes | None,
) -> str:
    qpath = rset.query_paths[j]
    box = rset.query_boxes[j] if j < len(rset.query_boxes) else None
    qthumb = thumbs.get(qpath, box)
    name = html.escape(qpath.name)
    if np.isnan(ap):
        ap_text = "no positives" if rset.protocol != "none" else ""
        hue = None
    else:
        ap_text = f"AP {100 * ap:.1f}"
        hue = round(120 * ap)
    badge = (
        f'<span class="ap" style="--hue:{hue}">{ap_text}</span>'
        if hue is not None
        else f'<span class="ap na">{ap_text}</span>'
    )
    hits = []
    for rank, (idx, (label, verdict)) in enumerate(zip(shown.tolist(), judged, strict=True), 1):
        path = all_paths[idx]
        thumb = thumbs.get(path)
        count = inliers.get(idx)
        attribute, mark = "", ""
        if count is not None:
            attribute = f' data-inliers="{count}"'
            mark = f'<span class="inliers" title="verified: {count} inliers">✓{count}</span>'
        hits.append(
            f'<li class="hit v-{verdict}" data-rank="{rank}" data-index="{idx}" '
            f'data-label="{html.escape(label)}" title="{html.escape(path.name)}"{attribute}>'
            f"{_thumb_html(thumb)}"
            f'<span class="rank">{rank}</span>{mark}'
            f'<span class="tag">{html.escape(label) or "&nbsp;"}</span></li>'
        )
    ap_attr = "nan" if np.isnan(ap) else f"{ap:.6f}"
    box_note = " (box outlined)" if box is not None else ""
    return (
        f'<article class="query" data-query="{j}" data-ap="{ap_attr}">'
        f'<figure class="q" title="{name}{box_note}">{_thumb_html(qthumb)}'
        f'<figcaption><span class="qname">{name}</span>{badge}</figcaption></figure>'
        f'<div class="side"><ol class="hits">{"".join(hits)}</ol>'
        f"{_match_figure(figure, inliers)}</div></article>"
    )


def _match_figure(figure: bytes | None, inliers: Mapping[int, int]) -> str:
    if figure is None:
        return ""
    data = base64.b64encode(figure).decode("ascii")
    best = max(inliers.values(), default=0)
    return (
        f'<figure class="matches"><img src="data:image/jpeg;base64,{data}" '
        f'alt="inliers between the query and its best verified result">'
        f"<figcaption>the query and its best verified result: {best} inliers</figcaption>"
        "</figure>"
    )


def _thumb_html(thumb: _Thumb) -> str:
    text = html.escape(thumb.problem or "")
    return f'<div class="thumb {thumb.css_class}">{text}</div>'


def _counts(rset: RetrievalSet, n_total: int, aps: np.ndarray) -> list[tuple[str, str]]:
    counts = [
        ("queries", str(len(rset.query_paths))),
        ("database images", str(len(rset.db_paths))),
    ]
    if n_total > len(rset.db_paths):
        counts.append(("distractors", str(n_total - len(rset.db_paths))))
    if rset.protocol != "none":
        counts.append(("queries without positives", str(int(np.isnan(aps).sum()))))
    return counts


def _pct(value: Any) -> str:
    """A fraction as a percentage with one decimal, as the papers print it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.1f}"


def _by_k(values: Mapping[Any, float]) -> list[tuple[int, float]]:
    """``{k: v}`` sorted by k; keys may be strings after a JSON round trip."""
    return sorted((int(k), v) for k, v in values.items())


def _summary_html(metrics: Mapping[str, Any], protocol: str) -> str:
    """Headline figures and a table of all of them; every cell names its metric."""

    def cell(key: str, value: Any) -> str:
        return f'<td data-metric="{html.escape(key)}">{_pct(value)}</td>'

    if "medium" in metrics:
        parts = ("easy", "medium", "hard")
        headline = " · ".join(
            f'{p[0].upper()} <b data-metric="{p}.map">{_pct(metrics[p]["map"])}</b>' for p in parts
        )
        ks = [k for k, _ in _by_k(metrics["medium"].get("mp@k", {}))]
        head = "".join(f"<th>mP@{k}</th>" for k in ks)
        body = "".join(
            f"<tr><th>{p.capitalize()}</th>{cell(f'{p}.map', metrics[p]['map'])}"
            + "".join(cell(f"{p}.mp@{k}", v) for k, v in _by_k(metrics[p].get("mp@k", {})))
            + "</tr>"
            for p in parts
        )
        table = f"<table><tr><th></th><th>mAP</th>{head}</tr>{body}</table>"
        return f'<p class="headline">mAP {headline}</p>{table}'
    if "map" in metrics:
        columns = [("map", "mAP", metrics["map"])]
        for name, label in (("mp@k", "mP@"), ("recall@k", "R@")):
            columns += [
                (f"{name[:-2]}@{k}", f"{label}{k}", v) for k, v in _by_k(metrics.get(name, {}))
            ]
        headline = f'mAP <b data-metric="map">{_pct(metrics["map"])}</b>'
        recalls = _by_k(metrics.get("recall@k", {}))
        if recalls:
            headline += " · " + " · ".join(
                f'R@{k} <b data-metric="recall@{k}">{_pct(v)}</b>' for k, v in recalls
            )
        head = "".join(f"<th>{label}</th>" for _, label, _ in columns)
        row = "".join(cell(key, v) for key, _, v in columns)
        return f'<p class="headline">{headline}</p><table><tr>{head}</tr><tr>{row}</tr></table>'
    note = "no ground truth: results are shown unmarked" if protocol == "none" else "no metrics"
    return f'<p class="headline muted">{note}</p>'


def _baseline_html(baseline: tuple[str, Mapping[str, Any]] | None) -> str:
    """The figures before a step the report's ranking took (spatial re-ranking), in a line."""
    if baseline is None:
        return ""
    label, metrics = baseline
    if "medium" in metrics:
        parts = ("easy", "medium", "hard")
        figures = " · ".join(
            f'{p[0].upper()} <b data-baseline="{p}.map">{_pct(metrics[p]["map"])}</b>'
            for p in parts
        )
    elif "map" in metrics:
        figures = f'<b data-baseline="map">{_pct(metrics["map"])}</b>'
    else:
        return ""
    return f'<p class="meta baseline">{html.escape(label)}: mAP {figures}</p>'


def _plot_png(aps: np.ndarray, judged: list[list[tuple[str, str]]], protocol: str) -> str | None:
    """Per-query AP sorted, and the verdicts at each rank, as a PNG data URI."""
    valid = np.sort(aps[~np.isnan(aps)])
    if valid.size == 0:
        return None
    fig = Figure(figsize=(11, 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ap_ax, rank_ax = fig.subplots(1, 2, width_ratios=(3, 2))

    x = np.arange(1, valid.size + 1)
    colours = [colorsys.hls_to_rgb(v / 3, 0.42, 0.6) for v in valid]  # red to green, as the badges
    ap_ax.bar(x, 100 * valid, width=0.85, color=colours)
    ap_ax.axhline(100 * valid.mean(), color="#343a40", lw=1, ls="--")
    ap_ax.text(0.01, 0.97, f"mAP {100 * valid.mean():.1f}", transform=ap_ax.transAxes, va="top")
    which = "medium protocol" if protocol == "revisited" else protocol
    ap_ax.set(
        title=f"AP per query, sorted ({which})",
        xlabel="query",
        ylabel="AP (%)",
        ylim=(0, 100),
        xlim=(0.4, valid.size + 0.6),
    )
    if valid.size > 30:
        ap_ax.set_xticks([])

    # Share of judged queries whose result at each rank is right, ignored or wrong.
    judged_rows = [row for row, ap in zip(judged, aps, strict=True) if not np.isnan(ap)]
    depth = len(judged_rows[0])
    ranks = np.arange(1, depth + 1)
    bottom = np.zeros(depth)
    for verdict in ("right", "junk", "wrong"):
        share = np.array(
            [np.mean([row[r][1] == verdict for row in judged_rows]) for r in range(depth)]
        )
        rank_ax.bar(ranks, 100 * share, bottom=100 * bottom, color=VERDICT_COLOURS[verdict])
        bottom += share
    rank_ax.set(title="results at each rank", xlabel="rank", ylabel="% of queries", ylim=(0, 100))
    rank_ax.set_xticks(ranks)
    ignored = "self / junk" if protocol == "scenes" else "junk"
    rank_ax.legend(
        ["right", ignored, "wrong"],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        frameon=False,
    )
    for ax in (ap_ax, rank_ax):
        ax.spines[["top", "right"]].set_visible(False)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _legend_html(protocol: str) -> str:
    if protocol == "revisited":
        items = [("right", "easy / hard: positive"), ("junk", "junk: ignored by the protocol")]
        items += [("wrong", "wrong"), ("wrong", "distractor")]
    elif protocol == "scenes":
        items = [("right", "right: same scene"), ("junk", "self: the query itself")]
        items += [("wrong", "wrong"), ("wrong", "distractor")]
    elif protocol == "original":
        items = [("right", "ok: positive"), ("junk", "junk: ignored by the protocol")]
        items += [("wrong", "wrong"), ("wrong", "distractor")]
    else:
        return '<p class="legend muted">No ground truth: results are not marked.</p>'
    chips = "".join(
        f'<span class="chip"><i class="v-{v}"></i>{html.escape(text)}</span>' for v, text in items
    )
    return f'<p class="legend">{chips}<span class="muted">· worst queries first</span></p>'


def _page(
    *,
    title: str,
    rset: RetrievalSet,
    metrics: Mapping[str, Any],
    counts: list[tuple[str, str]],
    plot: str | None,
    rows: list[str],
    thumb_css: str,
    baseline: tuple[str, Mapping[str, Any]] | None = None,
) -> str:
    verdict_css = "\n".join(f".v-{v}{{--c:{c}}}" for v, c in VERDICT_COLOURS.items())
    count_html = " · ".join(f"<b>{html.escape(v)}</b> {html.escape(k)}" for k, v in counts)
    rows_html = "\n".join(rows)
    plot_html = (
        f'<section class="plot"><img alt="AP per query and results at each rank" src="{plot}">'
        "</section>"
        if plot
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
{_BASE_CSS}
{verdict_css}
{thumb_css}
</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<p class="meta">data set <b class="dataset">{html.escape(rset.name)}</b>
 · protocol <b class="protocol">{html.escape(rset.protocol)}</b> · {count_html}</p>
<div class="summary">{_summary_html(metrics, rset.protocol)}</div>{_baseline_html(baseline)}
</header>
{plot_html}
{_legend_html(rset.protocol)}
<main>
{rows_html}
</main>
</body>
</html>
"""


_BASE_CSS = """
:root { color-scheme: light; --ink: #212529; --muted: #6c757d; --line: #e9ecef; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: #f4f5f7; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header, .plot, .query { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  box-shadow: 0 1px 2px rgba(0, 0, 0, .04); }
header { padding: 18px 24px; margin-bottom: 16px; }
h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
.meta, .muted { color: var(--muted); }
.meta b { color: var(--ink); font-weight: 600; }
.headline { font-size: 18px; margin: 12px 0 8px; }
.headline b { font-size: 22px; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 12px; text-align: right; border-bottom: 1px solid var(--line); }
th { font-weight: 600; color: var(--muted); }
tr > th:first-child { text-align: left; }
.plot { padding: 8px; margin-bottom: 12px; text-align: center; }
.plot img { max-width: 100%; height: auto; }
.legend { margin: 8px 4px 16px; display: flex; flex-wrap: wrap; gap: 16px; align-items: center; }
.chip { display: inline-flex; align-items: center; gap: 6px; }
.chip i { width: 14px; height: 14px; border-radius: 3px; background: var(--c); }
.query { display: flex; gap: 16px; align-items: flex-start; padding: 12px 16px;
  margin-bottom: 12px; }
.q { margin: 0; flex: none; }
.q figcaption { display: flex; justify-content: space-between; align-items: center; gap: 8px;
  margin-top: 6px; }
.qname { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  max-width: 10em; }
.ap { padding: 1px 8px; border-radius: 10px; color: #fff; font-weight: 600; white-space: nowrap;
  background: hsl(var(--hue) 60% 40%); font-variant-numeric: tabular-nums; }
.ap.na { background: var(--muted); }
.inliers { position: absolute; top: 4px; right: 4px; padding: 0 5px; border-radius: 8px;
  background: rgba(47, 158, 68, .9); color: #fff; font-size: 12px; }
.side { flex: 1; min-width: 0; }
.matches { margin: 10px 0 0 16px; }
.matches img { max-width: 100%; height: auto; border-radius: 6px; }
.matches figcaption { color: var(--muted); font-size: 12px; }
.hits { display: flex; flex-wrap: wrap; gap: 8px; list-style: none; margin: 0;
  padding: 0 0 0 16px; align-items: flex-start; border-left: 1px solid var(--line); }
.hit { position: relative; flex: none; border: 4px solid var(--c); border-radius: 6px;
  background: var(--c); overflow: hidden; }
.thumb { display: block; background-size: cover; background-repeat: no-repeat; }
.rank { position: absolute; top: 4px; left: 4px; min-width: 20px; padding: 0 5px;
  border-radius: 4px; background: rgba(0, 0, 0, .65); color: #fff; font-size: 11px;
  text-align: center; font-variant-numeric: tabular-nums; }
.tag { display: block; padding: 1px 0 0; text-align: center; font-size: 12px; color: #fff;
  font-weight: 600; letter-spacing: .02em; }
.v-junk .tag, .v-neutral .tag { color: var(--ink); }
"""
