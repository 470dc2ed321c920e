"""The evaluate stage on a revisited-layout set written by the built-in landmark generator."""

import dataclasses
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from model import checkpoint
from model.datasets.revisited import load_revisited
from model.datasets.sets import same_label_pairs
from model.evaluation import evaluate_revisited
from model.extraction import ArrayImages, ExtractOptions, ImageFiles, extract_descriptors
from model.kreciprocal import KReciprocalOptions, kreciprocal_distances, shortlist_order
from model.local_features import LocalFeatureOptions, read_local_features
from model.networks import NetworkMeta, build_network
from model.retrieval import rank_by_similarity
from model.scoring import format_metrics
from model.verification import VerifyOptions, verify_pair
from model.whitening import learn_whitening, save_whitening
from pipeline.evaluate import EvaluateConf, run
from tests.helpers import run_stage

MAX_SIZE = 256
SMALL = 128
"""For the tests whose figures do not matter (failures, caching, a checkpoint against its
flags): a quarter of the pixels to describe, and the same assertions hold."""


def _conf(collection: Path, folder: Path) -> EvaluateConf:
    """The tests' settings, with output and cache under ``folder``."""
    return EvaluateConf.from_flags(
        dataset=collection.name,
        data_root=str(collection.parent),
        max_size=MAX_SIZE,
        output=str(folder / "out"),
        cache_dir=str(folder / "cache"),
        num_workers=0,
        device="cpu",
    )


@pytest.fixture()
def conf(tiny_collection: Path, tmp_path: Path) -> EvaluateConf:
    return _conf(tiny_collection, tmp_path)


@pytest.fixture()
def copy_of(tiny_collection: Path, tmp_path: Path) -> Path:
    """A copy of the collection that a test may damage."""
    target = tmp_path / "data" / tiny_collection.name
    shutil.copytree(tiny_collection, target)
    return target


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").eval()


def _options() -> ExtractOptions:
    return ExtractOptions(device="cpu", progress=False)


@dataclass(frozen=True)
class PlainRun:
    """The shared run's settings (its folders) and result."""

    conf: EvaluateConf
    result: dict[str, Any]


@pytest.fixture(scope="module")
def plain(tiny_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> PlainRun:
    """One evaluation of the untouched collection at the default settings, in folders of its
    own: the tests that only read its figures, files or cache share it (read only) instead of
    describing every photo again."""
    conf = _conf(tiny_collection, tmp_path_factory.mktemp("plain"))
    return PlainRun(conf, run(conf))


@pytest.fixture()
def warm_conf(conf: EvaluateConf, plain: PlainRun) -> EvaluateConf:
    """``conf`` with the plain run's descriptors copied into its cache: for the tests about
    something other than describing the unchanged photos (distractors, a changed photo, the
    ground truth's format). Only what they add or change is described; keys hold each photo's
    relative path, size and time, so a copy of the collection finds them too."""
    shutil.copytree(plain.conf.cache_dir, conf.cache_dir)
    return conf


@dataclass(frozen=True)
class Reference:
    """Descriptors extracted by the test itself, to check the stage against."""

    db: np.ndarray
    queries: np.ndarray


@pytest.fixture(scope="module")
def reference(tiny_collection: Path, network: torch.nn.Module) -> Reference:
    """The collection described by the test itself, outside the stage, once for the tests
    that compare with it or learn from it."""
    rset = load_revisited(tiny_collection)
    db = extract_descriptors(
        network, ImageFiles(rset.db_paths, MAX_SIZE, exif_transpose=False), _options()
    )
    queries = extract_descriptors(
        network,
        ImageFiles(rset.query_paths, MAX_SIZE, rset.query_boxes, exif_transpose=False),
        _options(),
    )
    return Reference(db, queries)


def test_figures_equal_the_protocol_on_the_same_ranking(plain, tiny_collection, reference) -> None:
    result, conf = plain.result, plain.conf
    rset = load_revisited(tiny_collection)
    ranks = rank_by_similarity(reference.queries, reference.db)
    expected = evaluate_revisited(ranks.T, rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert result["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)
        for k in (1, 5, 10):
            got = result["metrics"][part]["mp@k"][k]
            assert got == pytest.approx(expected[part]["mp@k"][k], abs=1e-6)
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    assert saved["metrics"]["medium"]["map"] == pytest.approx(expected["medium"]["map"])
    assert saved["settings"]["max_size"] == MAX_SIZE and saved["network"]["backbone"]


def test_query_is_its_box_scaled_like_its_whole_photo(plain, tiny_collection, network) -> None:
    rset = load_revisited(tiny_collection)
    photo = Image.open(rset.query_paths[0])
    x1, y1, x2, y2 = rset.query_boxes[0]
    factor = min(1.0, MAX_SIZE / max(photo.size))
    crop = photo.crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
    size = (round(crop.width * factor), round(crop.height * factor))
    by_hand = np.asarray(crop.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    expected = extract_descriptors(network, ArrayImages([by_hand]), _options())[0]
    vectors = _cached_vectors(Path(plain.conf.cache_dir), "query")
    key = next(k for k in vectors if k.startswith(f"jpg/{rset.query_paths[0].name}\t"))
    assert key.endswith(json.dumps(list(rset.query_boxes[0])))  # keyed by its box too
    np.testing.assert_allclose(vectors[key], expected, atol=1e-5)
    whole = extract_descriptors(
        network, ImageFiles(rset.query_paths[:1], MAX_SIZE, exif_transpose=False), _options()
    )
    assert float(whole[0] @ vectors[key]) < 0.999  # the crop is not the whole photo


def _cached_vectors(cache_dir: Path, role: str) -> dict[str, np.ndarray]:
    """Every cached descriptor of a role, by its cache key."""
    out = {}
    for part in sorted(cache_dir.rglob(f"{role}/part-*.npz")):
        with np.load(part) as saved:
            out.update(zip(saved["keys"].tolist(), saved["head:descriptor"], strict=True))
    return out


def test_gem_beats_a_random_ranking_by_far(plain, tiny_collection) -> None:
    metrics = plain.result["metrics"]
    rset = load_revisited(tiny_collection)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(len(rset.db_paths)) for _ in rset.query_paths])
    chance = evaluate_revisited(shuffled.T, rset.gnd)
    assert metrics["medium"]["map"] > chance["medium"]["map"] + 0.4
    assert metrics["hard"]["map"] > chance["hard"]["map"] + 0.2


def test_partial_copy_is_counted_not_fatal(conf, copy_of) -> None:
    truth = pickle.loads((copy_of / f"gnd_{copy_of.name}.pkl").read_bytes())
    removed_db = truth["imlist"][:5]
    for name in [*removed_db, truth["qimlist"][0]]:
        (copy_of / "jpg" / f"{name}.jpg").unlink()
    (copy_of / "jpg" / f"{truth['imlist'][7]}.jpg").write_bytes(b"not a jpeg at all")
    result = run(conf.replaced(data_root=str(copy_of.parent), max_size=SMALL))
    images = result["images"]
    assert images["db_total"] == len(truth["imlist"]) and images["db_missing"] == 5
    assert images["db_used"] == len(truth["imlist"]) - 6  # 5 missing, 1 unreadable
    assert images["queries_used"] == len(truth["qimlist"]) - 1 and images["queries_missing"] == 1
    (problem,) = images["unusable"]
    assert truth["imlist"][7] in problem["file"] and problem["role"] == "db"
    assert "not a readable image" in problem["reason"]
    assert 0 < result["metrics"]["medium"]["map"] <= 1


def test_descriptors_are_cached_across_post_processing(conf) -> None:
    conf = conf.replaced(max_size=SMALL)  # a cache of its own, from nothing
    first = run(conf)
    assert first["extracted"]["db"] > 0 and first["extracted"]["queries"] > 0
    again = run(conf.replaced(qe_k=2, qe_alpha=3.0))
    assert again["extracted"] == {"db": 0, "queries": 0, "distractors": 0}
    assert again["post_processing"].startswith("αQE")
    other = run(conf.replaced(p=4.0))  # another network setting: extract again
    assert other["extracted"]["db"] > 0


def test_distractors_join_the_database(warm_conf, tiny_collection, tmp_path: Path) -> None:
    """Uncropped copies of the query photos are the hardest distractors there are: they must
    rank high as wrong answers, so mAP falls and the report shows them, if they were used."""
    rset = load_revisited(tiny_collection)
    folder = tmp_path / "distractors" / "jpg"
    folder.mkdir(parents=True)
    for path in rset.query_paths:
        shutil.copy(path, folder / f"copy_{path.name}")
    conf = warm_conf
    plain = run(conf)
    with_distractors = run(conf.replaced(distractors=str(folder)))
    n = with_distractors["images"]["distractors"]
    assert n == len(rset.query_paths) and with_distractors["extracted"]["distractors"] == n
    assert with_distractors["metrics"]["medium"]["map"] < plain["metrics"]["medium"]["map"] - 0.01
    reports = [p.read_text() for p in Path(conf.output).rglob("report.html")]
    assert len(reports) == 2
    assert sum(f"<b>{n}</b> distractors" in text for text in reports) == 1
    assert sum('<span class="tag">distractor</span>' in text for text in reports) == 1


def test_data_root_on_s3(conf, plain, tiny_collection, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    for path in tiny_collection.rglob("*"):
        if path.is_file():
            key = f"revisitop/{tiny_collection.name}/{path.relative_to(tiny_collection)}"
            s3.upload_file(str(path), s3_bucket, key)
    local = plain.result  # the same settings; the S3 copy's photos are described anew
    remote = run(
        dataclasses.replace(
            conf, data_root=f"s3://{s3_bucket}/revisitop", output=f"s3://{s3_bucket}/results"
        )
    )
    assert remote["metrics"]["medium"]["map"] == pytest.approx(local["metrics"]["medium"]["map"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="results/")["Contents"]]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == ["metrics.json", "report.html"]
    saved = json.loads(s3.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read())
    assert saved["metrics"]["medium"]["map"] == pytest.approx(remote["metrics"]["medium"]["map"])


def test_bad_ground_truth_is_named(conf, copy_of) -> None:
    conf = conf.replaced(data_root=str(copy_of.parent))
    gnd_file = copy_of / f"gnd_{copy_of.name}.pkl"
    gnd_file.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=f"gnd_{copy_of.name}.pkl"):
        run(conf)
    gnd_file.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(ValueError, match=r"lacks \['qimlist', 'gnd'\]"):
        run(conf)
    gnd_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"gnd_{copy_of.name}.pkl"):
        run(conf)


def test_every_problem_is_found_first_and_the_rest_is_scored(conf, copy_of, tmp_path) -> None:
    """A box outside its photo, an unreadable database photo, a truncated query photo and an
    unreadable distractor: all reported together, in the output and metrics.json, and every
    other query is still scored."""
    gnd_file = copy_of / f"gnd_{copy_of.name}.pkl"
    truth = pickle.loads(gnd_file.read_bytes())
    truth["gnd"][1]["bbx"] = [10.0, 10.0, 5000.0, 40.0]
    gnd_file.write_bytes(pickle.dumps(truth))
    (copy_of / "jpg" / f"{truth['imlist'][3]}.jpg").write_bytes(b"no photo")
    query2 = copy_of / "jpg" / f"{truth['qimlist'][2]}.jpg"
    query2.write_bytes(query2.read_bytes()[:-3000])  # header intact, data cut short
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    shutil.copy(copy_of / "jpg" / f"{truth['imlist'][0]}.jpg", distractors / "fine.jpg")
    (distractors / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    conf = conf.replaced(
        data_root=str(copy_of.parent), distractors=str(distractors), max_size=SMALL
    )
    result = run(conf)
    problems = {
        (p["role"], Path(p["file"]).name): p["reason"] for p in result["images"]["unusable"]
    }
    assert set(problems) == {
        ("query", f"{truth['qimlist'][1]}.jpg"),
        ("db", f"{truth['imlist'][3]}.jpg"),
        ("query", query2.name),
        ("distractor", "broken.jpg"),
    }
    assert "outside the photo" in problems["query", f"{truth['qimlist'][1]}.jpg"]
    assert "truncated" in problems["query", query2.name]
    images = result["images"]
    assert images["queries_used"] == len(truth["qimlist"]) - 2
    assert images["db_used"] == len(truth["imlist"]) - 1 and images["distractors"] == 1
    assert 0 < result["metrics"]["medium"]["map"] <= 1
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    assert len(saved["images"]["unusable"]) == 4


def test_original_oxford_ground_truth_scores_one_map(warm_conf, copy_of, plain) -> None:
    """cirtorch's oxford5k/paris6k files hold ok/junk per query: one mAP, never NaN."""
    conf = warm_conf
    gnd_file = copy_of / f"gnd_{copy_of.name}.pkl"
    truth = pickle.loads(gnd_file.read_bytes())
    truth["gnd"] = [
        {"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"], "bbx": g["bbx"]}
        for g in truth["gnd"]
    ]
    gnd_file.write_bytes(pickle.dumps(truth))
    result = run(conf.replaced(data_root=str(copy_of.parent)))
    assert result["protocol"] == "original"
    medium = plain.result["metrics"]["medium"]["map"]  # the same positives and junk
    assert result["metrics"]["map"] == pytest.approx(medium, abs=1e-9)
    gnd_file.write_bytes(
        pickle.dumps({**truth, "gnd": [{"bbx": [0, 0, 1, 1]}] * len(truth["qimlist"])})
    )
    with pytest.raises(ValueError, match=r"expected easy/hard/junk .* or ok/junk"):
        run(conf.replaced(data_root=str(copy_of.parent)))


def test_a_pickle_that_would_run_code_is_refused(conf, copy_of, tmp_path) -> None:

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    gnd_file = copy_of / f"gnd_{copy_of.name}.pkl"
    gnd_file.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Payload()]}))
    with pytest.raises(ValueError, match=r"refusing posix\.system|refusing os\.system"):
        run(conf.replaced(data_root=str(copy_of.parent)))
    assert not (tmp_path / "pwned").exists()


def test_printed_like_the_papers() -> None:
    metrics = {
        part: {"map": value, "mp@k": {1: 1.0, 5: 0.8, 10: 0.65}}
        for part, value in (("easy", 0.8481), ("medium", 0.64672), ("hard", 0.38466))
    }
    text = format_metrics("roxford5k", metrics, (1, 5, 10))
    assert text.splitlines()[0] == ">> roxford5k: mAP E: 84.8, M: 64.7, H: 38.5"
    assert "E: [100.0, 80.0, 65.0]" in text.splitlines()[1]


def test_command_line_with_whitening_file(conf, tiny_collection, reference, tmp_path) -> None:
    """The module runs as users run it, flags and all, and applies a saved whitening."""

    rset = load_revisited(tiny_collection)
    m, P = learn_whitening(reference.db, *same_label_pairs(rset.db_labels))
    save_whitening(tmp_path / "lw.npz", m, P)
    args = [
        "--dataset",
        conf.dataset,
        "--data-root",
        conf.data_root,
        "--max-size",
        str(MAX_SIZE),
        "--scales",
        "1",
        "0.7071",
        "--whitening",
        str(tmp_path / "lw.npz"),
        "--whitening-dim",
        "64",
        "--qe-k",
        "2",
        "--qe-alpha",
        "3",
        "--output",
        conf.output,
        "--cache-dir",
        conf.cache_dir,
        "--device",
        "cpu",
    ]
    done = run_stage("evaluate", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f">> {conf.dataset}: mAP E: " in done.stdout
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    assert saved["settings"]["scales"] == [1.0, 0.7071]
    assert saved["post_processing"] == "Lw + αQE(k=2, α=3)"


def test_checkpoint_directory_brings_its_own_network(conf, tmp_path) -> None:
    """A training checkpoint (model.pt + meta.json) is evaluated with the head it was saved with."""
    conf = conf.replaced(max_size=SMALL)  # GeM and MAC still differ there by far more than 1e-6

    torch.manual_seed(0)
    meta = NetworkMeta(backbone="efficientnet_lite0", pooling="mac")
    trained = build_network(meta, "imagenet")
    folder = str(tmp_path / "run" / "checkpoint")
    identity = checkpoint.save(folder, trained)
    result = run(conf.replaced(weights=folder, backbone="resnet50"))
    assert result["network"]["checkpoint"] == identity  # its content, not its file's date
    assert "backbone" not in result["network"]  # the resnet50 flag is not what ran
    mac_imagenet = run(conf.replaced(pooling="mac"))
    assert result["metrics"]["medium"]["map"] == pytest.approx(
        mac_imagenet["metrics"]["medium"]["map"], abs=1e-6
    )


def test_command_line_mistakes_end_in_one_line(tmp_path: Path) -> None:
    done = run_stage("evaluate", "--dataset", "roxford5k", "--data-root", "/nonexistent")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "no data set at /nonexistent/roxford5k" in line and "gnd_<dataset>.pkl" in line
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    flags = [
        "--dataset",
        "x",
        "--data-root",
        str(tmp_path),
        "--weights",
        str(tmp_path / "weights.pt"),
    ]
    done = run_stage("evaluate", *flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "weights.pt is not a readable" in done.stderr
    done = run_stage("evaluate", "--dataset", "x", "--data-root", "/tmp", "--backbone", "resnet9")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "resnet9" in done.stderr and "efficientnet_lite0" in done.stderr
    helptext = run_stage("evaluate", "--help").stdout
    assert "{resnet50,resnet101" in helptext and "{gem,mac,spoc}" in helptext


def test_cache_keys_by_relative_path_and_content(warm_conf, tmp_path: Path) -> None:
    """Two distractors of one name in two folders are two images; a changed photo is
    described anew, the others come from the cache (the collection's from the start)."""
    root = tmp_path / "distractors"
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / folder / "same_name.jpg")
    conf = warm_conf.replaced(distractors=str(root))
    first = run(conf)
    assert first["extracted"]["distractors"] == 2
    vectors = _cached_vectors(Path(conf.cache_dir), "distractors")
    a, b = (vectors[k] for k in sorted(vectors))
    assert sorted(k.split("\t")[0] for k in vectors) == ["a/same_name.jpg", "b/same_name.jpg"]
    assert float(a @ b) < 0.999
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        root / "b" / "same_name.jpg"
    )
    again = run(conf)
    assert again["extracted"] == {"db": 0, "queries": 0, "distractors": 1}


def test_revisited_photos_are_read_in_their_stored_frame(warm_conf, copy_of, network) -> None:
    """An EXIF orientation tag must not turn a revisited photo: its box is in stored pixels.

    The cache also holds the photo as it was (with its old box): the key of the new one is
    found by its box."""
    conf = warm_conf
    truth = pickle.loads((copy_of / f"gnd_{copy_of.name}.pkl").read_bytes())
    path = copy_of / "jpg" / f"{truth['qimlist'][0]}.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(path) as img:
        img.save(path, exif=exif, quality=95)
    width, height = Image.open(path).size
    assert width > height  # landscape as stored: a box across its width would not fit rotated
    box = [0.0, 0.0, float(width), float(height) / 2]
    truth["gnd"][0]["bbx"] = box
    (copy_of / f"gnd_{copy_of.name}.pkl").write_bytes(pickle.dumps(truth))
    result = run(conf.replaced(data_root=str(copy_of.parent)))
    assert result["images"]["unusable"] == []
    stored = extract_descriptors(
        network, ImageFiles([path], MAX_SIZE, [box], exif_transpose=False), _options()
    )[0]
    vectors = _cached_vectors(Path(conf.cache_dir), "query")
    (key,) = [k for k in vectors if path.name in k and k.endswith(json.dumps(box))]
    np.testing.assert_allclose(vectors[key], stored, atol=1e-5)


def test_rerank_verifies_the_top_k_and_keeps_the_figures_without_it(
    warm_conf, tiny_collection, plain
) -> None:
    conf = warm_conf.replaced(rerank=20, local_max_size=256)
    result = run(conf)
    assert result["metrics_without_rerank"] == plain.result["metrics"]
    assert result["post_processing"] == "SV@20" and result["pairs_per_query"] == 20
    medium = (result["metrics_without_rerank"]["medium"]["map"], result["metrics"]["medium"]["map"])
    assert medium[1] > medium[0]
    # the promoted photos are verified by features the test extracts itself, the query's
    # from its box, as the protocol crops it
    rset = load_revisited(tiny_collection)
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    report = (next(Path(conf.output).rglob("report.html"))).read_text()
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    before = result["metrics_without_rerank"]["medium"]["map"]
    assert f'<b data-baseline="medium.map">{100 * before:.1f}</b>' in report
    assert report.count("data-inliers=") >= result["verified_per_query"][0] > 0
    assert report.count('<figure class="matches">') == sum(
        n > 0 for n in result["verified_per_query"]
    )
    options = LocalFeatureOptions(local_max_size=256)
    j = int(np.argmax(result["verified_per_query"]))
    query = read_local_features(
        rset.query_paths[j], options, exif_transpose=False, box=rset.query_boxes[j]
    )
    verified = result["verified"][rset.query_paths[j].stem]
    assert len(verified) == result["verified_per_query"][j] >= 2
    for name, inliers in verified.items():
        photo = read_local_features(
            tiny_collection / "jpg" / f"{name}.jpg", options, exif_transpose=False
        )
        again = verify_pair(query, photo, VerifyOptions())
        assert again.inliers == inliers >= 12
    again = run(conf)
    assert again["photos_extracted"] == 0 and again["metrics"] == result["metrics"]


def test_kreciprocal_reranks_the_database_and_the_verification_takes_its_top_k(
    warm_conf, tiny_collection, plain, reference
) -> None:
    options = KReciprocalOptions(kreciprocal_k1=6, kreciprocal_k2=2)
    flags = {"kreciprocal": True, **dataclasses.asdict(options)}
    result = run(warm_conf.replaced(**flags))
    assert result["metrics_without_rerank"] == plain.result["metrics"]
    assert result["post_processing"] == "k-reciprocal(k1=6, k2=2, λ=0.3)"
    rset = load_revisited(tiny_collection)
    found = kreciprocal_distances(reference.queries, reference.db, options)
    orders = np.argsort(np.stack(list(found)), axis=1, kind="stable")
    expected = evaluate_revisited(orders.T, rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert result["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)
    assert result["metrics"] == result["metrics_with_kreciprocal"] != plain.result["metrics"]
    both = run(warm_conf.replaced(**flags, rerank=8, local_max_size=256))
    assert both["post_processing"] == "k-reciprocal(k1=6, k2=2, λ=0.3) + SV@8"
    assert both["metrics_with_kreciprocal"] == result["metrics"]
    assert both["pairs_per_query"] == 8
    row_of = {p.stem: row for row, p in enumerate(rset.db_paths)}
    columns = []
    for j, query in enumerate(rset.query_paths):
        verified = np.array([row_of[name] for name in both["verified"][query.stem]], np.int64)
        assert set(verified.tolist()) <= set(orders[j, :8].tolist())
        columns.append(np.concatenate([verified, orders[j][~np.isin(orders[j], verified)]]))
    assert any(both["verified_per_query"])
    # verified photos first, most inliers first; then the k-reciprocal ranking without them
    expected = evaluate_revisited(np.stack(columns, axis=1), rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert both["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)


def test_kreciprocal_of_each_querys_top_k_alone(warm_conf, tiny_collection, reference) -> None:
    """``--kreciprocal-top K``, what the service runs: each query's global top K re-ranked over
    the query and those K photos, the rest of the database after them in global order."""
    options = KReciprocalOptions(kreciprocal_k1=6, kreciprocal_k2=2)
    flags = {"kreciprocal": True, "kreciprocal_top": 12, **dataclasses.asdict(options)}
    result = run(warm_conf.replaced(**flags))
    assert result["post_processing"] == "k-reciprocal@12(k1=6, k2=2, λ=0.3)"
    rset = load_revisited(tiny_collection)
    columns = []
    for query in reference.queries:
        ranking = np.argsort(-(reference.db @ query), kind="stable")
        head = ranking[:12][shortlist_order(query, reference.db[ranking[:12]], options)]
        assert sorted(head.tolist()) == sorted(ranking[:12].tolist())
        columns.append(np.concatenate([head, ranking[12:]]))
    expected = evaluate_revisited(np.stack(columns, axis=1), rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert result["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)
    assert any(
        c[:12].tolist() != np.argsort(-(reference.db @ q))[:12].tolist()
        for c, q in zip(columns, reference.queries, strict=True)
    )
    # verification of a top 16, beyond the 12 k-reciprocal ordered: its head, then global order
    both = run(warm_conf.replaced(**flags, rerank=16, local_max_size=256))
    row_of = {p.stem: row for row, p in enumerate(rset.db_paths)}
    final = []
    for j, query in enumerate(rset.query_paths):
        verified = np.array([row_of[name] for name in both["verified"][query.stem]], np.int64)
        assert set(verified.tolist()) <= set(columns[j][:16].tolist())
        final.append(np.concatenate([verified, columns[j][~np.isin(columns[j], verified)]]))
    expected = evaluate_revisited(np.stack(final, axis=1), rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert both["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)
