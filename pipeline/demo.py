"""``make demo``: the product on the built-in collection, photos to a served, self-trained index.

    python -m pipeline.demo [--collection sfm] [--output outputs/demo | s3://bucket/demo]

It generates the built-in landmark collection (by default the preset that Structure-from-Motion
reconstructs), runs ``pipeline.run`` on its photos (ingest, extract, group, sfm, pairs, train,
extract with the fine-tuned network, index, the run report) with ``configs/demo.yaml``'s small
settings, serves the index, sends the collection's query photos — photos the index never saw —
to the search service over HTTP and prints what came back. Then it says where the report and
the search page are, and serves until interrupted (``--no-stay`` stops there). Run again, it
finds every stage complete and is serving in a minute.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.client import SearchClient
from model import storage, tables
from model.cli import run_cli
from model.datasets.landmarks import CONFS, generate, load_cameras
from model.images import image_id
from pipeline.run import RunConf
from pipeline.run import run as run_chain

logger = logging.getLogger("pipeline.demo")

RERANK = 100
"""Candidates each query re-ranks by spatial verification in the demo's second round."""

__all__ = ["DemoConf", "collection_manifest", "main", "report_location"]

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoConf:
    """Settings of the demo; every field is a command-line flag."""

    collection: str = "sfm"
    """Preset of the built-in collection (``model.datasets.landmarks.CONFS``)."""
    output: str = "outputs/demo"
    """Where the collection and the run folder (``OUTPUT/run``) go."""
    config: str = str(CONFIG)
    """The run's config: each stage's flags, and the service's (its ``serve`` section must
    say ``detach: true`` so the demo can query it)."""
    k: int = 5
    """Results shown per query."""
    stay: bool = True
    """Keep serving until interrupted (Ctrl-C); ``--no-stay`` stops after the queries."""

    def __post_init__(self) -> None:
        if self.collection not in CONFS:
            raise ValueError(f"--collection {self.collection!r}: one of {', '.join(CONFS)}")


@dataclass(frozen=True)
class QueryOutcome:
    """One query photo's answer: its landmark and the landmarks of its top results."""

    query: str
    landmark: str
    found: list[tuple[str, str, float]]
    """``(image_id, landmark, score)`` of each result, best first."""

    @property
    def correct(self) -> int:
        return sum(landmark == self.landmark for _, landmark, _ in self.found)


def main(conf: DemoConf) -> dict[str, object]:
    """Run the demo; returns where things are and how the queries went. With ``--output
    s3://…`` the collection is written there too, so every node of a cluster reads it."""
    started = time.monotonic()
    out = conf.output if storage.is_remote(conf.output) else str(Path(conf.output).resolve())
    dataset = str(generate(CONFS[conf.collection], storage.join(out, "collection")))
    source, queries, landmarks = collection_manifest(dataset, storage.join(out, "photos.csv"))
    run = storage.join(out, "run")
    url = run_chain(
        RunConf(source=source, output=run, config=conf.config, serve=True, local_features=True)
    )
    if not url.startswith("http"):
        raise ValueError(f"--config {conf.config}: its serve section must say detach: true")
    client = SearchClient(url)
    outcomes = [_ask(client, query, landmarks, k=conf.k) for query in queries]
    verified = [_ask(client, query, landmarks, k=conf.k, rerank=RERANK) for query in queries]
    summary = json.loads(storage.read_text(storage.join(run, tables.RUN_SUMMARY)))
    report = report_location(summary.get("report"))
    correct = sum(o.correct for o in outcomes)
    correct_verified = sum(o.correct for o in verified)
    print(_table(outcomes, conf.k))
    print(
        f"\n{correct} of {len(outcomes) * conf.k} results show the query's landmark "
        f"(queries the index never saw; {time.monotonic() - started:.0f} s in all)\n"
        f"  re-ranked by spatial verification (rerank={RERANK}): {correct_verified} of "
        f"{len(verified) * conf.k}\n"
        f"  run report:  {report}\n"
        f"  search page: {url}/"
    )
    if conf.stay:
        print("serving; Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return {
        "search": url,
        "report": summary.get("report"),
        "correct": correct,
        "correct_reranked": correct_verified,
        "shown": len(outcomes) * conf.k,
    }


def report_location(report: str | None) -> str:
    """Where a person opens the run report: a file URL, an object store's URI, or why not."""
    if not report:
        return "not written (see the log)"
    return report if storage.is_remote(report) else Path(report).as_uri()


def collection_manifest(
    dataset: str, path: str
) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """The ingest manifest (written to ``path``) of the collection's database photos
    (landmark views, with their landmark as scene, and distractors), its query photos with
    their landmark, and every database photo's landmark by image_id."""
    queries: list[tuple[str, str]] = []
    landmarks: dict[str, str] = {}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["uri", "scene"])
    for cam in load_cameras(dataset).to_pylist():
        photo = storage.join(dataset, "jpg", f"{cam['name']}.jpg")
        scene = f"lm{cam['landmark']}" if cam["landmark"] >= 0 else ""
        if cam["role"] == "query":
            queries.append((photo, scene))
            continue
        writer.writerow([photo, scene])
        landmarks[image_id(storage.read_bytes(photo))] = scene
    return storage.write_text(path, rows.getvalue()), queries, landmarks


def _ask(
    client: SearchClient,
    query: tuple[str, str],
    landmarks: dict[str, str],
    *,
    k: int,
    rerank: int = 0,
) -> QueryOutcome:
    photo, landmark = query
    answer = client.search(storage.read_bytes(photo), k=k, rerank=rerank)
    return QueryOutcome(
        query=posixpath.basename(photo),
        landmark=landmark,
        found=[(r.image_id, landmarks.get(r.image_id, "?"), r.score) for r in answer.results],
    )


def _table(outcomes: list[QueryOutcome], k: int) -> str:
    lines = [f"{'query':24s} {'landmark':8s} top {k} (landmark score), ✓ the query's"]
    for o in outcomes:
        shown = "  ".join(
            f"{lm or 'none'} {score:.2f}{' ✓' if lm == o.landmark else ''}"
            for _, lm, score in o.found
        )
        lines.append(f"{o.query:24s} {o.landmark:8s} {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, DemoConf)
