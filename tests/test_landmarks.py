"""The renderer is geometrically exact, and the landmark collection is deterministic, complete and
has a ground truth that agrees with its saved camera geometry."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest

from model import storage, tables
from model.datasets import landmarks
from model.datasets.landmarks import (
    CONFS,
    DatasetConflictError,
    IncompleteDatasetError,
    LandmarksConf,
    build_scene,
    camera_from_record,
    covisibility,
    generate,
    load_ground_truth,
    visible_points,
)
from model.datasets.landmarks.render import Camera, TexturedQuad, intrinsics, look_at, render

TINY = CONFS["tiny"]
# A collection small enough to generate in well under a second, for the publishing tests.
SMALL = dataclasses.replace(
    TINY,
    name="landmarks-small",
    num_landmarks=1,
    views_per_landmark=4,
    queries_per_landmark=1,
    num_distractors=1,
    image_size=(96, 72),
    allow_few_views=True,
)
BACKGROUND = (10.0, 20.0, 30.0)


# --------------------------------------------------------------------------------------------
# Renderer


def _cell_colours(cols: int, rows: int) -> np.ndarray:
    """A distinct colour per checkerboard cell [rows, cols, 3]."""
    i, j = np.meshgrid(np.arange(cols), np.arange(rows))
    return np.stack([40 + 25 * i, 40 + 30 * j, 200 - 20 * ((i + j) % 2)], axis=-1).astype(np.uint8)


def _checkerboard(cols: int = 8, rows: int = 6, cell: int = 16) -> np.ndarray:
    return np.repeat(np.repeat(_cell_colours(cols, rows), cell, axis=0), cell, axis=1)


def _ray_plane_depth(camera: Camera, pixels: np.ndarray, quad: TexturedQuad) -> np.ndarray:
    """Camera z where the rays through `pixels` [N, 2] meet the quad's plane (independent maths)."""
    rays = np.column_stack([pixels, np.ones(len(pixels))]) @ np.linalg.inv(camera.K).T
    normal_cam = camera.R @ quad.normal
    origin_cam = camera.R @ quad.origin + camera.t
    return (origin_cam @ normal_cam) / (rays @ normal_cam)  # rays have z = 1


@pytest.mark.parametrize("supersample", [1, 2, 3])
def test_render_maps_texture_where_camera_projects(supersample: int) -> None:
    cols, rows = 8, 6
    quad = TexturedQuad(
        (-2.0, 0.0, 3.0), (4.0, 0.0, 0.0), (0.0, 0.0, -3.0), _checkerboard(cols, rows)
    )
    camera = look_at(
        (3.0, -6.0, 2.6), (0.0, 0.0, 1.5), (0, 0, 1), K=intrinsics(150.0, 200, 150), size=(200, 150)
    )
    image, depth = render([quad], camera, BACKGROUND, supersample=supersample)

    s, t = np.meshgrid((np.arange(cols) + 0.5) / cols, (np.arange(rows) + 0.5) / rows)
    uv, z = camera.project(quad.point(s.ravel(), t.ravel()))
    pixels = np.rint(uv).astype(int)
    assert np.all((pixels >= 0) & (pixels < [200, 150])), "the test pose must see every cell"
    got = image[pixels[:, 1], pixels[:, 0]].astype(int)
    np.testing.assert_allclose(got, _cell_colours(cols, rows).reshape(-1, 3), atol=3)
    expected = _ray_plane_depth(camera, pixels.astype(float), quad)
    np.testing.assert_allclose(depth[pixels[:, 1], pixels[:, 0]], expected, rtol=1e-4)
    np.testing.assert_allclose(expected, z, rtol=0.05)  # pixel centres lie near the cell centres


def test_render_leaves_background_and_infinite_depth_where_empty() -> None:
    quad = TexturedQuad((-1.0, 0.0, 1.0), (2.0, 0.0, 0.0), (0.0, 0.0, -2.0), _checkerboard())
    camera = look_at(
        (0.0, -5.0, 0.0), (0.0, 0.0, 0.0), (0, 0, 1), K=intrinsics(50.0, 100, 80), size=(100, 80)
    )
    image, depth = render([quad], camera, BACKGROUND)
    assert tuple(image[2, 2]) == (10, 20, 30)
    assert np.isinf(depth[2, 2])
    assert np.isfinite(depth[40, 50])


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_nearer_quad_wins_whatever_the_drawing_order(order: tuple[int, int]) -> None:
    red = np.full((8, 8, 3), (255, 0, 0), dtype=np.uint8)
    blue = np.full((8, 8, 3), (0, 0, 255), dtype=np.uint8)
    camera = look_at(
        (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0, 0, 1), K=intrinsics(100.0, 120, 100), size=(120, 100)
    )
    near = TexturedQuad((-1.0, 5.0, 1.0), (2.0, 0.0, 0.0), (0.0, 0.0, -2.0), red)  # 40 px wide
    far = TexturedQuad((-4.0, 8.0, 1.0), (8.0, 0.0, 0.0), (0.0, 0.0, -2.0), blue)  # 100 px wide
    quads = [near, far]
    image, depth = render([quads[i] for i in order], camera, BACKGROUND)
    centre = (50, 60)  # row, column: both quads cover it
    assert tuple(image[centre]) == (255, 0, 0)
    assert depth[centre] == pytest.approx(5.0, rel=1e-5)
    side = (50, 20)  # only the far quad
    assert tuple(image[side]) == (0, 0, 255)
    assert depth[side] == pytest.approx(8.0, rel=1e-5)


def test_level_ground_seen_from_eye_height_has_exact_depth() -> None:
    ground = TexturedQuad(
        (-100.0, 100.0, 0.0), (200.0, 0.0, 0.0), (0.0, -200.0, 0.0), _checkerboard()
    )
    height, focal = 1.5, 80.0
    camera = look_at(
        (0.0, 0.0, height),
        (0.0, 1.0, height),
        (0, 0, 1),
        K=intrinsics(focal, 160, 120),
        size=(160, 120),
    )
    image, depth = render([ground], camera, BACKGROUND)
    horizon = camera.K[1, 2]
    rows = np.arange(120)
    sky_rows = rows < horizon - 2
    assert np.all(np.isinf(depth[sky_rows]))
    assert np.all(image[sky_rows] == np.array(BACKGROUND, dtype=np.uint8))
    # The plane reaches 100 m ahead; rows below 1.2 px of the horizon see it nearer than that.
    ground_rows = rows > horizon + height * focal / 100.0 + 1
    expected = height * focal / (rows[ground_rows] - horizon)
    np.testing.assert_allclose(depth[ground_rows, 80], expected, rtol=1e-4)


@pytest.mark.parametrize("supersample", [1, 2])
def test_quad_reaching_behind_the_camera_renders_only_in_front(supersample: int) -> None:
    """A ground plane under and behind a tilted, rolled camera: drawn exactly where the rays hit
    it in front of the camera, with no mirrored copy where they hit it behind (what a homography
    applied without clipping draws) and no crash."""
    ground = TexturedQuad(
        (-100.0, 100.0, 0.0), (200.0, 0.0, 0.0), (0.0, -200.0, 0.0), _checkerboard()
    )
    camera = look_at(
        (3.0, -2.0, 1.5),
        (-5.0, 10.0, 0.5),
        (0, 0, 1),
        K=intrinsics(60.0, 160, 120),
        size=(160, 120),
        roll=0.6,
    )
    image, depth = render([ground], camera, BACKGROUND, supersample=supersample)
    xs, ys = np.meshgrid(np.arange(160.0), np.arange(120.0))
    pixels = np.column_stack([xs.ravel(), ys.ravel()])
    plane_depth = _ray_plane_depth(camera, pixels, ground)
    rays = np.column_stack([pixels, np.ones(len(pixels))]) @ np.linalg.inv(camera.K).T
    hits = camera.centre + plane_depth[:, None] * (rays @ camera.R)
    reach = np.abs(hits[:, :2]).max(axis=1)

    # Pixels next to an edge are partly covered at supersample 2: judge only those whose
    # neighbours fall in the same case.
    def away_from_edges(case: np.ndarray) -> np.ndarray:
        return cv2.erode(case.reshape(120, 160).astype(np.uint8), np.ones((3, 3))).astype(bool)

    behind = away_from_edges(plane_depth < 0)
    beyond = away_from_edges((plane_depth > 0) & (reach > 100))
    inside = away_from_edges((plane_depth > 0) & (plane_depth < 20) & (reach < 100))
    assert behind.sum() > 1000 and inside.sum() > 1000, "the pose must show both cases"
    for empty in (behind, beyond):
        assert np.all(np.isinf(depth[empty]))
        assert np.all(image[empty] == np.array(BACKGROUND, dtype=np.uint8))
    np.testing.assert_allclose(depth[inside], plane_depth.reshape(120, 160)[inside], rtol=1e-4)


def test_single_sided_quad_is_invisible_from_behind() -> None:
    texture = np.full((4, 4, 3), 200, dtype=np.uint8)
    camera = look_at(
        (0.0, -5.0, 0.0), (0.0, 0.0, 0.0), (0, 0, 1), K=intrinsics(50.0, 64, 48), size=(64, 48)
    )
    facing_away = dict(origin=(1.0, 0.0, 1.0), u_axis=(-2.0, 0.0, 0.0), v_axis=(0.0, 0.0, -2.0))
    assert np.dot(TexturedQuad(texture=texture, **facing_away).normal, camera.centre) < 0
    hidden, _ = render([TexturedQuad(texture=texture, double_sided=False, **facing_away)], camera)
    shown, _ = render([TexturedQuad(texture=texture, double_sided=True, **facing_away)], camera)
    assert hidden.max() == 0
    assert shown[24, 32].tolist() == [200, 200, 200]


def test_look_at_puts_the_target_at_the_principal_point() -> None:
    K = intrinsics(100.0, 64, 48)
    camera = look_at((3.0, -4.0, 2.0), (0.0, 0.0, 1.0), (0, 0, 1), K=K, size=(64, 48))
    np.testing.assert_allclose(camera.centre, [3.0, -4.0, 2.0], atol=1e-12)
    uv, z = camera.project(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]))
    np.testing.assert_allclose(uv[0], K[:2, 2], atol=1e-9)
    assert z[0] == pytest.approx(np.sqrt(9 + 16 + 1))
    assert uv[1, 1] < uv[0, 1], "world up must point up in the image"


def test_photos_do_not_depend_on_opencv_threads() -> None:
    scene = build_scene(SMALL, 0)
    shot = landmarks.landmark_shots(SMALL, 0, scene)[0]
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        one_photo, one_depth = landmarks.take_photo(SMALL, scene, shot)
        cv2.setNumThreads(max(threads, 2))
        many_photo, many_depth = landmarks.take_photo(SMALL, scene, shot)
    finally:
        cv2.setNumThreads(threads)
    np.testing.assert_array_equal(one_photo, many_photo)
    np.testing.assert_array_equal(one_depth, many_depth)


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"views_per_landmark": 8}, "views_per_landmark"),
        ({"num_landmarks": 0}, "num_landmarks"),
        ({"queries_per_landmark": 0}, "queries_per_landmark"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"image_size": (16, 16)}, "image_size"),
        ({"name": "a/b"}, "name"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"distance_ratio": 0.5}, "distance_ratio"),
        ({"junk_covisibility": 1.5}, "junk_covisibility"),
    ],
)
def test_bad_configuration_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"LandmarksConf\.{field}="):
        dataclasses.replace(TINY, **change)


def test_few_views_need_an_explicit_opt_in() -> None:
    with pytest.raises(ValueError, match="Structure-from-Motion"):
        dataclasses.replace(TINY, views_per_landmark=8)
    assert (
        dataclasses.replace(TINY, views_per_landmark=8, allow_few_views=True).views_per_landmark
        == 8
    )


def test_presets_are_valid_and_digests_tell_configurations_apart() -> None:
    assert {"tiny", "demo", "sfm"} <= set(CONFS)
    assert set(typing.get_args(typing.get_type_hints(landmarks.Args)["conf"])) == set(CONFS)
    assert all(conf.views_per_landmark >= 16 for conf in CONFS.values())
    digests = {conf.digest() for conf in CONFS.values()}
    assert len(digests) == len(CONFS)
    assert TINY.digest() == dataclasses.replace(TINY).digest()
    assert TINY.digest() != dataclasses.replace(TINY, seed=1).digest()


# --------------------------------------------------------------------------------------------
# The tiny collection


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(TINY, tmp_path_factory.mktemp("first"), progress=False)


@pytest.fixture(scope="module")
def cameras(tiny_dir: Path) -> dict[str, dict]:
    return {row["name"]: row for row in landmarks.load_cameras(tiny_dir).to_pylist()}


@pytest.fixture(scope="module")
def ground_truth(tiny_dir: Path) -> dict:
    return load_ground_truth(tiny_dir)


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a collection but its manifest (which records when it was written)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != tables.MANIFEST
    }


def test_generation_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = generate(TINY, tmp_path, progress=False)
    first, second = _files(tiny_dir), _files(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert not different, f"files differ between two runs: {different[:5]}"


def test_another_seed_gives_other_photos(tiny_dir: Path, tmp_path: Path) -> None:
    other = dataclasses.replace(SMALL, name=TINY.name, image_size=TINY.image_size, seed=1)
    out = generate(other, tmp_path, progress=False)
    assert (out / "jpg/lm00_v00.jpg").read_bytes() != (tiny_dir / "jpg/lm00_v00.jpg").read_bytes()


def test_layout_is_the_revisited_one(tiny_dir: Path, ground_truth: dict, cameras: dict) -> None:
    assert tiny_dir.name == TINY.name
    with open(tiny_dir / f"gnd_{TINY.name}.pkl", "rb") as file:
        assert pickle.load(file).keys() == {"imlist", "qimlist", "gnd"}
    imlist, qimlist = ground_truth["imlist"], ground_truth["qimlist"]
    views = TINY.num_landmarks * TINY.views_per_landmark
    assert len(imlist) == views + TINY.num_distractors
    assert (
        len(qimlist) == len(ground_truth["gnd"]) == TINY.num_landmarks * TINY.queries_per_landmark
    )
    assert all(re.fullmatch(r"lm\d\d_v\d\d|distractor_\d{3}", name) for name in imlist)
    assert all(re.fullmatch(r"lm\d\d_q\d", name) for name in qimlist)
    jpgs = {p.stem for p in (tiny_dir / "jpg").glob("*.jpg")}
    assert jpgs == set(imlist) | set(qimlist)
    assert set(cameras) == jpgs
    photo = cv2.imread(str(tiny_dir / "jpg" / f"{qimlist[0]}.jpg"))
    assert photo.shape == (TINY.image_size[1], TINY.image_size[0], 3)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["digest"] == TINY.digest()
    assert (
        LandmarksConf(**{**config["config"], "image_size": tuple(config["config"]["image_size"])})
        == TINY
    )
    assert (tiny_dir / tables.MANIFEST).is_file()
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")], "temporary left"


def test_camera_table_is_consistent(cameras: dict) -> None:
    roles = {"db": 0, "query": 0, "distractor": 0}
    for name, row in cameras.items():
        roles[row["role"]] += 1
        camera = camera_from_record(row)
        np.testing.assert_allclose(camera.centre, row["centre"], atol=1e-9)
        assert (row["landmark"] == -1) == (row["role"] == "distractor")
        if row["landmark"] >= 0:
            assert name.startswith(f"lm{row['landmark']:02d}_")
        assert (row["width"], row["height"]) == TINY.image_size
    assert roles == {
        "db": TINY.num_landmarks * TINY.views_per_landmark,
        "query": TINY.num_landmarks * TINY.queries_per_landmark,
        "distractor": TINY.num_distractors,
    }


def test_cameras_follow_a_wide_smooth_arc_with_changing_distance(cameras: dict) -> None:
    for landmark in range(TINY.num_landmarks):
        rows = sorted(
            (r for r in cameras.values() if r["landmark"] == landmark and r["role"] == "db"),
            key=lambda r: r["name"],
        )
        offsets = np.array([r["centre"] for r in rows]) - rows[0]["landmark_centre"]
        azimuth = np.unwrap(np.arctan2(offsets[:, 1], offsets[:, 0]))
        steps = np.degrees(np.abs(np.diff(azimuth)))
        assert np.degrees(abs(azimuth[-1] - azimuth[0])) == pytest.approx(TINY.arc_degrees, abs=5)
        assert steps.max() < 2 * TINY.arc_degrees / (TINY.views_per_landmark - 1)
        distance = np.linalg.norm(offsets[:, :2], axis=1)
        assert distance.max() / distance.min() == pytest.approx(TINY.distance_ratio, rel=0.1)


def _same_landmark_db(ground_truth: dict, cameras: dict, landmark: int) -> set[int]:
    return {
        i for i, name in enumerate(ground_truth["imlist"]) if cameras[name]["landmark"] == landmark
    }


def test_labels_partition_the_views_of_the_query_landmark(
    ground_truth: dict, cameras: dict
) -> None:
    for query, entry in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
        labelled = [set(entry[key].tolist()) for key in ("easy", "hard", "junk")]
        assert all(entry[key].dtype.kind == "i" for key in ("easy", "hard", "junk"))
        assert sum(map(len, labelled)) == len(set.union(*labelled)), "labels overlap"
        assert set.union(*labelled) == _same_landmark_db(
            ground_truth, cameras, cameras[query]["landmark"]
        )


def _viewpoint(query: dict, image: dict) -> tuple[float, float]:
    centre = np.array(query["landmark_centre"])
    a, b = np.array(query["centre"]) - centre, np.array(image["centre"]) - centre
    angle = np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))
    ratio = np.linalg.norm(a) / np.linalg.norm(b)
    return float(angle), float(max(ratio, 1 / ratio))


def test_easy_and_hard_agree_with_the_saved_poses(ground_truth: dict, cameras: dict) -> None:
    for query, entry in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
        for index in entry["easy"]:
            angle, ratio = _viewpoint(cameras[query], cameras[ground_truth["imlist"][index]])
            assert angle <= TINY.hard_angle_degrees and ratio <= TINY.hard_scale_ratio
        for index in entry["hard"]:
            angle, ratio = _viewpoint(cameras[query], cameras[ground_truth["imlist"][index]])
            assert angle > TINY.hard_angle_degrees or ratio > TINY.hard_scale_ratio


def test_every_landmark_has_easy_and_hard_positives(ground_truth: dict, cameras: dict) -> None:
    for landmark in range(TINY.num_landmarks):
        entries = [
            g
            for q, g in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True)
            if cameras[q]["landmark"] == landmark
        ]
        assert all(len(g["easy"]) for g in entries), f"a query of landmark {landmark} has no easy"
        assert any(len(g["hard"]) for g in entries), f"landmark {landmark} has no hard positive"


@pytest.mark.slow
def test_demo_landmarks_have_easy_and_hard_positives(tmp_path: Path) -> None:
    demo = CONFS["demo"]
    out = generate(demo, tmp_path, progress=False)
    truth = load_ground_truth(out)
    landmark_of = {r["name"]: r["landmark"] for r in landmarks.load_cameras(out).to_pylist()}
    for landmark in range(demo.num_landmarks):
        entries = [
            g
            for q, g in zip(truth["qimlist"], truth["gnd"], strict=True)
            if landmark_of[q] == landmark
        ]
        assert len(entries) == demo.queries_per_landmark
        assert all(len(g["easy"]) for g in entries), f"a query of landmark {landmark} has no easy"
        assert any(len(g["hard"]) for g in entries), f"landmark {landmark} has no hard positive"


def test_projected_landmark_centre_lies_in_the_query_box(ground_truth: dict, cameras: dict) -> None:
    for query, entry in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
        row = cameras[query]
        uv, _ = camera_from_record(row).project(np.array([row["landmark_centre"]]))
        u, v = uv[0]
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= row["width"] - 1 and 0 <= y1 < y2 <= row["height"] - 1
        assert x1 <= u <= x2 and y1 <= v <= y2


def test_junk_and_boxes_agree_with_visibility_from_the_saved_poses(
    ground_truth: dict, cameras: dict
) -> None:
    """Re-render every landmark from the saved poses; the labels must follow from what they see."""
    junk_seen = 0
    for landmark in range(TINY.num_landmarks):
        scene = build_scene(TINY, landmark)
        seen = {}
        for name, row in cameras.items():
            if row["landmark"] == landmark:
                camera = camera_from_record(row)
                _, depth = render(scene.quads, camera, supersample=TINY.supersample)
                seen[name] = visible_points(scene.points, camera, depth)
        for query, entry in zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True):
            if query not in seen:
                continue
            visible, uv = seen[query]
            box = [*uv[visible].min(axis=0), *uv[visible].max(axis=0)]
            np.testing.assert_allclose(entry["bbx"], box, atol=1e-6)
            for key in ("easy", "hard", "junk"):
                for index in entry[key]:
                    share = covisibility(visible, seen[ground_truth["imlist"][index]][0])
                    if key == "junk":
                        junk_seen += 1
                        assert share < TINY.junk_covisibility or _shared_area_small(
                            visible, seen[ground_truth["imlist"][index]], TINY
                        )
                    else:
                        assert share >= TINY.junk_covisibility
    assert junk_seen > 0, "the tiny preset should exercise junk labels"


def _shared_area_small(query_visible: np.ndarray, image: tuple, conf: LandmarksConf) -> bool:
    visible, uv = image
    shared = uv[query_visible & visible]
    x1, y1 = shared.min(axis=0)
    x2, y2 = shared.max(axis=0)
    return (x2 - x1) * (y2 - y1) < conf.junk_min_area * conf.image_size[0] * conf.image_size[1]


def test_rerun_finds_the_collection_and_skips(tiny_dir: Path) -> None:
    marker = tiny_dir / tables.MANIFEST
    photo = tiny_dir / "jpg" / "lm00_v00.jpg"
    before = (marker.stat().st_mtime_ns, photo.stat().st_mtime_ns)
    assert generate(TINY, tiny_dir.parent, progress=False) == tiny_dir
    assert (marker.stat().st_mtime_ns, photo.stat().st_mtime_ns) == before


def test_cli_reports_the_collection(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert landmarks.main(["--conf", "tiny", "--root", str(tiny_dir.parent)]) == tiny_dir
    out = capsys.readouterr().out
    assert str(tiny_dir) in out
    assert f"{TINY.num_landmarks * TINY.queries_per_landmark} queries" in out


# --------------------------------------------------------------------------------------------
# Publishing


def test_overwrite_regenerates(tmp_path: Path) -> None:
    out = generate(SMALL, tmp_path, progress=False)
    before = (out / tables.MANIFEST).stat().st_mtime_ns
    files = _files(out)
    assert generate(SMALL, tmp_path, overwrite=True, progress=False) == out
    assert (out / tables.MANIFEST).stat().st_mtime_ns != before
    assert _files(out) == files
    assert [p.name for p in tmp_path.iterdir()] == [SMALL.name]


def test_another_configuration_under_the_same_name_is_refused(tmp_path: Path) -> None:
    generate(SMALL, tmp_path, progress=False)
    with pytest.raises(DatasetConflictError, match="overwrite=True"):
        generate(dataclasses.replace(SMALL, seed=5), tmp_path, progress=False)


def test_a_crash_leaves_no_collection_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("model.datasets.landmarks.writer._write_tables", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(SMALL, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_generates_to_s3_and_skips_when_complete(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"s3://{s3_bucket}/data"
    out = generate(SMALL, root, progress=False)
    assert out == f"{root}/{SMALL.name}"
    marker = storage.join(out, tables.MANIFEST)
    assert tables.LANDMARKS_OUTPUT.manifest(out).details["digest"] == SMALL.digest()
    assert storage.is_file(storage.join(out, f"gnd_{SMALL.name}.pkl"))
    assert load_ground_truth(out)["qimlist"] == ["lm00_q0"]
    local = generate(SMALL, tmp_path, progress=False)  # the same bytes as a local collection
    uploaded = {
        name.removeprefix(f"{out}/"): name
        for name in storage.list_files(out)
        if not name.endswith(tables.MANIFEST)
    }
    assert uploaded.keys() == _files(local).keys()
    assert all(storage.read_bytes(uploaded[n]) == b for n, b in _files(local).items())

    signature = storage.file_signature(marker)
    with caplog.at_level(logging.INFO, logger="model.datasets.landmarks"):
        assert generate(SMALL, root, progress=False) == out
    assert "skipping" in caplog.text
    assert storage.file_signature(marker) == signature
    with pytest.raises(DatasetConflictError, match="overwrite=True"):
        generate(dataclasses.replace(SMALL, seed=5), root, progress=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failure_while_writing_publishes_nothing(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/d"
    write_collection = landmarks.writer.write_collection

    def write_then_fail(conf: LandmarksConf, out: Path, progress: bool) -> None:
        write_collection(conf, out, progress)  # every file but the manifest is staged
        assert (out / f"gnd_{conf.name}.pkl").is_file()
        raise RuntimeError("disk full")

    monkeypatch.setattr("model.datasets.landmarks.publish.write_collection", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(SMALL, root, progress=False)
    assert not storage.exists(storage.join(root, SMALL.name))
    if where == "local":
        assert list(tmp_path.iterdir()) == []  # no staging folder left behind either
    else:
        assert not storage.exists(root)


def test_an_incomplete_collection_is_reported(tmp_path: Path) -> None:
    (tmp_path / SMALL.name / "jpg").mkdir(parents=True)
    with pytest.raises(IncompleteDatasetError, match="no complete landmark collection"):
        load_ground_truth(tmp_path / SMALL.name)
    out = generate(SMALL, tmp_path, progress=False)  # a partial directory is replaced
    assert load_ground_truth(out)["qimlist"] == ["lm00_q0"]
