"""The index stage on a local Ray: sharded search equals one exact index; versions, resume, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import ray

from cluster import index_store
from model import storage, tables
from model.descriptors import read_descriptors, write_descriptors
from model.tables import LOCAL_FEATURES_OUTPUT
from pipeline import index as stage
from pipeline.features import FeaturesConf
from pipeline.features import run as features
from pipeline.index import IndexConf, choose_factory, run
from tests.conftest import REAL_MAX_SIZE
from tests.helpers import run_stage, write_images

REPO = Path(__file__).resolve().parent.parent
NETWORK = {"weights": "test", "meta": {"backbone": "none"}}


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(start: int, stop: int) -> list[str]:
    """image_ids whose sorted order is their numeric order, so global id == row number."""
    return [f"img-{i:06d}" for i in range(start, stop)]


def _canonical(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by score descending, then id ascending (what the merge promises)."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One unsharded IndexFlatIP over all vectors, every vector ranked, cut after the sort."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    scores, ids = _canonical(*flat.search(queries, len(vectors)))
    return scores[:, :k], ids[:, :k]


@pytest.fixture(scope="module")
def tied() -> np.ndarray:
    """1,200 unit vectors in 24-d, a quarter of them exact copies of others (tied scores)."""
    rng = np.random.default_rng(7)
    x = _unit(rng, 1200, 24)
    copies = rng.choice(1200, 600, replace=False)
    x[copies[:300]] = x[copies[300:]]
    return x


# --- The auto rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "dim", "budget", "key"),
    [
        (373, 1280, "16G", "Flat"),  # the shared photos
        (100_000, 1280, "16G", "Flat"),  # at flat_max, 512 MB
        (100_001, 1280, "16G", "IVF1024,Flat"),  # past flat_max: 4·√n ≈ 1265 → 1024 lists
        (200_000, 768, "16G", "IVF2048,Flat"),
        (1_000_000, 128, "16G", "IVF4096,Flat"),  # the benchmark
        (1_000_000, 1280, "16G", "IVF4096,Flat"),  # 5.1 GB still fits
        (100_000, 1280, "256M", "OPQ256_1024,IVF1024,PQ256"),  # Flat (512 MB) does not fit
        (1_000_000, 128, "256M", "IVF4096,PQ64"),  # 2 dims per sub-quantizer: no OPQ
        (1_000_000, 128, "40M", "OPQ24_96,IVF4096,PQ24"),  # 128 % 24 != 0: OPQ projects
        (10_000_000, 1280, "16G", "OPQ256_1024,IVF16384,PQ256"),
        (100_000_000, 1280, "16G", "OPQ128_512,IVF32768,PQ128"),
        (1_000_000_000, 1280, "64G", "OPQ48_192,IVF65536,PQ48"),  # nlist capped at 65,536
    ],
)
def test_auto_factory_table(n: int, dim: int, budget: str, key: str) -> None:
    assert choose_factory(n, dim, budget) == key
    size = stage.estimate_index_bytes(key, n, dim)
    assert size is not None and size <= stage.parse_memory(budget)
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)  # FAISS takes the key
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_auto_rule_limits() -> None:
    assert choose_factory(373, 1280, "16G", flat_max=0) == "IVF8,Flat"  # ≥ 39 points per list
    assert [stage.choose_nlist(n) for n in (10, 1000, 100_000, 10**6, 10**7, 10**9)] == [
        1,
        16,
        1024,
        4096,
        16384,
        65536,
    ]
    with pytest.raises(ValueError, match=r"cannot hold 1,000,000 vectors.*raise --max-memory"):
        choose_factory(1_000_000, 128, "1M")
    with pytest.raises(ValueError, match="PQ needs at least 9,984 vectors"):
        choose_factory(500, 1280, "1M")
    assert stage.parse_memory("16G") == 16 * 2**30
    assert stage.parse_memory("1.5g") == 3 * 2**29
    assert stage.parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="cannot read memory size"):
        stage.parse_memory("lots")


def test_size_estimate_matches_faiss(tied: np.ndarray) -> None:
    index, _ = stage.train_index("IVF16,Flat", tied)
    index.add(tied)
    real = len(index_store.serialize_index(index))
    assert abs(stage.estimate_index_bytes("IVF16,Flat", len(tied), 24) - real) < 0.05 * real


# --- Bad input --------------------------------------------------------------------------------


def _part(folder: Path, name: str, ids: list[str], vectors: np.ndarray, errors=None) -> None:
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    errors = pa.array(errors or [None] * len(ids), type=pa.string())
    table = pa.table({"image_id": ids, "vector": column, "error": errors})
    tables.DESCRIPTORS.write(str(folder), table, part=name)


def _publish(folder: Path, dim: int, count: int, network=NETWORK) -> None:
    details = {"dim": dim, "count": count, "network": network, "settings": {}, "failed": []}
    tables.DESCRIPTORS_OUTPUT.publish(
        str(folder), inputs={"network": json.dumps(network)}, details=details
    )


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    desc = tmp_path / "desc"
    a = _unit(rng, 5, 16)
    a[2, 3] = np.nan
    _part(desc, "a", ["x0", "x1", "x2", "x3", "x4"], a)
    _part(desc, "b", ["x4", "y1"], _unit(rng, 2, 16))
    _publish(desc, 16, 6)
    conf = IndexConf(descriptors=str(desc), output=str(tmp_path / "idx"), factory="IVFxx,Flat")
    with pytest.raises(ValueError) as caught:
        run(conf)
    text = str(caught.value)
    assert "4 problems" in text
    assert "non-finite values (NaN or inf), e.g. 'x2'" in text
    assert "appear more than once in the descriptors, e.g. 'x4'" in text
    assert "the descriptors manifest counts 6 vectors but the part files hold 7" in text
    assert "FAISS rejects factory 'IVFxx,Flat' for dimension 16: could not parse" in text
    assert not (tmp_path / "idx").exists()  # nothing written before validation passed

    with pytest.raises(
        ValueError, match=r"(?s)--shards must be at least 1.*cannot read memory size"
    ):
        run(IndexConf(descriptors=str(desc), output=str(tmp_path / "i"), shards=0, max_memory="x"))


def test_incomplete_or_missing_descriptors(tmp_path: Path) -> None:
    desc = tmp_path / "desc"
    _part(desc, "a", ["x0"], _unit(np.random.default_rng(0), 1, 8))
    with pytest.raises(ValueError, match=r"not a complete extract output \(no manifest.json\)"):
        run(IndexConf(descriptors=str(desc), output=str(tmp_path / "idx")))
    with pytest.raises(ValueError, match=r"no extract output at .*nowhere"):
        run(IndexConf(descriptors=str(tmp_path / "nowhere"), output=str(tmp_path / "idx")))
    _publish(desc, 8, 1)
    with pytest.raises(ValueError, match="needs at least 64 vectors to train"):
        run(IndexConf(descriptors=str(desc), output=str(tmp_path / "idx"), factory="IVF64,Flat"))


def test_cli_reports_one_line(tmp_path: Path) -> None:
    result = run_stage("index", "--descriptors", "/nonexistent", "--output", str(tmp_path / "x"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "no extract output at /nonexistent" in lines[0]
    assert "Traceback" not in result.stderr


def test_reads_the_extract_format(tmp_path: Path) -> None:
    """Null vectors with an error are failures left out; list<float32> works like fixed lists."""
    rng = np.random.default_rng(1)
    x = _unit(rng, 3, 8)
    desc = tmp_path / "desc"
    mask = pa.array([False, True, False])
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8, mask=mask)
    errors = pa.array([None, "not an image", None], type=pa.string())
    first = pa.table({"image_id": ["a", "b", "c"], "vector": fixed, "error": errors})
    tables.DESCRIPTORS.write(str(desc), first, part="p0")
    listed = pa.array([list(map(float, v)) for v in _unit(rng, 2, 8)], type=pa.list_(pa.float32()))
    second = pa.table({"image_id": ["d", "e"], "vector": listed, "error": pa.nulls(2, pa.string())})
    tables.DESCRIPTORS.write(str(desc), second, part="p1")
    _publish(desc, 8, 4)
    read = read_descriptors(str(desc))
    assert read.image_ids.tolist() == ["a", "c", "d", "e"] and read.failed == 1
    np.testing.assert_array_equal(read.vectors[:2], x[[0, 2]])


def test_missing_bucket_is_reported(s3_bucket: str, tmp_path: Path) -> None:
    desc = write_descriptors(str(tmp_path / "d"), _ids(0, 4), _unit(np.random.default_rng(0), 4, 8))
    with pytest.raises(ValueError, match=r"--output: bucket .* does not exist"):
        run(IndexConf(descriptors=desc, output=f"s3://{s3_bucket}-absent/idx"))


# --- Sharded search ---------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_flat_equals_one_exact_index(ray_session, tied, tmp_path: Path, shards) -> None:
    desc = write_descriptors(str(tmp_path / "d"), _ids(0, len(tied)), tied, network=NETWORK)
    version = run(IndexConf(descriptors=desc, output=str(tmp_path / "idx"), shards=shards))
    assert version == str(tmp_path / "idx" / "v1")
    manifest = index_store.read_manifest(str(tmp_path / "idx"))
    assert manifest["factory"] == "Flat" and manifest["metric"] == "inner_product"
    assert [s["count"] for s in manifest["shards"]] == [len(tied) // shards] * shards

    # Queries are database rows, so each has tied copies; 16 per call keeps FAISS off BLAS,
    # where a score does not depend on the vector's position (see cluster.index_store).
    queries = tied[np.random.default_rng(3).choice(len(tied), 16, replace=False)]
    for k in (1, 10, 50):
        result = index_store.search(str(tmp_path / "idx"), queries, k)
        scores, ids = _exact(tied, queries, k)
        np.testing.assert_array_equal(result.ids, ids)
        np.testing.assert_array_equal(result.scores, scores)
        assert result.image_ids.tolist() == [[f"img-{i:06d}" for i in row] for row in ids]
    assert (np.diff(result.scores, axis=1) <= 0).all()

    many = tied[:64]  # BLAS path: equal up to float rounding
    result = index_store.search(str(tmp_path / "idx"), many, 10)
    scores, _ = _exact(tied, many, 10)
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)

    big = index_store.search(str(tmp_path / "idx"), queries[:2], len(tied) + 5)  # k > count
    assert (big.ids[:, -5:] == -1).all() and np.isneginf(big.scores[:, -5:]).all()
    assert big.image_ids[0, -1] is None


def test_load_shard_on_its_own(ray_session, tied, tmp_path: Path) -> None:
    desc = write_descriptors(str(tmp_path / "d"), _ids(0, len(tied)), tied, network=NETWORK)
    run(IndexConf(descriptors=desc, output=str(tmp_path / "idx"), shards=3))
    manifest = index_store.read_manifest(str(tmp_path / "idx"), version=1)
    index, id_map = index_store.load_shard(str(tmp_path / "idx"), manifest, 1)
    assert index.ntotal == len(id_map) == 400
    assert id_map.ids[0] == manifest["shards"][1]["id_start"] == 400
    _, labels = index.search(tied[400:401], 1)
    assert id_map.global_ids(labels)[0, 0] == 400 and id_map.image_ids[labels[0, 0]] == "img-000400"
    shard_file = tmp_path / "idx" / manifest["shards"][1]["file"]
    shard_file.write_bytes(shard_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="does not match the sha256"):
        index_store.load_shard(str(tmp_path / "idx"), manifest, 1)


def test_merge_topk_keeps_lower_ids_first() -> None:
    scores = [np.array([[0.9, 0.5]], np.float32), np.array([[0.9, 0.7]], np.float32)]
    ids = [np.array([[7, 3]]), np.array([[2, -1]])]
    top_scores, top_ids = index_store.merge_topk(scores, ids, 4)
    assert top_ids.tolist() == [[2, 7, 3, -1]]
    assert top_scores[0, :3].tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert np.isneginf(top_scores[0, 3])


# --- Versions ---------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return index_store.sha256(path.read_bytes())


def test_new_descriptors_make_the_next_version(ray_session, tied, tmp_path: Path) -> None:
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 900), tied[:900], network=NETWORK)
    assert run(IndexConf(descriptors=d1, output=out, shards=2)).endswith("v1")
    v1 = index_store.read_manifest(out)
    before = {s["file"]: _sha(tmp_path / "idx" / s["file"]) for s in v1["shards"]}

    # All 1,200 descriptors: the 900 known ones are skipped, 300 new rows make v2.
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 1200), tied, network=NETWORK)
    assert run(IndexConf(descriptors=d2, output=out, shards=2)).endswith("v2")
    v2 = index_store.read_manifest(out)
    assert v2["parent"] == 1 and v2["count"] == 1200 and v2["added"] == 300
    assert v2["shards"][:2] == v1["shards"]  # v1's shards referenced, not copied
    assert [s["file"] for s in v2["shards"][2:]] == ["v2/shard-00000.faiss", "v2/shard-00001.faiss"]
    assert {f: _sha(tmp_path / "idx" / f) for f in before} == before  # and untouched
    assert not (tmp_path / "idx" / "v2" / "shard-00002.faiss").exists()
    assert not (tmp_path / "idx" / "v2" / "_build").exists()

    queries = tied[np.random.default_rng(5).choice(1200, 16, replace=False)]
    result = index_store.search(out, queries, 20)
    scores, ids = _exact(tied, queries, 20)  # from scratch over all 1,200
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_array_equal(result.scores, scores)
    old = index_store.search(out, queries, 20, version=1)  # v1 stays readable
    np.testing.assert_array_equal(old.ids, _exact(tied[:900], queries, 20)[1])

    # Nothing new: no v3.
    assert run(IndexConf(descriptors=d2, output=out, shards=2)).endswith("v2")
    assert index_store.list_versions(out) == [1, 2]

    other = write_descriptors(str(tmp_path / "d3"), _ids(5000, 5010), tied[:10], network={"x": 1})
    with pytest.raises(ValueError, match="mixed networks"):
        run(IndexConf(descriptors=other, output=out))
    short = write_descriptors(
        str(tmp_path / "d4"), _ids(6000, 6010), tied[:10, :8], network=NETWORK
    )
    with pytest.raises(ValueError, match=r"mixed dimensions: the descriptors have 8.*has 24"):
        run(IndexConf(descriptors=short, output=out))


def test_another_factory_stops_unless_overwrite_indexes_anew(ray_session, tied, tmp_path) -> None:
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 900), tied[:900], network=NETWORK)
    run(IndexConf(descriptors=d1, output=out, shards=2))
    first = index_store.read_manifest(out)
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 1200), tied, network=NETWORK)
    with pytest.raises(ValueError) as caught:
        run(IndexConf(descriptors=d2, output=out, factory="IVF8,Flat"))
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    assert 'factory: "Flat" → "IVF8,Flat"' in text and "--overwrite" in text
    assert index_store.list_versions(out) == [1]  # nothing written
    assert index_store.read_manifest(out)["identity"] == first["identity"]

    # The same factory spelled out is no change: the new rows make v2.
    assert run(IndexConf(descriptors=d2, output=out, factory="Flat")).endswith("v2")

    # --overwrite: everything indexed again, trained anew, as the next version; the earlier
    # versions stay whole for a service that still reads them
    replaced = run(IndexConf(descriptors=d2, output=out, factory="IVF8,Flat", overwrite=True))
    assert replaced == f"{out}/v3" and index_store.list_versions(out) == [1, 2, 3]
    v3 = index_store.read_manifest(out)
    assert v3["factory"] == "IVF8,Flat" and v3["count"] == 1200 and v3["parent"] is None
    assert all(s["file"].startswith("v3/") for s in v3["shards"])
    assert v3["trained"]["file"] == "v3/trained.faiss"
    assert [h["version"] for h in v3["history"]] == [3]
    result = index_store.search(out, tied[:16], 1, search_params={"nprobe": 8})
    assert result.ids[:, 0].tolist() == _exact(tied, tied[:16], 1)[1][:, 0].tolist()
    assert index_store.read_manifest(out, 2)["factory"] == "Flat"  # still readable

    # Unchanged descriptors and settings: nothing to do, with or without --overwrite.
    manifest = tmp_path / "idx" / "v3" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    for overwrite in (False, True):
        again = IndexConf(descriptors=d2, output=out, factory="IVF8,Flat", overwrite=overwrite)
        assert run(again) == f"{out}/v3"
    assert manifest.stat().st_mtime_ns == written and index_store.list_versions(out) == [1, 2, 3]


def test_another_network_says_what_to_do(ray_session, tied, tmp_path) -> None:
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 100), tied[:100], network=NETWORK)
    run(IndexConf(descriptors=d1, output=out, shards=1))
    other = {**NETWORK, "identity": "another"}
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 100), tied[:100], network=other)
    with pytest.raises(ValueError) as caught:
        run(IndexConf(descriptors=d2, output=out))
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    assert "mixed networks" in text and "another" in text and "--overwrite" in text
    assert run(IndexConf(descriptors=d2, output=out, overwrite=True)) == f"{out}/v2"
    assert index_store.read_manifest(out)["network"]["identity"] == "another"
    assert index_store.read_manifest(out, 1)["network"].get("identity") is None


def test_ivf_versions_share_the_trained_quantizer(ray_session, monkeypatch, tmp_path) -> None:
    rng = np.random.default_rng(11)
    centres = _unit(rng, 20, 32)
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * _unit(rng, 3000, 32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 2000), x[:2000], network=NETWORK)
    run(IndexConf(descriptors=d1, output=out, factory="IVF16,Flat", shards=2))
    v1 = index_store.read_manifest(out)
    assert v1["trained"]["file"] == "v1/trained.faiss" and v1["trained"]["train_size"] == 800
    nprobe = v1["search_params"]["nprobe"]
    assert 1 <= nprobe <= 16 and v1["tuning"]["recall_at_k"] >= 0.95

    def no_training(*args, **kwargs):
        raise AssertionError("v2 must not train")

    monkeypatch.setattr(stage, "train_index", no_training)
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 3000), x, network=NETWORK)
    run(IndexConf(descriptors=d2, output=out, shards=2))
    v2 = index_store.read_manifest(out)
    assert v2["trained"] == v1["trained"] and v2["factory"] == "IVF16,Flat"

    def centroids(manifest, i):
        shard, _ = index_store.load_shard(out, manifest, i)  # keep it alive while ivf is used
        ivf = faiss.extract_index_ivf(shard)
        return ivf.quantizer.reconstruct_n(0, ivf.nlist)

    np.testing.assert_array_equal(centroids(v2, 3), centroids(v1, 0))  # a v2 shard, a v1 shard
    trained = index_store.load_trained(out, v2)
    quantizer = faiss.extract_index_ivf(trained).quantizer
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, 16), centroids(v2, 2))

    # All lists probed, IVF-Flat is exact search over all 3,000; the tuned nprobe keeps recall.
    queries = x[rng.choice(3000, 200, replace=False)]
    full = index_store.search(out, queries[:16], 10, search_params={"nprobe": 16})
    exact_scores, exact_ids = _exact(x, queries[:16], 10)
    np.testing.assert_array_equal(full.ids, exact_ids)
    np.testing.assert_allclose(full.scores, exact_scores, atol=1e-6)
    tuned = index_store.search(out, queries, 10)
    _, truth = _exact(x, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tuned.ids, truth, strict=True)])
    assert recall >= 0.93, recall


class _Killed(Exception):
    pass


def test_killed_between_shards_leaves_the_old_version(ray_session, tied, monkeypatch, tmp_path):
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 600), tied[:600], network=NETWORK)
    run(IndexConf(descriptors=d1, output=out, shards=2))
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 1200), tied, network=NETWORK)

    def killed(entry, done, total):
        raise _Killed(f"killed after {entry['file']}")

    monkeypatch.setattr(stage, "_shard_finished", killed)
    with pytest.raises(_Killed):
        run(IndexConf(descriptors=d2, output=out, shards=3))
    assert index_store.latest_version(out) == 1  # v2 has no manifest: it does not exist
    assert (tmp_path / "idx" / "v2").is_dir() and not (
        tmp_path / "idx" / "v2" / "manifest.json"
    ).exists()
    with pytest.raises(FileNotFoundError, match="not complete"):
        index_store.read_manifest(out, version=2)
    queries = tied[:16]
    old = index_store.search(out, queries, 10)
    assert old.version == 1
    np.testing.assert_array_equal(old.ids, _exact(tied[:600], queries, 10)[1])

    monkeypatch.undo()
    assert run(IndexConf(descriptors=d2, output=out, shards=3)).endswith("v2")
    v2 = index_store.read_manifest(out)
    assert v2["build"]["resumed"] and len(v2["build"]["shards_reused"]) >= 1
    assert sorted(v2["build"]["shards_reused"] + v2["build"]["shards_built"]) == [0, 1, 2]
    result = index_store.search(out, queries, 10)
    scores, ids = _exact(tied, queries, 10)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_array_equal(result.scores, scores)


def test_sigkill_of_the_index_command_between_shards(ray_session, tied, tmp_path):
    """A real ``kill -9`` of ``python -m pipeline.index`` once its first shard is written."""
    out = tmp_path / "idx"
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 600), tied[:600], network=NETWORK)
    run(IndexConf(descriptors=d1, output=str(out), shards=2))
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 1200), tied, network=NETWORK)
    shards = 12
    # The command joins the session's Ray; one shard at a time (2 CPUs each) keeps it between
    # shards for long enough to be killed there.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "pipeline.index", "--descriptors", d2, "--output", str(out)]
    command += ["--shards", str(shards), "--cpus-per-shard", "2"]
    child = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    receipts = out / "v2" / "_build"
    deadline = time.monotonic() + 120
    while not any(receipts.glob("shard-*.json")):
        assert child.poll() is None, f"pipeline.index ended first: {child.stderr.read()}"
        assert time.monotonic() < deadline, "no shard written in 120 s"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    written = len(list(receipts.glob("shard-*.json")))
    assert 1 <= written < shards  # killed between shards, not after the last
    assert not (out / "v2" / "manifest.json").exists()
    assert index_store.latest_version(str(out)) == 1  # readers still see v1, whole
    queries = tied[:16]
    old = index_store.search(str(out), queries, 10)
    assert old.version == 1
    np.testing.assert_array_equal(old.ids, _exact(tied[:600], queries, 10)[1])

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    v2 = index_store.read_manifest(str(out))
    assert v2["version"] == 2 and v2["build"]["resumed"]
    assert len(v2["build"]["shards_reused"]) >= 1  # the shards written before the kill
    assert len(v2["build"]["shards_reused"]) >= written  # each receipt follows its shard file
    assert sorted(v2["build"]["shards_reused"] + v2["build"]["shards_built"]) == list(range(shards))
    scores, ids = _exact(tied, queries, 10)
    result = index_store.search(str(out), queries, 10)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_array_equal(result.scores, scores)


def test_other_inputs_discard_an_unfinished_version(ray_session, tied, monkeypatch, tmp_path):
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 600), tied[:600], network=NETWORK)

    def killed(entry, done, total):
        raise _Killed

    monkeypatch.setattr(stage, "_shard_finished", killed)
    with pytest.raises(_Killed):
        run(IndexConf(descriptors=d1, output=out, shards=2))
    assert index_store.latest_version(out) is None
    monkeypatch.undo()
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 500), tied[:500], network=NETWORK)
    run(IndexConf(descriptors=d2, output=out, shards=2))
    v1 = index_store.read_manifest(out)
    assert v1["count"] == 500 and not v1["build"]["resumed"] and v1["build"]["shards_reused"] == []


# --- S3 ---------------------------------------------------------------------------------------


def test_s3_index_equals_local(ray_session, s3_bucket: str, tied, tmp_path: Path) -> None:
    desc_s3 = write_descriptors(f"s3://{s3_bucket}/desc", _ids(0, 1200), tied, network=NETWORK)
    desc_local = write_descriptors(str(tmp_path / "d"), _ids(0, 1200), tied, network=NETWORK)
    remote = f"s3://{s3_bucket}/index"
    assert run(IndexConf(descriptors=desc_s3, output=remote, shards=2)) == f"{remote}/v1"
    run(IndexConf(descriptors=desc_local, output=str(tmp_path / "idx"), shards=2))
    assert index_store.latest_version(remote) == 1
    assert storage.is_file(f"{remote}/v1/manifest.json")
    assert not storage.exists(f"{remote}/v1/_build")
    remote_manifest = index_store.read_manifest(remote)
    local_manifest = index_store.read_manifest(str(tmp_path / "idx"))
    assert [s["sha256"] for s in remote_manifest["shards"]] == [
        s["sha256"] for s in local_manifest["shards"]
    ]
    queries = tied[:16]
    a = index_store.search(remote, queries, 10)
    b = index_store.search(str(tmp_path / "idx"), queries, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.image_ids.tolist() == b.image_ids.tolist()


# --- Real photos ------------------------------------------------------------------------------


def test_real_photos_find_their_scene(
    ray_session, lite0_real_descriptors, real_photo_set, tmp_path: Path
) -> None:
    paths = [str(p) for p in real_photo_set.db_paths]
    vectors = np.asarray(lite0_real_descriptors, dtype=np.float32)
    desc = write_descriptors(
        str(tmp_path / "desc"),
        paths,
        vectors,
        network={
            "weights": "imagenet",
            "meta": {"backbone": "efficientnet_lite0", "pooling": "gem"},
        },
        settings={"max_size": REAL_MAX_SIZE},
    )
    out = str(tmp_path / "idx")
    run(IndexConf(descriptors=desc, output=out, shards=2))
    manifest = index_store.read_manifest(out)
    assert manifest["factory"] == "Flat" and len(manifest["shards"]) == 2
    assert manifest["network"]["meta"]["backbone"] == "efficientnet_lite0"

    result = index_store.search(out, vectors, 2)
    scene = dict(zip(paths, real_photo_set.db_labels.tolist(), strict=True))
    hits = []
    for path, row in zip(paths, result.image_ids, strict=True):
        other = next(i for i in row if i != path)
        hits.append(scene[other] == scene[path])
    recall = float(np.mean(hits))
    print(f"scene recall@1 over {len(paths)} shared photos (Flat, 2 shards): {recall:.4f}")
    assert recall >= 0.95, recall


def test_opq_ivf_pq_shards_equal_one_index(ray_session, tmp_path: Path) -> None:
    """OPQ + IVF-PQ: trained once (rotation, lists, codebooks), sharded, tuned through the
    rotation; the merged search equals the same trained index filled in one piece."""
    rng = np.random.default_rng(2)
    centres = _unit(rng, 30, 16)
    x = centres[rng.integers(0, 30, 4000)] + 0.4 * _unit(rng, 4000, 16)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    desc = write_descriptors(str(tmp_path / "d"), _ids(0, len(x)), x, network=NETWORK)
    out = str(tmp_path / "idx")
    run(IndexConf(descriptors=desc, output=out, factory="OPQ8_16,IVF8,PQ8x4", shards=3))
    manifest = index_store.read_manifest(out)
    assert manifest["trained"]["train_size"] == 800  # 50 x 16 PQ centroids > 50 x 8 lists
    nprobe = manifest["search_params"]["nprobe"]
    assert 1 <= nprobe <= 8 and manifest["tuning"]["queries"] == 200
    assert manifest["stored_bytes"] < x.nbytes / 2  # 4-byte codes + ids instead of 64 bytes

    whole = index_store.load_trained(out, manifest)
    whole.add(x)
    index_store.set_search_params(whole, {"nprobe": nprobe})
    queries = x[rng.choice(len(x), 16, replace=False)]
    scores, labels = index_store.shard_topk(whole, queries, 10)
    result = index_store.search(out, queries, 10)
    np.testing.assert_array_equal(result.ids, labels)
    np.testing.assert_array_equal(result.scores, scores)


def test_local_features_are_pinned_and_a_new_pin_is_a_next_version(
    ray_session, tied, photos_dir: Path, tmp_path: Path
) -> None:
    """Local features given to a complete index make a next version with the same shards and
    the features pinned; a later build keeps the pin; other features make another version."""
    out = str(tmp_path / "idx")
    d1 = write_descriptors(str(tmp_path / "d1"), _ids(0, 900), tied[:900], network=NETWORK)
    run(IndexConf(descriptors=d1, output=out, shards=2))
    photos = sorted(photos_dir.glob("statue/*.jpg"))[:2]
    images = write_images(tmp_path / "run", photos)
    local = features(
        FeaturesConf.from_flags(
            images=str(images), output=str(tmp_path / "local"), local_max_size=256
        )
    )
    assert run(IndexConf(descriptors=d1, output=out, local_features=local)).endswith("v2")
    v1, v2 = index_store.read_manifest(out, 1), index_store.read_manifest(out)
    assert v2["shards"] == v1["shards"] and v2["added"] == 0 and v2["count"] == 900
    pin = v2["local_features"]
    assert pin["identity"] == LOCAL_FEATURES_OUTPUT.manifest(local).identity
    assert pin["count"] == 2 and pin["missing"] == 900  # the synthetic rows have no photos
    assert pin["settings"]["local_max_size"] == 256 and v1.get("local_features") is None
    # the same features again: nothing to do; new descriptors keep the pin
    assert run(IndexConf(descriptors=d1, output=out, local_features=local)).endswith("v2")
    d2 = write_descriptors(str(tmp_path / "d2"), _ids(0, 1000), tied[:1000], network=NETWORK)
    assert run(IndexConf(descriptors=d2, output=out)).endswith("v3")
    assert index_store.read_manifest(out)["local_features"] == pin
    with pytest.raises(ValueError, match="--local-features: no features output"):
        run(IndexConf(descriptors=d2, output=out, local_features=str(tmp_path / "none")))
