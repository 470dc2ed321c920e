"""The evaluate stage on a revisited-layout set written by the built-in landmark generator."""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from model.evaluation import evaluate_revisited
from model.extraction import ArrayImages, ExtractOptions, ImageFiles, extract_descriptors
from model.networks import NetworkMeta, build_network
from model.retrieval import rank_by_similarity
from pipeline.benchmarks import load_revisited
from pipeline.evaluate import EvaluateConf, format_revisited, run

MAX_SIZE = 256


@pytest.fixture()
def conf(tiny_collection: Path, tmp_path: Path) -> EvaluateConf:
    return EvaluateConf(
        dataset=tiny_collection.name,
        data_root=str(tiny_collection.parent),
        max_size=MAX_SIZE,
        output=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
        device="cpu",
    )


@pytest.fixture()
def copy_of(tiny_collection: Path, tmp_path: Path) -> Path:
    """A copy of the collection that a test may damage."""
    target = tmp_path / "data" / tiny_collection.name
    shutil.copytree(tiny_collection, target)
    return target


@pytest.fixture(scope="module")
def network():
    return build_network(NetworkMeta(backbone="efficientnet_lite0"), "imagenet").eval()


def _options() -> ExtractOptions:
    return ExtractOptions(device="cpu", progress=False)


def test_figures_equal_the_protocol_on_the_same_ranking(conf, tiny_collection, network) -> None:
    result = run(conf)
    rset = load_revisited(tiny_collection)
    db = extract_descriptors(network, ImageFiles(rset.db_paths, MAX_SIZE), _options())
    queries = extract_descriptors(
        network, ImageFiles(rset.query_paths, MAX_SIZE, rset.query_boxes), _options()
    )
    expected = evaluate_revisited(rank_by_similarity(queries, db).T, rset.gnd, (1, 5, 10))
    for part in ("easy", "medium", "hard"):
        assert result["metrics"][part]["map"] == pytest.approx(expected[part]["map"], abs=1e-6)
        for k in (1, 5, 10):
            got = result["metrics"][part]["mp@k"][k]
            assert got == pytest.approx(expected[part]["mp@k"][k], abs=1e-6)
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    assert saved["metrics"]["medium"]["map"] == pytest.approx(expected["medium"]["map"])
    assert saved["settings"]["max_size"] == MAX_SIZE and saved["network"]["backbone"]


def test_query_is_its_box_scaled_like_its_whole_photo(conf, tiny_collection, network) -> None:
    run(conf)
    rset = load_revisited(tiny_collection)
    photo = Image.open(rset.query_paths[0])
    x1, y1, x2, y2 = rset.query_boxes[0]
    factor = min(1.0, MAX_SIZE / max(photo.size))
    crop = photo.crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
    size = (round(crop.width * factor), round(crop.height * factor))
    by_hand = np.asarray(crop.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    expected = extract_descriptors(network, ArrayImages([by_hand]), _options())[0]
    cached = next(Path(conf.cache_dir).rglob(f"query-{MAX_SIZE}.npz"))
    with np.load(cached) as saved:
        vectors = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))
    key = next(k for k in vectors if k.startswith(rset.query_paths[0].name + "@"))
    np.testing.assert_allclose(vectors[key], expected, atol=1e-5)
    whole = extract_descriptors(network, ImageFiles(rset.query_paths[:1], MAX_SIZE), _options())
    assert float(whole[0] @ vectors[key]) < 0.999  # the crop is not the whole photo


def test_gem_beats_a_random_ranking_by_far(conf, tiny_collection) -> None:
    metrics = run(conf)["metrics"]
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
    result = run(dataclasses.replace(conf, data_root=str(copy_of.parent)))
    images = result["images"]
    assert images["db_total"] == len(truth["imlist"]) and images["db_missing"] == 5
    assert images["db_used"] == len(truth["imlist"]) - 6  # 5 missing, 1 unreadable
    assert images["queries_used"] == len(truth["qimlist"]) - 1 and images["queries_missing"] == 1
    assert any(truth["imlist"][7] in path for path in images["unreadable"])
    assert 0 < result["metrics"]["medium"]["map"] <= 1


def test_descriptors_are_cached_across_post_processing(conf) -> None:
    first = run(conf)
    assert first["extracted"]["db"] > 0 and first["extracted"]["queries"] > 0
    again = run(dataclasses.replace(conf, qe_k=2, qe_alpha=3.0))
    assert again["extracted"] == {"db": 0, "queries": 0, "distractors": 0}
    assert again["post_processing"].startswith("αQE")
    other = run(dataclasses.replace(conf, p=4.0))  # another network setting: extract again
    assert other["extracted"]["db"] > 0


def test_distractors_join_the_database(conf, tiny_collection, tmp_path: Path) -> None:
    """Uncropped copies of the query photos are the hardest distractors there are: they must
    rank high as wrong answers, so mAP falls and the report shows them, if they were used."""
    rset = load_revisited(tiny_collection)
    folder = tmp_path / "distractors" / "jpg"
    folder.mkdir(parents=True)
    for path in rset.query_paths:
        shutil.copy(path, folder / f"copy_{path.name}")
    plain = run(conf)
    with_distractors = run(dataclasses.replace(conf, distractors=str(folder)))
    n = with_distractors["images"]["distractors"]
    assert n == len(rset.query_paths) and with_distractors["extracted"]["distractors"] == n
    assert with_distractors["metrics"]["medium"]["map"] < plain["metrics"]["medium"]["map"] - 0.01
    reports = [p.read_text() for p in Path(conf.output).rglob("report.html")]
    assert len(reports) == 2
    assert sum(f"<b>{n}</b> distractors" in text for text in reports) == 1
    assert sum('<span class="tag">distractor</span>' in text for text in reports) == 1


def test_data_root_on_s3(conf, tiny_collection, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    for path in tiny_collection.rglob("*"):
        if path.is_file():
            key = f"revisitop/{tiny_collection.name}/{path.relative_to(tiny_collection)}"
            s3.upload_file(str(path), s3_bucket, key)
    local = run(conf)
    remote = run(dataclasses.replace(conf, data_root=f"s3://{s3_bucket}/revisitop"))
    assert remote["metrics"]["medium"]["map"] == pytest.approx(local["metrics"]["medium"]["map"])


def test_bad_ground_truth_is_named(conf, copy_of) -> None:
    conf = dataclasses.replace(conf, data_root=str(copy_of.parent))
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


def test_box_outside_its_photo_is_named(conf, copy_of) -> None:
    gnd_file = copy_of / f"gnd_{copy_of.name}.pkl"
    truth = pickle.loads(gnd_file.read_bytes())
    truth["gnd"][1]["bbx"] = [10.0, 10.0, 5000.0, 40.0]
    gnd_file.write_bytes(pickle.dumps(truth))
    with pytest.raises(ValueError, match=rf"outside .*{truth['qimlist'][1]}\.jpg"):
        run(dataclasses.replace(conf, data_root=str(copy_of.parent)))


def test_printed_like_the_papers() -> None:
    metrics = {
        part: {"map": value, "mp@k": {1: 1.0, 5: 0.8, 10: 0.65}}
        for part, value in (("easy", 0.8481), ("medium", 0.64672), ("hard", 0.38466))
    }
    text = format_revisited("roxford5k", metrics, (1, 5, 10))
    assert text.splitlines()[0] == ">> roxford5k: mAP E: 84.8, M: 64.7, H: 38.5"
    assert "E: [100.0, 80.0, 65.0]" in text.splitlines()[1]


def test_command_line_with_whitening_file(conf, tiny_collection, network, tmp_path) -> None:
    """The module runs as users run it, flags and all, and applies a saved whitening."""
    import subprocess
    import sys

    from model.whitening import learn_whitening, save_whitening
    from pipeline.benchmarks import same_label_pairs

    rset = load_revisited(tiny_collection)
    db = extract_descriptors(network, ImageFiles(rset.db_paths, MAX_SIZE), _options())
    m, P = learn_whitening(db, *same_label_pairs(rset.db_labels))
    save_whitening(tmp_path / "lw.npz", m, P)
    args = [
        sys.executable, "-m", "pipeline.evaluate",
        "--dataset", conf.dataset, "--data-root", conf.data_root,
        "--max-size", str(MAX_SIZE), "--scales", "1", "0.7071",
        "--whitening", str(tmp_path / "lw.npz"), "--whitening-dim", "64",
        "--qe-k", "2", "--qe-alpha", "3",
        "--output", conf.output, "--cache-dir", conf.cache_dir, "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f">> {conf.dataset}: mAP E: " in done.stdout
    saved = json.loads(next(Path(conf.output).rglob("metrics.json")).read_text())
    assert saved["settings"]["scales"] == [1.0, 0.7071]
    assert saved["post_processing"] == "Lw + αQE(k=2, α=3)"


def test_checkpoint_directory_brings_its_own_network(conf, tmp_path) -> None:
    """A training checkpoint (model.pt + meta.json) is evaluated with the head it was saved with."""
    import torch

    from model.networks import save_network

    torch.manual_seed(0)
    meta = NetworkMeta(backbone="efficientnet_lite0", pooling="mac")
    trained = build_network(meta, "imagenet")
    checkpoint = save_network(trained, tmp_path / "run" / "checkpoint")
    result = run(dataclasses.replace(conf, weights=str(checkpoint), backbone="resnet50"))
    assert result["network"]["checkpoint"].startswith(str(checkpoint / "model.pt"))
    assert "backbone" not in result["network"]  # the resnet50 flag is not what ran
    mac_imagenet = run(dataclasses.replace(conf, pooling="mac"))
    assert result["metrics"]["medium"]["map"] == pytest.approx(
        mac_imagenet["metrics"]["medium"]["map"], abs=1e-6
    )
