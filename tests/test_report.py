"""report.html from a real ranking of the built-in collection: rows, marks, header, a browser."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets.folders import load_folder
from model.datasets.revisited import load_revisited
from model.datasets.sets import RetrievalSet
from model.evaluation import compute_map
from model.extraction import ExtractOptions, ImageFiles, extract_descriptors
from model.networks import NetworkMeta, build_network
from model.report import VERDICT_COLOURS, write_report
from model.scoring import score

MAX_SIZE = 128  # small photos keep the descriptors quick; the ranking is still a real one
TOP_K = 10
VERDICT_OF = {
    "easy": "right",
    "hard": "right",
    "right": "right",
    "junk": "junk",
    "self": "junk",
    "wrong": "wrong",
    "distractor": "wrong",
}


@dataclass
class Ranked:
    """The collection, real descriptors of it and the ranking ``score`` makes of them."""

    rset: RetrievalSet
    db: np.ndarray
    queries: np.ndarray
    whole_queries: np.ndarray  # the query photos uncropped: distractors that look relevant


@pytest.fixture(scope="module")
def ranked(tiny_collection: Path) -> Ranked:
    rset = load_revisited(tiny_collection)
    net = build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").eval()
    options = ExtractOptions(device="cpu", progress=False)
    db = extract_descriptors(
        net, ImageFiles(rset.db_paths, MAX_SIZE, exif_transpose=False), options
    )
    queries = extract_descriptors(
        net, ImageFiles(rset.query_paths, MAX_SIZE, rset.query_boxes, exif_transpose=False), options
    )
    whole = extract_descriptors(
        net, ImageFiles(rset.query_paths, MAX_SIZE, exif_transpose=False), options
    )
    return Ranked(rset, db, queries, whole)


@dataclass
class Row:
    query: int
    ap: float
    query_thumb: str = ""
    hits: list[dict[str, str]] = field(default_factory=list)


class ReportParser(HTMLParser):
    """What a reader sees in the report: rows of marked results, header figures, styles."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] = []
        self.metrics: dict[str, str] = {}
        self.style = ""
        self.images: list[str] = []
        self.texts: dict[str, str] = {}  # class of header elements -> text
        self._metric: str | None = None
        self._thumb: dict[str, str] | None = None
        self._in_style = False
        self._in_query = False
        self._class: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "style":
            self._in_style = True
        elif tag == "article":
            self.rows.append(Row(int(a["data-query"]), float(a["data-ap"])))
        elif tag == "figure" and "q" in a.get("class", "").split():
            self._in_query = True
        elif tag == "li" and "hit" in a.get("class", "").split():
            verdict = next(c[2:] for c in a["class"].split() if c.startswith("v-"))
            self.rows[-1].hits.append({**a, "verdict": verdict, "thumb": "", "rank_text": ""})
        elif tag == "div" and "thumb" in a.get("class", "").split():
            self._thumb = {"class": a["class"], "text": ""}
        elif tag == "img":
            self.images.append(a["src"])
        if "data-metric" in a:
            self._metric = a["data-metric"]
            self.metrics[self._metric] = ""
        if tag == "span" and a.get("class") == "rank":
            self._class = "rank"
        elif tag == "b" and a.get("class") in ("dataset", "protocol"):
            self._class = a["class"]
            self.texts[self._class] = ""
        elif tag == "h1":
            self._class = "h1"
            self.texts["h1"] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False
        elif tag == "figure":
            self._in_query = False
        elif tag == "div" and self._thumb is not None:
            text = f"{self._thumb['class']}|{self._thumb['text']}"
            if self._in_query:
                self.rows[-1].query_thumb = text
            else:
                self.rows[-1].hits[-1]["thumb"] = text
            self._thumb = None
        elif tag in ("td", "b"):
            self._metric = None
        if tag in ("span", "b", "h1"):
            self._class = None

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
        if self._metric is not None:
            self.metrics[self._metric] += data
        if self._thumb is not None:
            self._thumb["text"] += data
        if self._class == "rank":
            self.rows[-1].hits[-1]["rank_text"] += data
        elif self._class is not None:
            self.texts[self._class] += data


def parse(path: str | Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    return parser


def expected_label(g: dict[str, np.ndarray], idx: int, n_gt: int) -> str:
    """The mark a revisited-set result must carry, from the ground truth alone."""
    if idx >= n_gt:
        return "distractor"
    for key in ("easy", "hard", "junk"):
        if idx in g[key]:
            return key
    return "wrong"


def medium_aps(rset: RetrievalSet, ranks: np.ndarray) -> np.ndarray:
    gnd = [{"ok": np.r_[g["easy"], g["hard"]], "junk": g["junk"]} for g in rset.gnd]
    return compute_map(ranks.T, gnd)[1]


def with_junk(rset: RetrievalSet, ranks: np.ndarray) -> RetrievalSet:
    """The set with each query's third result declared junk, so every mark is on show."""
    gnd = []
    for g, row in zip(rset.gnd, ranks, strict=True):
        junk = row[2]
        gnd.append(
            {
                "easy": g["easy"][g["easy"] != junk],
                "hard": g["hard"][g["hard"] != junk],
                "junk": np.union1d(g["junk"], [junk]),
            }
        )
    return dataclasses.replace(rset, gnd=gnd)


def test_rows_marks_order_and_header_follow_the_ground_truth(ranked: Ranked, tmp_path) -> None:
    _, first, _ = score(ranked.db, ranked.queries, ranked.rset)
    rset = with_junk(ranked.rset, first)
    metrics, ranks, _ = score(ranked.db, ranked.queries, rset)
    out = Path(
        write_report(tmp_path / "r" / "report.html", rset, ranks, metrics=metrics, top_k=TOP_K)
    )
    assert out == tmp_path / "r" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    report = parse(out)

    assert sorted(row.query for row in report.rows) == list(range(len(rset.query_paths)))
    aps = medium_aps(rset, ranks)
    assert np.nanmean(aps) == pytest.approx(metrics["medium"]["map"])
    shown_aps = [row.ap for row in report.rows]
    assert shown_aps == sorted(shown_aps), "worst queries must come first"
    n_gt = len(rset.db_paths)
    labels_seen = set()
    for row in report.rows:
        assert row.ap == pytest.approx(aps[row.query], abs=1e-6)
        assert [int(h["data-index"]) for h in row.hits] == ranks[row.query, :TOP_K].tolist()
        assert [h["rank_text"] for h in row.hits] == [str(r) for r in range(1, TOP_K + 1)]
        for hit in row.hits:
            idx = int(hit["data-index"])
            label = expected_label(rset.gnd[row.query], idx, n_gt)
            assert hit["data-label"] == label
            assert hit["verdict"] == VERDICT_OF[label]
            assert hit["title"] == rset.db_paths[idx].name
            labels_seen.add(label)
        assert row.query_thumb.startswith("thumb t")
    assert {"easy", "junk", "wrong"} <= labels_seen, labels_seen

    for verdict, colour in VERDICT_COLOURS.items():
        assert f".v-{verdict}{{--c:{colour}}}" in report.style
    # Each distinct image is encoded once: a rule per shown database image and per query.
    shown = {int(h["data-index"]) for row in report.rows for h in row.hits}
    assert len(re.findall(r"^\.t\d+\{", report.style, re.M)) == len(shown) + len(report.rows)

    for part in ("easy", "medium", "hard"):
        figure = f"{100 * metrics[part]['map']:.1f}"
        assert report.metrics[f"{part}.map"] == figure
        for k, value in metrics[part]["mp@k"].items():
            assert report.metrics[f"{part}.mp@{k}"] == f"{100 * value:.1f}"
    assert report.texts["dataset"] == rset.name and report.texts["protocol"] == "revisited"
    assert report.texts["h1"] == f"Retrieval report: {rset.name}"
    (plot,) = report.images
    png = Image.open(io.BytesIO(base64.b64decode(plot.split(",", 1)[1])))
    assert png.format == "PNG" and png.width > 500

    # metrics.json brings the k of mP@k back as strings; the header reads the same.
    again = Path(
        write_report(tmp_path / "json.html", rset, ranks, metrics=json.loads(json.dumps(metrics)))
    )
    assert parse(again).metrics == report.metrics


def test_distractors_are_marked_as_such(ranked: Ranked, tmp_path) -> None:
    rset = ranked.rset
    # The query photos, uncropped, are distractors that rank high for their own queries.
    distractor_paths = list(rset.query_paths)
    metrics, ranks, _ = score(
        np.concatenate([ranked.db, ranked.whole_queries]), ranked.queries, rset
    )
    with pytest.raises(ValueError, match="distractors"):
        write_report(tmp_path / "bad.html", rset, ranks, metrics=metrics)
    out = Path(
        write_report(
            tmp_path / "report.html",
            rset,
            ranks,
            metrics=metrics,
            db_paths=[*rset.db_paths, *distractor_paths],
            top_k=5,
        )
    )
    report = parse(out)
    n_gt = len(rset.db_paths)
    hits = [h for row in report.rows for h in row.hits]
    assert len(hits) == 5 * len(rset.query_paths)
    distractors = [h for h in hits if int(h["data-index"]) >= n_gt]
    assert distractors, "the uncropped query photos should rank among the top 5"
    for hit in distractors:
        assert hit["data-label"] == "distractor" and hit["verdict"] == "wrong"
        assert hit["title"] == distractor_paths[int(hit["data-index"]) - n_gt].name
    assert all(h["data-label"] != "distractor" for h in hits if int(h["data-index"]) < n_gt)


def test_missing_and_unreadable_images_become_placeholders(ranked: Ranked, tmp_path) -> None:
    metrics, ranks, _ = score(ranked.db, ranked.queries, ranked.rset)
    top = ranks[:, 0]
    missing, broken = int(top[0]), int(next(i for i in ranks[0] if i != top[0]))
    odd_name = tmp_path / 'gone <b>&"x".jpg'
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    db_paths = list(ranked.rset.db_paths)
    db_paths[missing], db_paths[broken] = odd_name, tmp_path / "broken.jpg"
    query_paths = [tmp_path / "no-query.jpg", *ranked.rset.query_paths[1:]]
    rset = dataclasses.replace(ranked.rset, db_paths=db_paths, query_paths=query_paths)

    out = Path(write_report(tmp_path / "report.html", rset, ranks, metrics=metrics))
    text = out.read_text(encoding="utf-8")
    assert "<b>&" not in text and "gone &lt;b&gt;&amp;&quot;x&quot;.jpg" in text
    hits = {int(h["data-index"]): h for row in parse(out).rows for h in row.hits}
    assert hits[missing]["thumb"] == "thumb ph|missing"
    assert hits[missing]["title"] == odd_name.name
    assert hits[broken]["thumb"] == "thumb ph|unreadable"
    query_row = next(row for row in parse(out).rows if row.query == 0)
    assert query_row.query_thumb == "thumb ph|missing"


def test_scene_folders_mark_self_and_flat_folders_mark_nothing(ranked: Ranked, tmp_path) -> None:
    rset = ranked.rset
    root = tmp_path / "scenes"
    for label in range(3):
        members = np.flatnonzero(rset.db_labels == label)[:4]
        (root / f"scene{label}").mkdir(parents=True)
        for i in members:
            shutil.copy(rset.db_paths[i], root / f"scene{label}" / rset.db_paths[i].name)
    scenes = load_folder(root)
    by_name = {p.name: i for i, p in enumerate(rset.db_paths)}
    vectors = ranked.db[[by_name[p.name] for p in scenes.db_paths]]
    metrics, ranks, _ = score(vectors, vectors, scenes)
    out = Path(write_report(tmp_path / "scenes.html", scenes, ranks, metrics=metrics, top_k=6))
    report = parse(out)
    for row in report.rows:
        for hit in row.hits:
            idx = int(hit["data-index"])
            same = scenes.db_labels[idx] == scenes.db_labels[row.query]
            expected = "self" if idx == row.query else "right" if same else "wrong"
            assert (hit["data-label"], hit["verdict"]) == (expected, VERDICT_OF[expected])
    assert report.metrics["map"] == f"{100 * metrics['map']:.1f}"
    for k, value in metrics["recall@k"].items():
        assert report.metrics[f"recall@{k}"] == f"{100 * value:.1f}"
    assert [row.ap for row in report.rows] == sorted(row.ap for row in report.rows)

    flat = load_folder(root / "scene0")
    flat_vectors = ranked.db[[by_name[p.name] for p in flat.db_paths]]
    metrics, ranks, _ = score(flat_vectors, flat_vectors, flat)
    report = parse(write_report(tmp_path / "flat.html", flat, ranks, metrics=metrics, top_k=3))
    assert [row.query for row in report.rows] == list(range(len(flat.query_paths)))
    assert not report.images and not report.metrics
    verdicts = {(h["data-label"], h["verdict"]) for row in report.rows for h in row.hits}
    assert verdicts <= {("self", "junk"), ("", "neutral")}


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed; .ci/run installs it"
)
def test_headless_chromium_renders_the_marks(ranked: Ranked, tmp_path) -> None:
    metrics, ranks, _ = score(ranked.db, ranked.queries, ranked.rset)
    out = Path(write_report(tmp_path / "report.html", ranked.rset, ranks, metrics=metrics))
    shot = tmp_path / "shot.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1400,1000",
        out.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 1000, "the page looks blank"
    for verdict in ("right", "wrong"):
        colour = np.array(_rgb(VERDICT_COLOURS[verdict]))
        near = (np.abs(pixels - colour).max(axis=1) <= 8).sum()
        assert near > 500, f"too few {verdict} border pixels ({near}) in the screenshot"


def _rgb(hex_colour: str) -> tuple[int, ...]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
