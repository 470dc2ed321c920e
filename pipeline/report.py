"""The report stage: one page of what a run did, to look at rather than read.

    python -m pipeline.report --run RUN

It reads the stage outputs under a run folder (``pipeline.run``'s layout) and writes
``RUN/report.html`` with its pictures in ``RUN/report/``: the photos ingested and those that
failed (with reasons), the groups, each group's SfM registration and a picture of the largest
3D models seen from above (camera centres and points), example positive pairs from the models
and the hard negatives the off-the-shelf network finds for them (what the first training epoch
mines), the training curves and the held-out validation before and after, the index, and example
queries with their top results. A section whose stage has not run (``--until``) says so. The
page is static HTML (no script), readable from disk or from ``s3://`` through any browser.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cluster import index_store
from cluster.catalog import ImageCatalog
from model import storage, tables
from model.cli import run_cli
from model.descriptors import read_descriptors
from model.settings import raise_problems

logger = logging.getLogger("pipeline.report")

__all__ = ["PICTURES", "REPORT_FILE", "ReportConf", "run", "stage_counts"]

REPORT_FILE = "report.html"
PICTURES = "report"
"""The folder beside the page that holds its pictures."""


@dataclass(frozen=True)
class ReportConf:
    """Settings of the report; every field is a command-line flag."""

    run: str
    """The run folder (local or ``s3://``) that ``pipeline.run`` wrote."""
    examples: int = 6
    """Positive pairs, hard negatives and queries shown."""
    top_k: int = 5
    """Results shown per example query."""
    models: int = 12
    """3D models pictured from above, largest first."""
    failures: int = 20
    """Failed photos listed by name (the rest counted)."""
    thumb_side: int = 160

    def __post_init__(self) -> None:
        problems = [
            f"--{name.replace('_', '-')} must be at least {low}, not {getattr(self, name)}"
            for name, low in (("examples", 1), ("top_k", 1), ("models", 0), ("thumb_side", 32))
            if getattr(self, name) < low
        ]
        raise_problems(problems)


def run(conf: ReportConf) -> str:
    """Write the run's report; returns the page's URI."""
    folder = conf.run.rstrip("/")
    if not storage.exists(folder):
        raise FileNotFoundError(f"--run: no run folder at {folder}")
    page = _Page(conf, folder)
    sections = [
        page.stages(),
        page.photos(),
        page.groups(),
        page.sfm(),
        page.pairs(),
        page.training(),
        page.index(),
        page.queries(),
    ]
    uri = storage.join(folder, REPORT_FILE)
    storage.write_text(uri, _document(page.title(), sections))
    logger.info("report: %s (%d pictures)", uri, page.pictures)
    return uri


class _Page:
    """The run's outputs, read as each section needs them, and the pictures written so far."""

    def __init__(self, conf: ReportConf, folder: str) -> None:
        self.conf = conf
        self.folder = folder
        self.pictures = 0
        self._catalog: ImageCatalog | None = None
        self._thumbs: dict[str, str] = {}
        self._summary = _read_json(storage.join(folder, tables.RUN_SUMMARY)) or {}
        self._labels: dict[str, str] | None = None

    # -- the run's outputs --------------------------------------------------------------

    def uri(self, stage: str) -> str:
        return storage.join(self.folder, tables.RUN_LAYOUT[stage])

    def complete(self, stage: str) -> bool:
        return tables.OUTPUTS[stage.removesuffix("-trained")].is_complete(self.uri(stage))

    def catalog(self) -> ImageCatalog:
        if self._catalog is None:
            self._catalog = ImageCatalog([self.uri("ingest")])
        return self._catalog

    def labels(self) -> dict[str, str]:
        """Each photo's scene as the source named it, else its SfM cluster (what the run
        treats as the same place); empty when neither is known."""
        if self._labels is None:
            self._labels = {}
            if self.complete("ingest"):
                table = tables.IMAGES.read(self.uri("ingest"), ["image_id", "scene"])
                for image_id, scene in zip(*_columns(table, "image_id", "scene"), strict=True):
                    if image_id is not None and scene:
                        self._labels[image_id] = str(scene)
            if not self._labels and self.complete("sfm"):
                table = tables.SFM_IMAGES.read(self.uri("sfm"), ["image_id", "cluster_id"])
                for image_id, cluster in zip(
                    *_columns(table, "image_id", "cluster_id"), strict=True
                ):
                    self._labels[image_id] = f"cluster {cluster}"
        return self._labels

    # -- pictures -----------------------------------------------------------------------

    def picture(self, name: str, data: bytes) -> str:
        """Write a picture beside the page; returns its relative address."""
        storage.write_bytes(storage.join(self.folder, PICTURES, name), data)
        self.pictures += 1
        return f"{PICTURES}/{name}"

    def thumb(self, image_id: str, css: str = "", caption: str = "") -> str:
        """A photo's thumbnail as a figure (a grey box naming the problem when unreadable)."""
        if image_id not in self._thumbs:
            name = "t-" + hashlib.sha1(image_id.encode()).hexdigest()[:16] + ".jpg"
            try:
                data = self.catalog().thumbnail(image_id, self.conf.thumb_side)
                self._thumbs[image_id] = self.picture(name, data)
            except (KeyError, OSError, ValueError) as err:
                logger.warning("report: no thumbnail of %s (%s)", image_id, err)
                self._thumbs[image_id] = ""
        src = self._thumbs[image_id]
        title = html.escape(image_id)
        shown = (
            f'<img src="{src}" alt="{title}" title="{title}">'
            if src
            else f'<div class="missing" title="{title}">unreadable</div>'
        )
        under = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure class="{css}">{shown}{under}</figure>'

    # -- sections -----------------------------------------------------------------------

    def title(self) -> str:
        return f"cirray run: {self._summary.get('source', self.folder)}"

    def stages(self) -> str:
        done = self._summary.get("stages", {})
        if not done:
            return _section("Stages", "<p>No run summary (run.json) in this folder.</p>")
        rows = []
        for stage, what in done.items():
            if "skipped" in what:
                rows.append([stage, "", f"skipped: {what['skipped']}"])
                continue
            counts = stage_counts(stage, what)
            made = " (done before)" if what.get("reused") else ""
            rows.append([stage, f"{what.get('seconds', 0):.1f} s{made}", counts])
        search = self._summary.get("search")
        after = (
            f'<p>Search page: <a href="{html.escape(search)}">{html.escape(search)}</a></p>'
            if search
            else ""
        )
        return _section("Stages", _table(["stage", "time", "what it did"], rows) + after)

    def photos(self) -> str:
        if not self.complete("ingest"):
            return _not_run("Photos", "ingest")
        table = tables.IMAGES.read(self.uri("ingest"), ["image_id", "uri", "error"])
        image_ids, uris, errors = _columns(table, "image_id", "uri", "error")
        failed = [(u, e) for u, e in zip(uris, errors, strict=True) if e]
        good = [i for i in image_ids if i is not None]
        body = f"<p>{len(good)} photos ingested, {len(failed)} failed.</p>"
        if failed:
            shown = failed[: self.conf.failures]
            body += _table(["photo", "why it failed"], [[u, e] for u, e in shown])
            if len(failed) > len(shown):
                body += (
                    f"<p>… and {len(failed) - len(shown)} more (images.parquet, column error).</p>"
                )
        sample = good[:: max(1, len(good) // (2 * self.conf.examples))][: 2 * self.conf.examples]
        body += '<div class="row">' + "".join(self.thumb(i) for i in sample) + "</div>"
        return _section("Photos", body)

    def groups(self) -> str:
        if not self.complete("group"):
            return _not_run("Groups", "group")
        table = tables.GROUPS.read(self.uri("group"), ["image_id", "group_id"])
        ids = np.asarray(table["group_id"].to_numpy(zero_copy_only=False), dtype=np.int64)
        _, sizes = np.unique(ids[ids >= 0], return_counts=True)  # < 0: in no group
        sizes = np.sort(sizes)[::-1]
        alone = int((sizes == 1).sum()) + int((ids < 0).sum())
        several = sizes[sizes > 1]
        body = (
            f"<p>{len(several)} groups of photos that look alike (sizes "
            f"{', '.join(str(int(s)) for s in several)}); photos alone: {alone}. Each group "
            "is one Structure-from-Motion problem.</p>"
        )
        return _section("Groups", body)

    def sfm(self) -> str:
        if not self.complete("sfm"):
            return _not_run("3D models", "sfm")
        groups = tables.SFM_GROUPS.read(self.uri("sfm")).to_pylist()
        models = tables.SFM_MODELS.read(self.uri("sfm")).to_pylist()
        images = tables.SFM_IMAGES.read(
            self.uri("sfm"),
            ["image_id", "group_id", "model_id", "registered", "centre_x", "centre_y", "centre_z"],
        )
        registered = _registered_by_group(images)
        rows = [
            [
                g["group_id"],
                g["photos"],
                f"{registered.get(g['group_id'], 0)}/{g['photos']}",
                g["status"],
                g["reason"] or "",
                f"{g['seconds']:.0f} s",
            ]
            for g in sorted(groups, key=lambda g: -g["photos"])
        ]
        body = _table(["group", "photos", "registered", "status", "reason", "time"], rows)
        pictured = sorted(models, key=lambda m: -m["images"])[: self.conf.models]
        figures = []
        for model in pictured:
            centres = _centres(images, model["model_id"])
            points = _points(storage.join(self.uri("sfm"), "models", model["model_id"]))
            src = self.picture(f"model-{model['model_id']}.png", _top_view(centres, points))
            caption = (
                f"model {model['model_id']}: {model['images']} photos, {model['points']} points, "
                f"reprojection error {model['mean_reprojection_error']:.2f} px"
            )
            figures.append(
                f'<figure class="plot"><img src="{src}" alt="model {model["model_id"]}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        body += (
            "<p>Seen from above: cameras (red) and 3D points (grey), in the plane that best "
            "fits the camera centres.</p>" + '<div class="row">' + "".join(figures) + "</div>"
        )
        return _section("3D models", body)

    def pairs(self) -> str:
        if not self.complete("pairs"):
            return _not_run("Training pairs", "pairs")
        pairs = tables.PAIRS.read(self.uri("pairs"), ["query_id", "positives", "cluster_id"])
        if pairs.num_rows == 0:
            return _section(
                "Training pairs",
                "<p>The 3D models gave no training pairs (no model with enough photos); the "
                "index holds the off-the-shelf network's descriptors.</p>",
            )
        chosen = _one_per_cluster(pairs.to_pylist(), self.conf.examples)
        negatives = self._hard_negatives([p["query_id"] for p in chosen], chosen)
        rows = []
        for pair in chosen:
            query = pair["query_id"]
            cells = [
                self.thumb(query, "query", "query"),
                self.thumb(pair["positives"][0], "good", "positive"),
            ]
            cells += [
                self.thumb(n, "bad", f"negative {s:.2f}") for n, s in negatives.get(query, [])
            ]
            rows.append('<div class="row">' + "".join(cells) + "</div>")
        body = (
            f"<p>{pairs.num_rows} training queries, each with positives that share 3D points "
            "with it (green). Red: the nearest photos of other 3D models by the off-the-shelf "
            "descriptors — the hard negatives the first epoch mines — with their "
            "similarity.</p>" + "".join(rows)
        )
        return _section("Training pairs", body)

    def _hard_negatives(
        self, queries: Sequence[str], chosen: Sequence[dict[str, Any]]
    ) -> dict[str, list[tuple[str, float]]]:
        if not self.complete("extract"):
            return {}
        pool = tables.POOL.read(self.uri("pairs"), ["image_id", "cluster_id"])
        desc = read_descriptors(self.uri("extract"))
        at = {image_id: i for i, image_id in enumerate(desc.image_ids)}
        pool_ids, pool_clusters = _columns(pool, "image_id", "cluster_id")
        keep = [i for i, image_id in enumerate(pool_ids) if image_id in at]
        if not keep:
            return {}
        vectors = desc.vectors[[at[pool_ids[i]] for i in keep]]
        clusters = np.asarray([pool_clusters[i] for i in keep])
        found: dict[str, list[tuple[str, float]]] = {}
        for query, pair in zip(queries, chosen, strict=True):
            if query not in at:
                continue
            scores = vectors @ desc.vectors[at[query]]
            scores[clusters == pair["cluster_id"]] = -np.inf
            top = np.argsort(-scores)[:3]
            found[query] = [
                (pool_ids[keep[i]], float(scores[i])) for i in top if np.isfinite(scores[i])
            ]
        return found

    def training(self) -> str:
        skipped = self._summary.get("stages", {}).get("train", {}).get("skipped")
        if skipped:
            return _section("Training", f"<p>Skipped: {html.escape(skipped)}.</p>")
        if not self.complete("train"):
            return _not_run("Training", "train")
        metrics = _read_json(storage.join(self.uri("train"), "metrics.json")) or {}
        epochs = metrics.get("epochs", [])
        score = metrics.get("score", "")
        body = ""
        if epochs:
            rows = [
                [
                    h["epoch"],
                    _number(h.get("loss")),
                    _number(h.get(score)),
                    _number(h.get(f"{score}_lw")),
                    "kept" if h.get("best") else "",
                ]
                for h in epochs
            ]
            before, best = epochs[0], next((h for h in epochs if h.get("best")), epochs[-1])
            body += (
                f"<p>Held-out validation ({html.escape(score)}): before training "
                f"{_number(before.get(score))}, after {_number(best.get(score))} "
                f"(epoch {best['epoch']} kept; {html.escape(str(metrics.get('selected_by', '')))}"
                ").</p>"
            )
            body += _table(["epoch", "loss", score, f"{score} + Lw", ""], rows)
        curves = storage.join(self.uri("train"), "curves.png")
        if storage.exists(curves):
            src = self.picture("curves.png", storage.read_bytes(curves))
            body += f'<figure class="wide"><img src="{src}" alt="training curves"></figure>'
        return _section("Training", body or "<p>No metrics.json in the training output.</p>")

    def index(self) -> str:
        index = self.uri("index")
        if index_store.latest_version(index) is None:
            return _not_run("Index", "index")
        m = index_store.read_manifest(index)
        network = (m.get("network") or {}) if isinstance(m.get("network"), dict) else {}
        described = m.get("descriptors", {}).get("uri", "")
        rows = [
            ["version", m["version"]],
            ["vectors", m["count"]],
            ["dimensions", m["dim"]],
            ["FAISS index", m["factory"]],
            ["shards", len(m["shards"])],
            ["stored", f"{m['stored_bytes'] / 2**20:.1f} MiB"],
            ["descriptors", described],
            ["network", _network(network)],
        ]
        return _section("Index", _table(["", ""], rows))

    def queries(self) -> str:
        index = self.uri("index")
        if index_store.latest_version(index) is None:
            return _not_run("Example queries", "index")
        m = index_store.read_manifest(index)
        desc = read_descriptors(m["descriptors"]["uri"])
        labels = self.labels()
        picks = _spread(desc.image_ids, labels, self.conf.examples)
        at = {image_id: i for i, image_id in enumerate(desc.image_ids)}
        rows_at = [at[i] for i in picks]
        k = min(self.conf.top_k + 1, m["count"])
        found = index_store.search(index, desc.vectors[rows_at], k)
        rows = []
        for query, ids, scores in zip(picks, found.image_ids, found.scores, strict=True):
            cells = [self.thumb(query, "query", html.escape(labels.get(query, "query")))]
            shown = [(i, s) for i, s in zip(ids, scores, strict=True) if i and i != query]
            for image_id, s in shown[: self.conf.top_k]:
                css = ""
                if image_id in labels:  # unlabelled photos are left unjudged
                    css = "good" if labels[image_id] == labels.get(query) else "bad"
                cells.append(self.thumb(image_id, css, f"{float(s):.3f}"))
            rows.append('<div class="row">' + "".join(cells) + "</div>")
        legend = (
            "green: the same place (scene, or 3D cluster); red: another; unframed: a photo "
            "of no known place"
            if labels
            else "no scene names to judge by"
        )
        body = (
            f"<p>Photos of the collection searched against the index (themselves left out), "
            f"with cosine similarity; {legend}.</p>" + "".join(rows)
        )
        return _section("Example queries", body)


SHOWN = {
    "ingest": ("ingested", "duplicates", "failed"),
    "extract": ("count", "described", "failed"),
    "group": ("groups", "candidates"),
    "sfm": ("registered", "photos", "models", "groups", "failed"),
    "pairs": ("queries", "clusters"),
    "train": ("best_epoch", "val_map"),
    "extract-trained": ("count", "described", "failed"),
    "index": ("count", "added", "factory"),
}
"""What the summary's line of each stage shows of its counts (failures with their reasons)."""


def stage_counts(stage: str, done: dict[str, Any]) -> str:
    """A stage's line of counts as a run summary gives them (failures with their reasons)."""
    shown = []
    for name in SHOWN.get(stage, ()):
        value = done.get(name)
        if value is None or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
            shown.append(f"{name} ({value})")
        else:
            shown.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(shown)


# -- reading ---------------------------------------------------------------------------------


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _columns(table: Any, *names: str) -> list[list[Any]]:
    return [table[name].to_pylist() for name in names]


def _registered_by_group(images: Any) -> dict[int, int]:
    done = images.filter(pc.field("registered"))
    groups, counts = np.unique(done["group_id"].to_numpy(zero_copy_only=False), return_counts=True)
    return {int(g): int(c) for g, c in zip(groups, counts, strict=True)}


def _centres(images: Any, model_id: str) -> np.ndarray:
    rows = images.filter(pc.equal(images["model_id"], model_id))
    return np.stack([rows[f"centre_{a}"].to_numpy() for a in "xyz"], axis=1)


def _points(model: str) -> np.ndarray:
    """A COLMAP model's 3D point positions, read from its ``points3D.bin``."""
    uri = storage.join(model, "points3D.bin")
    if not storage.exists(uri):
        return np.zeros((0, 3))
    data = storage.read_bytes(uri)
    (count,) = struct.unpack_from("<Q", data, 0)
    xyz = np.empty((count, 3))
    at = 8
    for i in range(count):
        xyz[i] = struct.unpack_from("<3d", data, at + 8)
        (track,) = struct.unpack_from("<Q", data, at + 43)
        at += 51 + 8 * track  # id, xyz, rgb, error, track length, track of (image, point2D)
    return xyz


# -- choosing examples -----------------------------------------------------------------------


def _one_per_cluster(pairs: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` queries, each cluster's first before any cluster's second."""
    by_cluster: dict[Any, list[dict[str, Any]]] = {}
    for pair in pairs:
        if pair["positives"]:
            by_cluster.setdefault(pair["cluster_id"], []).append(pair)
    return _round_robin(list(by_cluster.values()), n)


def _spread(image_ids: Sequence[str], labels: dict[str, str], n: int) -> list[str]:
    """Up to ``n`` photos, one per scene before a second of any (evenly through the
    collection when there are no scenes)."""
    if not labels:
        step = max(1, len(image_ids) // n)
        return list(image_ids[::step][:n])
    by_label: dict[str, list[str]] = {}
    for image_id in image_ids:
        if image_id in labels:  # photos of no known place show nothing to judge
            by_label.setdefault(labels[image_id], []).append(image_id)
    groups = [v[len(v) // 2 :] + v[: len(v) // 2] for _, v in sorted(by_label.items())]
    return _round_robin(groups, n)


def _round_robin(groups: list[list[Any]], n: int) -> list[Any]:
    chosen: list[Any] = []
    depth = 0
    while len(chosen) < n and any(depth < len(g) for g in groups):
        chosen += [g[depth] for g in groups if depth < len(g)][: n - len(chosen)]
        depth += 1
    return chosen


# -- pictures --------------------------------------------------------------------------------


def _top_view(centres: np.ndarray, points: np.ndarray) -> bytes:
    """A PNG of a model from above: everything projected onto the plane that best fits the
    camera centres (cameras stand about level round a scene), points clipped to their bulk."""
    axes = _plane_axes(centres if len(centres) >= 3 else points)
    origin = centres.mean(axis=0) if len(centres) else np.zeros(3)
    fig = Figure(figsize=(3.2, 3.2), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if len(points):
        shown = points[:: max(1, len(points) // 20000)]
        low, high = np.percentile(shown, [2, 98], axis=0)
        shown = shown[np.all((shown >= low) & (shown <= high), axis=1)]
        flat = (shown - origin) @ axes.T
        ax.scatter(flat[:, 0], flat[:, 1], s=0.5, c="#868e96", linewidths=0)
    if len(centres):
        flat = (centres - origin) @ axes.T
        ax.scatter(flat[:, 0], flat[:, 1], s=10, c="#e03131", linewidths=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plane_axes(xyz: np.ndarray) -> np.ndarray:
    """The two directions of largest spread (rows), or x and y with too few positions."""
    if len(xyz) < 3:
        return np.eye(3)[:2]
    _, _, vt = np.linalg.svd(xyz - xyz.mean(axis=0), full_matrices=False)
    return vt[:2]


# -- HTML ------------------------------------------------------------------------------------


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _not_run(title: str, stage: str) -> str:
    return _section(title, f"<p>Not run: the {stage} stage has no complete output here.</p>")


def _table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _network(network: dict[str, Any]) -> str:
    """A network as the index names it: where its weights are, and what it is."""
    meta = network.get("meta") or {}
    what = " + ".join(str(meta[k]) for k in ("backbone", "head") if meta.get(k))
    return f"{network.get('checkpoint') or network.get('weights') or '?'} ({what or 'unknown'})"


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#212529}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top}
.row{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
figure{margin:0;text-align:center;font-size:11px;color:#495057}
figure img{display:block;max-width:100%;border:3px solid transparent}
figure.query img{border-color:#1c7ed6}figure.good img{border-color:#2f9e44}
figure.bad img{border-color:#e03131}figure.plot{width:260px}figure.wide img{max-width:900px}
.missing{width:120px;height:90px;background:#dee2e6;display:flex;align-items:center;
justify-content:center;font-style:italic}
"""


def _document(title: str, sections: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


if __name__ == "__main__":
    run_cli(run, ReportConf)
