"""The off-the-shelf comparison on a photo folder: a folder per scene gives mAP, a flat one
neighbours."""

import dataclasses
import json
from pathlib import Path

import pytest

from model.datasets.revisited import load_revisited
from pipeline.compare import CompareConf, main


@pytest.fixture()
def scene_folder(tiny_collection: Path, tmp_path: Path) -> Path:
    """The tiny collection's database views as a folder per landmark (links, not copies)."""
    rset = load_revisited(tiny_collection)
    root = tmp_path / "photos"
    for path, label in zip(rset.db_paths, rset.db_labels, strict=True):
        if label >= 0:
            scene = root / f"landmark{label}"
            scene.mkdir(parents=True, exist_ok=True)
            (scene / path.name).symlink_to(path)
    return root


def _conf(photos: Path, tmp_path: Path) -> CompareConf:
    return CompareConf(
        photos=str(photos),
        output=str(tmp_path / "out"),
        networks=("efficientnet_lite0:imagenet", "efficientnet_lite0:random"),
        poolings=("gem",),
        max_size=256,
    )


def test_scene_folders_give_map(scene_folder: Path, tmp_path: Path, capsys) -> None:
    results = json.loads(Path(main(_conf(scene_folder, tmp_path))).read_text())
    rows = {(r["network"], r["post"]): r["metrics"] for r in results["rows"]}
    pretrained = rows[("efficientnet_lite0 (imagenet)", "plain")]["map"]
    random = rows[("efficientnet_lite0 (random)", "plain")]["map"]
    assert pretrained > 0.8 and pretrained > random
    assert ("efficientnet_lite0 (imagenet)", "αQE(k=2, α=3)") in rows
    printed = capsys.readouterr().out
    assert "mAP (%) on photos" in printed and "efficientnet_lite0 (imagenet)" in printed
    reports = sorted(p.name for p in (tmp_path / "out").glob("report-*.html"))
    assert reports == [
        "report-efficientnet_lite0_imagenet.html",
        "report-efficientnet_lite0_random.html",
    ]


def test_flat_folder_lists_neighbours(scene_folder: Path, tmp_path: Path, capsys) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for link in sorted(scene_folder.glob("*/*.jpg"))[:12]:
        (flat / link.name).symlink_to(link.resolve())
    main(_conf(flat, tmp_path))
    printed = capsys.readouterr().out
    assert "no ground truth" in printed
    assert sum(" -> " in line for line in printed.splitlines()) == 12


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no photos"):
        main(_conf(tmp_path / "empty", tmp_path))


def test_unreadable_photo_is_reported_and_counted_once_per_role(
    scene_folder: Path, tmp_path: Path, capsys
) -> None:
    """A broken photo in a user's folder: named, dropped from both roles, the demo completes."""
    broken = scene_folder / "landmark0" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    n_photos = len(list(scene_folder.glob("*/*.jpg")))
    conf = dataclasses.replace(
        _conf(scene_folder, tmp_path), networks=("efficientnet_lite0:imagenet",)
    )
    results = json.loads(Path(main(conf)).read_text())
    images = results["images"]["efficientnet_lite0:imagenet"]
    assert images["db_total"] == images["queries_total"] == n_photos
    assert images["db_used"] == images["queries_used"] == n_photos - 1
    assert {(p["role"], Path(p["file"]).name) for p in images["unusable"]} == {
        ("db", "broken.jpg"),
        ("query", "broken.jpg"),
    }
    assert "broken.jpg" in capsys.readouterr().out
    assert 0.8 < results["rows"][0]["metrics"]["map"] <= 1
