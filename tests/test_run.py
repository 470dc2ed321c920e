"""pipeline.run: the whole chain from photos to an index in one command, its config file, and
the run folder it leaves (each stage under its fixed name, resumable)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.index_store import read_manifest
from model import tables
from model.tables import code_version
from pipeline.run import LAYOUT, STAGES, RunConf, resolved_config, run
from tests.helpers import (
    REPO,
    run_stage,
    synthetic_descriptors,
    synthetic_sfm,
    write_images,
)
from tests.helpers import (
    SMALL_RUN as SMALL,
)


def _config(tmp_path: Path, sections: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_print_config_resolves_every_stage_s_flags(tmp_path: Path) -> None:
    conf = RunConf(source="photos", output=str(tmp_path / "run"), config=_config(tmp_path, SMALL))
    resolved = resolved_config(conf)
    wired_once = [s for s in STAGES if s != "extract-trained"]  # both extracts: one section
    assert list(resolved) == [*wired_once, "report"]
    assert resolved["extract"]["max_size"] == 128 and resolved["train"]["epochs"] == 1
    assert resolved["index"]["descriptors"] == str(tmp_path / "run" / "descriptors-trained")
    assert resolved["train"]["pairs"] == str(tmp_path / "run" / "pairs")
    assert resolved["sfm"]["timeout_s"] == 3600.0  # a default, written out
    assert resolved["index"]["local_features"] is None  # pinned only when asked for
    asked = resolved_config(dataclasses.replace(conf, local_features=True))
    assert asked["index"]["local_features"] == asked["features"]["output"]
    assert asked["features"]["output"] == str(tmp_path / "run" / "local_features")
    done = run_stage("run", "--source", "photos", "--output", "run", "--print-config")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["ingest"]["source"] == "photos"


@pytest.mark.parametrize("example", ["laptop", "cluster"])
def test_the_example_configs_are_valid(example: str) -> None:
    config = str(REPO / "configs" / f"{example}.yaml")
    resolved = resolved_config(RunConf(source="s3://b/photos", output="s3://b/run", config=config))
    for section, flags in yaml.safe_load(Path(config).read_text()).items():
        if section != "serve":  # written out only for a run with --serve
            assert flags.items() <= resolved[section].items()


def test_from_a_stage_needs_the_stages_before_it(tmp_path: Path) -> None:
    done = run_stage("run", "--source", "photos", "--output", str(tmp_path), "--from", "train")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().startswith(
        "error: --from-stage: not complete in the run folder: ingest ("
    )


def test_a_run_folder_of_another_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"source": "s3://b/other", "stages": {}}))
    done = run_stage("run", "--source", "photos", "--output", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: --output: {tmp_path} holds the run of s3://b/other, not of photos; "
        "give another run folder (or the same --source)"
    ), done.stderr[-2000:]


def test_the_cirray_command_runs_each_stage(tmp_path: Path) -> None:
    cirray = Path(sys.executable).parent / "cirray"
    done = subprocess.run(
        [cirray, "run", "--source", "photos", "--output", "run", "--print-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "ingest:" in done.stdout, done.stderr[-2000:]
    version = subprocess.run([cirray, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"cirray {code_version()}"
    assert version.stdout.startswith(f"cirray {importlib.metadata.version('cirray')}")
    stage_version = run_stage("index", "--version")
    assert stage_version.returncode == 0 and stage_version.stdout == version.stdout
    wrong = subprocess.run([cirray, "extrct"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "'extrct' is not one of: run, ingest" in wrong.stderr


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        ({"train": {"epochs": "two"}}, "--config: train.epochs must be int, not 'two'"),
        ({"trian": {"epochs": 1}}, "--config: no stage 'trian' (did you mean 'train'?)"),
        (
            {"index": {"output": "elsewhere"}},
            "--config: index.output is set by the run from its folder",
        ),
    ],
)
def test_a_bad_config_is_named_before_any_work(tmp_path: Path, sections, line) -> None:
    conf = RunConf(
        source="photos", output=str(tmp_path / "run"), config=_config(tmp_path, sections)
    )
    with pytest.raises(ValueError) as err:
        run(conf)
    assert str(err.value) == line
    assert not (tmp_path / "run").exists()


def test_a_bad_config_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _config(tmp_path, {"extract": {"max_sise": 64}})
    done = run_stage("run", "--source", "photos", "--output", "run", "--config", config)
    assert done.returncode == 2, done.stderr[-2000:]
    line = "error: --config: extract has no flag 'max_sise' (did you mean 'max_size'?)"
    assert done.stderr.strip() == line


def test_photos_that_give_no_training_pairs_are_indexed_off_the_shelf(
    ray_session, tiny_collection: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    photos = sorted((tiny_collection / "jpg").glob("*.jpg"))[:6]
    images = write_images(out, photos)
    ids = tables.IMAGES.read(str(images), ["image_id"])["image_id"].to_pylist()
    synthetic_descriptors(str(out / LAYOUT["extract"]), ids)
    synthetic_sfm(str(out / LAYOUT["sfm"]), clusters=2, photos=1)  # no model of two photos
    caplog.set_level(logging.WARNING)
    run(RunConf(source="photos", output=str(out), from_stage="pairs"))
    summary = json.loads((out / "run.json").read_text())
    assert summary["stages"]["train"] == {"skipped": "no training pairs"}
    assert "extract-trained" not in summary["stages"]
    assert any("skipping training" in r.getMessage() for r in caplog.records)
    index = read_manifest(str(out / "index"))
    assert index["count"] == len(ids) and index["network"]["weights"] == "imagenet"
    assert index["descriptors"]["uri"] == str(out / LAYOUT["extract"])
    assert "Skipped: no training pairs" in (out / "report.html").read_text()


def test_a_source_with_nothing_usable_is_one_line(ray_session, tmp_path: Path) -> None:
    empty, unreadable = tmp_path / "empty", tmp_path / "unreadable"
    empty.mkdir()
    unreadable.mkdir()
    for name in ("a.jpg", "b.png"):
        (unreadable / name).write_text("not a photo")
    with pytest.raises(ValueError) as err:
        run(RunConf(source=str(empty), output=str(tmp_path / "run-empty")))
    assert str(err.value) == f"stage ingest: no photos (.jpg, .jpeg, .png) under {empty}"
    out = tmp_path / "run-unreadable"
    with pytest.raises(ValueError) as err:
        run(RunConf(source=str(unreadable), output=str(out)))
    assert str(err.value) == (
        f"--source {unreadable}: none of its photos could be read (2 not an image); each "
        f"photo's reason is in {out / 'images.parquet'} (column error)"
    )
    assert not (out / LAYOUT["extract"]).exists()  # stopped before any other stage
