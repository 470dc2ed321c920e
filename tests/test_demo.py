"""``make demo`` on a laptop: its collection, manifest and report named by local paths. The demo
itself runs end to end as a job on the multi-node cluster (``tests/test_multinode.py``), into S3."""

from __future__ import annotations

import csv
from pathlib import Path

from model.datasets.landmarks import load_cameras
from pipeline.demo import collection_manifest, report_location


def test_the_manifest_lists_database_photos_and_keeps_the_queries_apart(
    tiny_collection: Path, tmp_path: Path
) -> None:
    cameras = load_cameras(tiny_collection).to_pylist()
    source, queries, landmarks = collection_manifest(
        str(tiny_collection), str(tmp_path / "photos.csv")
    )
    with open(source, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert source == str(tmp_path / "photos.csv") and header == ["uri", "scene"]
    database = [c for c in cameras if c["role"] != "query"]
    assert len(rows) == len(database) == len(landmarks)
    assert all(Path(uri).is_file() for uri, _ in rows)  # local paths, as ingest reads them
    assert {scene for _, scene in rows} == {"", "lm0", "lm1", "lm2"}  # distractors: no scene
    assert sorted(Path(photo).stem for photo, _ in queries) == sorted(
        c["name"] for c in cameras if c["role"] == "query"
    )
    assert all(landmark.startswith("lm") for _, landmark in queries)


def test_the_report_is_named_where_a_person_opens_it(tmp_path: Path) -> None:
    assert report_location(str(tmp_path / "report.html")) == (tmp_path / "report.html").as_uri()
    assert report_location("s3://bucket/run/report.html") == "s3://bucket/run/report.html"
    assert report_location(None) == "not written (see the log)"
