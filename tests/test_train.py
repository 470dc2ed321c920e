"""The train stage on Ray Train, CPU workers: GeM mode on the built-in landmarks' SfM pairs, CGD
mode on a small generated collection's landmark labels."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from bench.train import scene_pairs
from model import checkpoint, storage, tables
from model.datasets.landmarks import generate, write_scene_manifest
from model.datasets.landmarks.conf import LandmarksConf
from model.describer import NetworkSettings, load_extract_network
from model.descriptors import read_descriptors
from model.training_set import read_training_set
from model.whitening import apply_whitening
from model.whitening_fit import LwFit, held_out_whitening, read_whitening_pairs
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from pipeline.train import CgdPart, GemPart, TrainConf, initial_network
from pipeline.train import run as train
from tests.conftest import new_bucket

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(ray_session, tiny_collection: Path, tmp_path_factory) -> dict[str, str]:
    """ingest → group (scene column) → sfm → pairs of the tiny collection's 3 landmarks."""

    tmp = tmp_path_factory.mktemp("train")
    pairs, images = scene_pairs(tiny_collection, tmp)
    return {"pairs": pairs, "images": images, "tmp": str(tmp)}


def _conf(pairs: dict[str, str], out: Path | str, **changes) -> TrainConf:
    base = TrainConf.from_flags(
        pairs=pairs["pairs"],
        images=pairs["images"],
        output=str(out),
        epochs=2,
        image_size=128,
        val_size=128,
        queries=12,
        nnum=1,
        held_out=0.3,
        lr=1e-5,
        tuples_per_step=3,
        name="t",
        whiten=False,
    )
    return base.replaced(**changes)


def _epochs(best: str) -> list[dict]:
    return json.loads(storage.read_text(storage.join(best, "metrics.json")))["epochs"]


TWO_WORKERS = {"tuples_per_step": 3, "device_batch": 2}
"""Three tuples a step, two images a forward pass: rank 0 makes 3 passes a step, rank 1 makes 2."""
WITH_LW = {"whiten": True, "whiten_size": 160, "val_size": None, "keep_whitening": "always"}
"""Validation at extract's size, with the Lw the output keeps."""
FIXED_LW = {"whiten_shrinkage": 0.0, "whiten_dim": 1280}
"""Validation's Lw with its settings given, not cross-validated: for tests about training."""


@pytest.fixture(scope="module")
def trained(pairs, s3_server) -> dict:
    """One worker, 2 epochs, Lw learned, output and Ray Train's storage on the loopback S3
    server, as on a cluster; trained on what the pairs stage returned (``scene_pairs`` chains
    the stages' return values). Returns its ``conf``, ``best`` and ``epochs`` as it ended."""
    conf = _conf(pairs, f"s3://{new_bucket(s3_server)}/train", **WITH_LW, **TWO_WORKERS)
    best = train(conf)
    return {"conf": conf, "best": best, "epochs": _epochs(best)}


def test_training_checkpoints_the_best_epoch_and_resumes(pairs, trained, tmp_path, caplog) -> None:
    """Its checkpoints, Lw and figures; then the same settings skip, others are named, and
    only ``--epochs`` raised resumes."""
    conf, best, out = trained["conf"], trained["best"], trained["conf"].output
    assert best == out
    names = {f.removeprefix(f"{out}/") for f in storage.list_files(out)}
    assert names >= {
        "model.pt",
        "meta.json",
        "metrics.json",
        "curves.png",
        "whitening.npz",
        "manifest.json",
    }
    checkpoints = {n.split("/")[2] for n in names if re.match(r"ray/t/checkpoint_\d", n)}
    assert len(checkpoints) == 2  # Ray Train's storage: OUTPUT/ray, on S3 too
    lw = json.loads(storage.read_text(f"{out}/metrics.json"))["whitening"]
    assert lw["learned"] and lw["kept"] and lw["pairs"] >= 10 and 0 < lw["val_map"] <= 1
    assert 0 < lw["val_map_lw"] <= 1 and 0 <= lw["shrinkage"] <= 1
    assert lw["cross_validation"]["folds"] >= 2  # shrinkage and dim chosen on training clusters
    _, whitening = load_extract_network(NetworkSettings(weights=best))
    assert whitening is not None and whitening[1].shape == (lw["dim"], 1280)  # extract applies it
    lw_m, lw_P = whitening
    epochs = trained["epochs"]
    assert _epochs(best) == epochs
    assert all(0 < e["val_map_lw"] <= 1 for e in epochs)  # held-out mAP with Lw, every epoch
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[0]["val_map"] is not None and epochs[0]["loss"] is None  # off-the-shelf
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in epochs[1:])
    per_epoch = epochs[1]["steps"]
    assert per_epoch > 0 and epochs[2]["steps"] == 2 * per_epoch
    assert sum(e["best"] for e in epochs) == 1
    # kept: the epoch whose figure with its Lw is highest (--keep-whitening always hands Lw on)
    marked = max(epochs, key=lambda e: (e["val_map_lw"], e["val_map"], -e["epoch"]))
    assert next(e for e in epochs if e["best"]) == marked
    # validation scored the epochs at extract's size (--whiten-size) with the Lw the output
    # holds: extract's descriptors of the output give the held-out clusters that mAP
    extracted = extract(
        ExtractConf.from_flags(
            images=pairs["images"], output=str(tmp_path / "d"), weights=best, max_size=160
        )
    )
    desc = read_descriptors(extracted)
    # found["val_map"]: the held-out clusters' mAP of these (already whitened) descriptors. The
    # Lw fitted beside it plays no part in that figure, so its settings are given rather than
    # cross-validated again
    *_, found = held_out_whitening(
        desc.image_ids,
        desc.vectors,
        read_training_set(pairs["pairs"]),
        pairs=read_whitening_pairs(pairs["pairs"]),
        held_out=0.3,
        fit=LwFit(whiten_shrinkage=0.0, whiten_dim=desc.vectors.shape[1]),
    )
    print(f"\nbest epoch + Lw {marked['val_map_lw']:.4f}, extracted {found['val_map']:.4f}")
    assert marked["val_map_lw"] == pytest.approx(found["val_map"], abs=1e-3)
    assert checkpoint.load(best).network.meta.backbone == "efficientnet_lite0"  # extract takes it
    manifest = tables.TRAIN_OUTPUT.manifest(out)
    assert set(manifest.inputs) == {"pairs", "images", "start"}
    assert manifest.inputs["pairs"] == tables.PAIRS_OUTPUT.manifest(pairs["pairs"]).identity
    assert manifest.details["checkpoint"] == checkpoint.identity(out)
    # the same content settings again (other workers, another run name): nothing runs
    caplog.set_level(logging.INFO, logger="pipeline.train")
    assert train(replace(conf, workers=2, name="other")) == out
    assert "is complete; skipping" in caplog.text
    assert set(storage.list_files(out)) == {f"{out}/{n}" for n in names}
    assert tables.TRAIN_OUTPUT.manifest(out) == manifest
    # another learning rate: one line naming it, the output left whole
    with pytest.raises(tables.OutputChanged) as err:
        train(replace(conf, lr=1e-4))
    message = str(err.value)
    assert "lr: 1e-05 → 0.0001" in message and "--overwrite" in message and "\n" not in message
    assert tables.TRAIN_OUTPUT.is_complete(out)
    # the GeM paper's second round starts from Lw folded into the head's FC layer: the start
    # network describes as the output's network with its Lw applied
    second = _conf(pairs, tmp_path / "folded", weights=best, fold_whitening=True, epochs=1)
    folded = initial_network(second).eval()
    assert folded.meta.whitening_dim == lw["dim"]
    photos = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        plain = checkpoint.load(best).network(photos).numpy()
        np.testing.assert_allclose(
            folded(photos).numpy(), apply_whitening(plain, lw_m, lw_P), atol=1e-4
        )
    # only --epochs raised: resumes from Ray Train's checkpoints after epoch 2
    again = _epochs(train(conf.replaced(epochs=3)))
    assert again[:3] == [{**e, "best": again[i]["best"]} for i, e in enumerate(epochs)]
    assert again[3]["steps"] == 3 * per_epoch


@pytest.fixture(scope="module")
def killed_run(pairs, tmp_path_factory) -> dict:
    """2 workers, 2 epochs; SIGKILL to rank 1 (its pid from its own log line) once the first
    checkpoint exists. Returns the run's ``epochs``, the ``killed`` pid and every rank-1 pid
    ``started``.

    Epoch 1 has run whole by then (its figures are in that checkpoint), so the run serves
    both the restart test and the comparison with one worker's first epoch."""

    tmp = tmp_path_factory.mktemp("killed")
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    conf = _conf(
        pairs,
        tmp,
        workers=2,
        epochs=2,
        name="killed",
        max_failures=2,
        **WITH_LW,
        **FIXED_LW,
        **TWO_WORKERS,
    )
    storage_dir = tmp / "ray" / "killed"
    killed: list[int] = []

    def kill_rank_one() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list(storage_dir.glob("checkpoint_*")):
                for log in logs.glob("worker-*.out"):
                    text = log.read_text(errors="replace")
                    for pid in re.findall(r"cirray-train killed rank 1 of 2 pid (\d+)", text):
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        killed.append(int(pid))
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    epochs = _epochs(train(conf))
    killer.join(timeout=5)
    started = set()
    for log in logs.glob("worker-*.out"):
        started |= set(
            re.findall(
                r"cirray-train killed rank 1 of 2 pid (\d+)", log.read_text(errors="replace")
            )
        )
    return {"epochs": epochs, "killed": killed, "started": started}


def test_two_workers_reproduce_one_workers_first_epoch(trained, killed_run) -> None:
    """The same global batch of tuples and seed: 2 workers' epoch-1 loss and held-out mAP equal
    1 worker's (DDP averages the workers' gradients of each step's shares of one batch). Three
    tuples a step, two images a forward pass: rank 0 makes 3 passes a step, rank 1 makes 2.
    The 2 workers' epoch 1 is that of ``killed_run``, whole before its kill."""
    one, two = trained["epochs"], killed_run["epochs"]
    print(
        f"\nepoch-1 loss: 1 worker {one[1]['loss']:.9f}, 2 workers {two[1]['loss']:.9f}; "
        f"held-out mAP {one[1]['val_map']:.6f} and {two[1]['val_map']:.6f}"
    )
    assert one[1]["steps"] == two[1]["steps"] > 1  # more than one step: updates compared too
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-4)
    assert two[1]["val_map"] == pytest.approx(one[1]["val_map"], abs=1e-4)


def test_a_killed_worker_resumes_from_the_last_checkpoint(killed_run) -> None:
    """SIGKILL to rank 1 once the first checkpoint exists: the run restarts its workers from
    that checkpoint and still ends with every epoch's steps."""
    assert killed_run["killed"], "rank 1 was never seen running"
    started = killed_run["started"]
    assert len(started) >= 2, f"no new rank 1 after the kill: {started}"  # the group restarted
    epochs = killed_run["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    per_epoch = epochs[1]["steps"]
    assert per_epoch > 0 and epochs[2]["steps"] == 2 * per_epoch


def test_cgd_mode_trains_on_classes_and_scores_recall_on_held_out_ones(
    ray_session, tmp_path, monkeypatch
) -> None:
    """Run from the output's folder with relative paths, as the README's commands are: the
    workers, which run elsewhere, get them made absolute."""

    small = LandmarksConf(
        name="landmarks-cgd",
        num_landmarks=6,
        views_per_landmark=6,
        queries_per_landmark=1,
        num_distractors=0,
        image_size=(160, 120),
        allow_few_views=True,
    )
    root = generate(small, tmp_path)
    manifest = write_scene_manifest(root, tmp_path / "photos.csv")
    ingest(IngestConf(source=str(manifest), output=str(tmp_path / "run")))
    monkeypatch.chdir(tmp_path)
    conf = TrainConf.from_flags(
        images="run/images.parquet",
        output="cgd",
        mode="cgd",
        name="cgd",
        epochs=2,
        image_size=96,
        classes_per_batch=2,
        photos_per_class=3,
        held_out=0.34,
        lr=1e-4,
    )
    best = train(conf)
    assert best == str(tmp_path.resolve() / "cgd")
    payload = json.loads(Path(best, "metrics.json").read_text())
    epochs = payload["epochs"]
    assert payload["score"] == "val_recall@1" and [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:
        assert all(0 <= e[f"val_recall@{k}"] <= 1 for k in (1, 2, 4, 8))
    assert epochs[2]["loss"] < epochs[1]["loss"]  # triplet + label-smoothed cross-entropy
    assert epochs[1]["steps"] == 4 and epochs[1]["images_per_s"] > 0  # 4 classes × 7 / (2 × 3)
    meta = checkpoint.load(best).network.meta
    assert (meta.head, meta.num_classes, meta.descriptors) == ("cgd", 4, "SG")
    assert meta.remove_last_stride and not meta.learn_p  # the CGD paper's defaults
    with pytest.raises(ValueError, match=r"4 training classes: .* = 6 of them"):
        train(conf.replaced(classes_per_batch=3, workers=2, output="other"))  # before any worker


def test_bad_settings_are_named_when_they_are_made() -> None:
    """Each part checks itself: the Python API gets the command line's checks."""
    with pytest.raises(ValueError) as err:
        TrainConf.from_flags(
            images="i", output="o", workers=3, tuples_per_step=2, precision="fp16", mode="gem"
        )
    message = str(err.value)
    assert "--pairs is needed in GeM mode" in message
    assert "--tuples-per-step 2 must be at least --workers 3" in message
    assert "--precision 'fp16'" in message
    with pytest.raises(ValueError, match="--nnum must be at least 1, not 0"):
        GemPart(nnum=0)
    with pytest.raises(ValueError, match=r"--whiten-shrinkage is a share in \[0, 1\], not 2"):
        TrainConf.from_flags(images="i", output="o", pairs="p", whiten_shrinkage=2.0)
    with pytest.raises(TypeError, match="TrainConf has no setting shrinkage"):
        TrainConf.from_flags(images="i", output="o", pairs="p", shrinkage=0.5)
    with pytest.raises(ValueError, match="--photos-per-class must be at least 2"):
        CgdPart(photos_per_class=1)
    with pytest.raises(ValueError, match="--fold-whitening needs --weights"):
        TrainConf.from_flags(images="i", output="o", mode="cgd", fold_whitening=True)


def test_bad_inputs_are_named_before_anything_runs(tmp_path) -> None:
    with pytest.raises(
        ValueError, match="--trainable-stages 10: the trunk of --weights imagenet has 9 stages"
    ):
        train(
            TrainConf(
                images=str(tmp_path), output=str(tmp_path / "o"), mode="cgd", trainable_stages=10
            )
        )
    with pytest.raises(ValueError, match=r"--images: .*none"):  # named before any worker starts
        train(
            TrainConf(
                images=str(tmp_path / "none"), output=str(tmp_path / "o"), pairs=str(tmp_path)
            )
        )
