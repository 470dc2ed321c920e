"""The pairs stage on a synthetic sfm output (3 models of 10 photos, overlaps known), and the
readers of its output: training's set and the whitening pairs."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from model import tables
from model.training_set import read_training_set
from model.whitening_fit import pool_clusters, read_whitening_pairs
from pipeline.pairs import PairsConf, mine_positives, run
from tests.helpers import synthetic_sfm


@pytest.fixture()
def sfm_out(tmp_path) -> str:
    synthetic_sfm(str(tmp_path / "sfm"))
    return str(tmp_path / "sfm")


def test_run_returns_the_folder_every_reader_takes(sfm_out, tmp_path):
    """The chain composes from return values: the folder, or any of its files."""
    out = run(PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs")))
    assert out == tables.resolve(str(tmp_path / "pairs"))
    data = read_training_set(out)
    assert len(data.image_ids) == 30 and len(data.queries) == 30
    pairs = read_whitening_pairs(out)
    assert len(pairs) == 30 and all(q.split("-")[0] == p.split("-")[0] for q, p in pairs)
    for name in tables.PAIRS_OUTPUT.tables:
        file = f"{out}/{tables.TABLES[name].file}"
        assert len(read_training_set(file).queries) == 30
        assert read_whitening_pairs(file) == pairs
    clusters = pool_clusters(out, data.image_ids)
    assert sorted(set(clusters.tolist())) == [0, 1, 2]


def test_positives_overlap_enough_and_come_best_first(sfm_out, tmp_path):
    out = run(PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs"), min_overlap=0.5))
    rows = tables.PAIRS.read(out).to_pylist()
    for row in rows:
        assert row["query_id"] not in row["positives"] and min(row["overlaps"]) >= 0.5
        assert row["overlaps"] == sorted(row["overlaps"], reverse=True)
        assert {p.split("-")[0] for p in row["positives"]} == {row["query_id"].split("-")[0]}
    details = tables.PAIRS_OUTPUT.manifest(out).details
    assert details["queries"] == len(rows) == 30 and details["clusters"] == 3


def test_positives_of_a_scale_change_are_left_out():
    rows = [
        {"image_id": "a", "model_id": "m", "point3d_ids": [1, 2, 3], "scale": 1.0},
        {"image_id": "b", "model_id": "m", "point3d_ids": [1, 2, 3], "scale": 1.2},
        {"image_id": "c", "model_id": "m", "point3d_ids": [1, 2, 3], "scale": 3.0},
    ]
    found = mine_positives(rows, min_overlap=0.2, max_scale_change=1.5, max_positives=10)
    assert [p for p, _ in found["a"]] == ["b"] and "c" not in found


def test_a_rerun_skips_and_another_min_overlap_stops_naming_it(sfm_out, tmp_path):
    conf = PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs"))
    out = run(conf)
    first = tables.PAIRS_OUTPUT.manifest(out)
    assert run(conf) == out and tables.PAIRS_OUTPUT.manifest(out) == first  # skipped
    with pytest.raises(tables.OutputChanged, match=r"min_overlap.*--overwrite"):
        run(replace(conf, min_overlap=0.9))
    run(replace(conf, min_overlap=0.9, overwrite=True))
    replaced = tables.PAIRS_OUTPUT.manifest(out)
    assert replaced.settings["min_overlap"] == 0.9 and replaced.details["queries"] < 30


def test_new_3d_models_upstream_mine_again(sfm_out, tmp_path):
    conf = PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs"))
    run(conf)
    synthetic_sfm(sfm_out, clusters=4)  # the sfm output, rebuilt with another model
    out = run(conf)
    assert tables.PAIRS_OUTPUT.manifest(out).details["queries"] == 40


def test_the_cirtorch_export_pairs_each_query_in_its_cluster(sfm_out, tmp_path):
    pkl = tmp_path / "train.pkl"
    run(PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs"), export_pkl=str(pkl)))
    layout = pickle.loads(pkl.read_bytes())["train"]
    assert set(layout) == {"cids", "cluster", "qidxs", "pidxs"} and len(layout["qidxs"]) == 30
    for q, p in zip(layout["qidxs"], layout["pidxs"], strict=True):
        assert layout["cluster"][q] == layout["cluster"][p] and q != p


def test_the_cirtorch_export_asked_on_a_skipped_rerun_is_written(sfm_out, tmp_path):
    out = run(PairsConf(sfm=sfm_out, output=str(tmp_path / "pairs")))
    first = tables.PAIRS_OUTPUT.manifest(out)
    pkl = tmp_path / "later.pkl"
    run(PairsConf(sfm=sfm_out, output=out, export_pkl=str(pkl)))
    assert tables.PAIRS_OUTPUT.manifest(out) == first  # skipped: not mined into the output again
    assert len(pickle.loads(pkl.read_bytes())["train"]["qidxs"]) == 30


def test_an_unfinished_sfm_output_is_named(tmp_path):
    (tmp_path / "sfm").mkdir()
    with pytest.raises(ValueError, match=r"--sfm: .*not a complete sfm output"):
        run(PairsConf(sfm=str(tmp_path / "sfm"), output=str(tmp_path / "pairs")))
