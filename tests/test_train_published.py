"""Training from cnnimageretrieval-pytorch's published pairs file (``retrieval-SfM-120k.pkl``):
a small file in exactly its format over photos of the built-in collection laid out as its
``ims`` (``cid2filename``), trained on for one short epoch; and its bad inputs, one line each."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import storage, tables
from model.cirtorch_pairs import cid2filename, convert, missing_photos, read_published
from model.images import image_id
from model.training_set import read_training_set, split_clusters
from pipeline.train import TrainConf
from pipeline.train import run as train
from pipeline.train.published import prepare
from tests.helpers import run_stage

VIEWS = 6
"""Photos per landmark (cluster) taken from the tiny collection."""
LANDMARKS = {lm: [f"lm{lm:02d}_v{v:02d}" for v in range(VIEWS)] for lm in range(3)}
DISTRACTORS = [f"distractor_{i:03d}" for i in range(4)]
PAIRS = [(0, 1), (1, 2), (2, 3)]
"""``(query, positive)`` view numbers of each landmark's pairs."""


def _cid(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()  # cirtorch's ids: 32 hex characters


def _split(groups: list[list[str]], *, with_pairs: int) -> dict:
    """A split as cirtorch stores it: a cluster per group of photo names, the first
    ``with_pairs`` groups with ``PAIRS``."""
    cids, cluster, qidxs, pidxs = [], [], [], []
    for number, names in enumerate(groups):
        start = len(cids)
        cids += [_cid(n) for n in names]
        cluster += [number] * len(names)
        if number < with_pairs:
            qidxs += [start + q for q, _ in PAIRS]
            pidxs += [start + p for _, p in PAIRS]
    return {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}


DATA = {
    "train": _split([LANDMARKS[0], LANDMARKS[1], DISTRACTORS], with_pairs=2),
    "val": _split([LANDMARKS[2]], with_pairs=1),
}
"""The file: lm00 and lm01 train (the distractors too: a cluster without pairs, negatives
only), lm02 validates, its cluster numbered 0 like train's first."""


def _write(path: Path, data: dict) -> str:
    path.write_bytes(pickle.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def published(tiny_collection: Path, tmp_path_factory) -> dict:
    """The file, and the tiny collection's photos copied to cirtorch's layout (no extension)."""
    tmp = tmp_path_factory.mktemp("published")
    ims = tmp / "ims"
    for name in [*DISTRACTORS, *(n for names in LANDMARKS.values() for n in names)]:
        target = Path(cid2filename(_cid(name), str(ims)))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_collection / "jpg" / f"{name}.jpg", target)
    pkl = _write(tmp / "retrieval-SfM-120k.pkl", DATA)
    return {"pkl": pkl, "ims": str(ims), "tmp": tmp}


@pytest.mark.slow
def test_training_from_the_published_pairs(published, ray_session, caplog) -> None:
    out = str(published["tmp"] / "train")
    conf = TrainConf.from_flags(
        pairs=published["pkl"],
        images=published["ims"],
        output=out,
        epochs=1,
        image_size=128,
        val_size=128,
        queries=6,
        nnum=1,
        tuples_per_step=2,
        lr=1e-5,
        whiten=False,
        name="published",
    )
    assert train(conf) == out
    manifest = tables.TRAIN_OUTPUT.manifest(out)
    raw = Path(published["pkl"]).read_bytes()
    assert manifest.inputs["pairs"] == f"cirtorch-pkl:{hashlib.sha256(raw).hexdigest()[:20]}"
    made = manifest.details["published"]
    assert made["pkl"] == published["pkl"]
    assert made["pairs"] == {"train": 6, "val": 3}  # every pair of the file, none dropped
    assert made["clusters"] == {"train": 3, "val": 1}  # the distractors: negatives only
    assert made["photos"] == 4 + 3 * VIEWS and not made["dropped_pairs"]
    metrics = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert np.isfinite(epochs[1]["loss"]) and epochs[1]["loss"] > 0 and epochs[1]["steps"] == 3
    assert all(0 < e["val_map"] <= 1 for e in epochs)
    # the held-out validation is the file's 'val' split, exactly: lm02's photos
    held_out = metrics["settings"]["held_out"]
    assert held_out == pytest.approx((3 - 0.5) / 9)
    _, val = split_clusters(read_training_set(made["pairs_output"]), held_out, 0)
    val_cids = DATA["val"]["cids"]
    expected = {image_id(Path(cid2filename(c, published["ims"])).read_bytes()) for c in val_cids}
    assert set(val.image_ids.tolist()) == expected
    # the photos were copied once, from cirtorch's layout
    images = tables.IMAGES.read(made["images_output"], ["uri", "error"])
    assert images.num_rows == 4 + 3 * VIEWS and images["error"].null_count == images.num_rows
    assert Path(images["uri"][0].as_py()).parent.parent.parent.parent == Path(published["ims"])
    # the same file again: nothing is copied, converted or trained
    caplog.set_level(logging.INFO, logger="pipeline.train")
    assert train(conf) == out
    assert "holds the photos of" in caplog.text and "is complete; skipping" in caplog.text
    assert tables.TRAIN_OUTPUT.manifest(out) == manifest
    # another file (a pair fewer) over the same photos: another identity, which the output's
    # manifest does not skip for; its photos are not copied again
    train_less = {**DATA["train"], "qidxs": DATA["train"]["qidxs"][1:]}
    other = {**DATA, "train": {**train_less, "pidxs": DATA["train"]["pidxs"][1:]}}
    changed = prepare(
        _write(published["tmp"] / "other.pkl", other),
        published["ims"],
        output=out,
        seed=0,
        held_out=0.2,
    )
    assert changed.identity != manifest.inputs["pairs"]
    assert changed.details["pairs"] == {"train": 5, "val": 3}
    assert changed.held_out == pytest.approx((3 - 0.5) / 8)
    inputs = {**manifest.inputs, "pairs": changed.identity}
    assert tables.TRAIN_OUTPUT.plan(out, inputs, manifest.settings)[0] != "skip"


def test_a_bad_file_is_named_one_line_per_problem(tmp_path) -> None:
    train, val = dict(DATA["train"]), dict(DATA["val"])
    del train["pidxs"]
    val["cluster"] = val["cluster"][:-1]  # one short
    val["qidxs"] = [*val["qidxs"][:-1], 99]
    with pytest.raises(ValueError) as err:
        read_published(_write(tmp_path / "bad.pkl", {"train": train, "val": val}))
    where = f"--pairs {tmp_path / 'bad.pkl'}"
    assert str(err.value).splitlines() == [
        f"{where} ['train'] has no 'pidxs'",
        f"{where} ['val']: 5 'cluster' entries for 6 'cids' (one per image)",
        f"{where} ['val']['qidxs'][2] = 99 is out of range (6 cids: 0 to 5)",
    ]
    with pytest.raises(ValueError, match=r"has no 'train' split \(its keys: 'val'\)$"):
        read_published(_write(tmp_path / "val.pkl", {"val": DATA["val"]}))
    across = {**DATA["train"], "pidxs": [*DATA["train"]["pidxs"][:-1], 0]}
    with pytest.raises(ValueError, match=r"pair 5: query \w+ \(cluster 1\) and its positive"):
        read_published(_write(tmp_path / "across.pkl", {"train": across}))
    (tmp_path / "text.pkl").write_text("cids")
    with pytest.raises(ValueError, match=r"text.pkl is not cirtorch's pairs pickle"):
        read_published(str(tmp_path / "text.pkl"))
    with pytest.raises(ValueError, match=r"holds a pathlib.PosixPath object"):
        read_published(_write(tmp_path / "object.pkl", {"train": Path("x")}))
    with pytest.raises(FileNotFoundError, match="--pairs: no file at"):
        read_published(str(tmp_path / "none.pkl"))
    found = read_published(_write(tmp_path / "good.pkl", DATA))
    assert found.identity == f"cirtorch-pkl:{hashlib.sha256(pickle.dumps(DATA)).hexdigest()[:20]}"
    assert set(found.splits) == {"train", "val"} and len(found.cids) == 4 + 3 * VIEWS


def test_conversion_holds_out_the_val_split_and_leaves_out_what_it_cannot_use(tmp_path) -> None:
    published = read_published(_write(tmp_path / "good.pkl", DATA))
    photo_ids = {c: f"id-{c}" for c in published.cids}
    photo_ids[_cid("lm01_v00")] = None  # could not be decoded: its pair goes
    photo_ids[_cid("lm02_v03")] = photo_ids[_cid("lm00_v05")]  # byte-identical, two clusters
    for seed in (0, 7):
        converted = convert(published, photo_ids, seed=seed)
        assert converted.details["dropped_pairs"] == {
            "photo unusable": 1,
            "photo in two clusters": 1,
        }
        assert converted.details["pairs"] == {"train": 5, "val": 2}
        assert converted.details["photos_in_two_clusters"] == 1
        pool = converted.pool["image_id"].to_pylist()
        assert photo_ids[_cid("lm00_v05")] not in pool  # nor a negative: it would be its twin's
        assert len(pool) == 4 + 3 * VIEWS - 3  # the unusable one, the two that are one photo
        for spec, table in (
            (tables.PAIRS, converted.pairs),
            (tables.WHITENING_PAIRS, converted.whitening),
            (tables.POOL, converted.pool),
        ):
            spec.write(str(tmp_path / f"pairs{seed}"), table)
        tables.PAIRS_OUTPUT.publish(str(tmp_path / f"pairs{seed}"), inputs={"pkl": "test"})
        training = read_training_set(str(tmp_path / f"pairs{seed}"))
        train, val = split_clusters(training, converted.held_out, seed)
        expected = {f"id-{_cid(n)}" for n in LANDMARKS[2] if n != "lm02_v03"}
        assert set(val.image_ids.tolist()) == expected == converted.val_ids
        assert len(train.queries) == 5 and len(val.queries) == 2
        negatives_only = {f"id-{_cid(n)}" for n in DISTRACTORS}
        assert negatives_only <= set(train.image_ids.tolist())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_missing_photos_are_named_with_their_cid_and_path(where, tmp_path, request) -> None:
    """The file and the photos on local disk or S3 (one listing of the prefix there)."""
    root = f"s3://{request.getfixturevalue('s3_bucket')}" if where == "s3" else str(tmp_path)
    ims = storage.join(root, "ims")
    pkl = storage.write_bytes(storage.join(root, "retrieval-SfM-120k.pkl"), pickle.dumps(DATA))
    published = read_published(pkl)
    assert published.uri == pkl and len(published.cids) == 4 + 3 * VIEWS
    gone = DATA["val"]["cids"][0]
    for cid in published.cids:
        if cid != gone:
            storage.write_bytes(cid2filename(cid, ims), b"a photo")
    assert missing_photos(published, ims) == [
        f"--images: image {gone} is missing: no file at {cid2filename(gone, ims)}"
    ]
    nowhere = missing_photos(published, storage.join(root, "elsewhere"))
    assert len(nowhere) == 1 and "give the folder of cirtorch's ims" in nowhere[0]
    wrong = missing_photos(published, root)  # the folder above ims: none of them there
    assert len(wrong) == 1 and wrong[0].startswith(f"--images: none of the {4 + 3 * VIEWS}")


def test_the_command_line_names_each_problem_and_exits_2(tmp_path) -> None:
    train = {**DATA["train"], "qidxs": [-1, *DATA["train"]["qidxs"][1:]]}
    bad = _write(tmp_path / "bad.pkl", {"train": train, "val": DATA["val"]})
    out = str(tmp_path / "out")
    done = run_stage("train", "--pairs", bad, "--images", str(tmp_path), "--output", out)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: --pairs {bad} ['train']['qidxs'][0] = -1 is out of range (16 cids: 0 to 15)"
    ]
    assert not Path(out).exists()  # nothing written before the file is known to be good
