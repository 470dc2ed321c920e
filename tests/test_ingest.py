"""The ingest stage against real servers: a web server on 127.0.0.1, loopback S3, local Ray.

The web server serves real photos (the shared ones; synthetic JPEGs where they are absent)
beside every kind of failure ingest must turn into a row: a 404, an answer slower than the
timeout, a 500 that succeeds on retry, a 503 that never does, a truncated JPEG, a text file, a
1x1 photo, bodies over the size limit (announced and streamed), a decompression bomb, a URL
listed twice and two URLs with the same bytes. It counts the requests per path, which is how
the tests see retries and resumes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
from PIL import Image, ImageOps

from model import storage
from model.tables import IMAGES, IMAGES_OUTPUT, OutputChanged, parquet_bytes
from pipeline.ingest import IngestConf, run
from tests.helpers import run_stage

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- the web server


class _Web:
    """A real HTTP server on 127.0.0.1 with a route per path and a count of requests per path.

    ``gate(prefix, budget)`` lets ``budget`` requests under ``prefix`` through and holds every
    later one until the server stops (a fetch that never ends, for the kill test).
    """

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler, int], None]] = {}
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gated: tuple[str, int] | None = None
        self.passed = 0
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with web.lock:
                    web.requests[self.path] += 1
                    count = web.requests[self.path]
                    held = False
                    if web.gated and self.path.startswith(web.gated[0]):
                        web.passed += 1
                        held = web.passed > web.gated[1]
                if held:
                    web.stopping.wait()
                    return
                route = web.routes.get(self.path)
                try:
                    if route is None:
                        _answer(self, 404, b"not found")
                    else:
                        route(self, count)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, size limit): that is the point

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def gate(self, prefix: str, budget: int) -> None:
        with self.lock:
            self.gated, self.passed = (prefix, budget), 0

    def open(self) -> None:
        with self.lock:
            self.gated = None

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()


def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, length: bool = True) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for i in range(0, len(body), 64 * 1024):
        handler.wfile.write(body[i : i + 64 * 1024])


def _ok(body: bytes) -> Callable[[BaseHTTPRequestHandler, int], None]:
    return lambda handler, count: _answer(handler, 200, body)


@pytest.fixture(scope="module")
def web() -> Iterator[_Web]:
    server = _Web()
    server.thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.server.shutdown()
        server.server.server_close()


# ----------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class _Photo:
    name: str
    scene: str
    data: bytes
    size: tuple[int, int]  # upright


def _upright_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img).size


def _synthetic_photos(n: int) -> list[_Photo]:
    """Noise JPEGs in three scenes, one stored sideways with an EXIF orientation tag."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (120 + i, 160, 3), dtype=np.uint8))
        exif = Image.Exif()
        if i == 0:
            exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80, exif=exif.tobytes())
        out.append(_Photo(f"synthetic{i:02d}.jpg", f"scene{i % 3}", buf.getvalue(), (0, 0)))
    return [replace(p, size=_upright_size(p.data)) for p in out]


@pytest.fixture(scope="module")
def photos(request: pytest.FixtureRequest) -> list[_Photo]:
    """22 real photos, one or more from every shared scene, three of them stored sideways
    (monstree); synthetic JPEGs where the shared photos are absent."""
    try:
        root: Path = request.getfixturevalue("photos_dir")
    except pytest.skip.Exception:
        return _synthetic_photos(22)
    chosen: list[Path] = []
    for scene in sorted(d for d in root.iterdir() if d.is_dir()):
        files = sorted(scene.glob("*.jpg"))
        chosen += files[: 4 if scene.name == "monstree" else 1]
    chosen = chosen[:22]
    out = []
    for path in chosen:
        data = path.read_bytes()
        out.append(_Photo(path.name, path.parent.name, data, _upright_size(data)))
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def _rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["uri"]: r for r in table.to_pylist()}


# ----------------------------------------------------------------------------- web manifest

MAX_BYTES = 2**20  # every test photo is smaller (the shared ones are at most 0.75 MB)
BAD = {
    # path: the failure kind its row must have
    "/missing.jpg": "http 404",
    "/slow.jpg": "timeout",
    "/unavailable.jpg": "http 503",
    "/truncated.jpg": "truncated",
    "/text.jpg": "not an image",
    "/one-pixel.png": "too small",
    "/huge-announced.jpg": "too big",
    "/huge-streamed.jpg": "too big",
    "/bomb.png": "decompression bomb",
}
WEB_CONF = {
    "timeout_s": 0.5,
    "retries": 2,
    "backoff_s": 0.05,
    "max_bytes": MAX_BYTES,
    "max_pixels": 4_000_000,  # above every test photo, below the bomb's 4.2 megapixels
    "batch_size": 8,
    "threads": 8,
}


@dataclass
class _WebRun:
    conf: IngestConf
    table: pa.Table
    requests: Counter[str]
    photos: dict[str, _Photo]  # path -> photo served there
    copies: tuple[str, str]
    twice: str
    seconds: float


@pytest.fixture(scope="module")
def web_run(
    web: _Web, photos: list[_Photo], tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> _WebRun:
    """One ingest of a CSV manifest of every good and bad URL; its table and request counts."""
    good, spare = photos[:-2], photos[-2:]
    served = {f"/p/{p.name}": p for p in good}
    for path, photo in served.items():
        web.routes[path] = _ok(photo.data)
    copies = ("/copy-a.jpg", "/copy-b.jpg")
    for path in copies:
        web.routes[path] = _ok(spare[0].data)
        served[path] = spare[0]
    web.routes["/flaky.jpg"] = lambda h, n: (
        _answer(h, 500, b"oops") if n == 1 else (_answer(h, 200, spare[1].data))
    )
    served["/flaky.jpg"] = spare[1]

    def slow(handler: BaseHTTPRequestHandler, count: int) -> None:
        time.sleep(2.0)  # four times the timeout
        _answer(handler, 200, good[0].data)

    web.routes["/slow.jpg"] = slow
    web.routes["/unavailable.jpg"] = lambda h, n: _answer(h, 503, b"busy")
    web.routes["/truncated.jpg"] = _ok(good[1].data[: len(good[1].data) // 2])
    web.routes["/text.jpg"] = _ok(b"<html>this is not a photo</html>\n")
    web.routes["/one-pixel.png"] = _ok(_png((1, 1)))
    web.routes["/huge-announced.jpg"] = _ok(os.urandom(2 * MAX_BYTES))
    web.routes["/huge-streamed.jpg"] = lambda h, n: _answer(
        h, 200, os.urandom(2 * MAX_BYTES), length=False
    )
    web.routes["/bomb.png"] = _ok(_png((2100, 2000)))

    twice = next(iter(served))
    paths = [*served, *BAD, twice]  # one URL listed twice
    root = tmp_path_factory.mktemp("web")
    lines = ["uri,scene,label"]
    for i, path in enumerate(paths):
        photo = served.get(path)
        lines.append(f"{web.url(path)},{photo.scene if photo else ''},L{i % 3}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    conf = IngestConf(source=str(manifest), output=str(root / "out"), **WEB_CONF)
    start = time.monotonic()
    out = run(conf)
    seconds = time.monotonic() - start
    assert out == str(root / "out" / "images.parquet")
    return _WebRun(conf, IMAGES.read(out), Counter(web.requests), served, copies, twice, seconds)


def test_every_good_web_photo_is_ingested_once_upright(web_run: _WebRun, web: _Web) -> None:
    rows = _rows(web_run.table)
    assert web_run.table.num_rows == len(web_run.photos) + len(BAD)  # the URL listed twice: once
    for path, photo in web_run.photos.items():
        row = rows[web.url(path)]
        assert row["error"] is None, (path, row["error"])
        assert (row["width"], row["height"]) == photo.size, path
        assert row["image_id"] == _sha(photo.data)[:20]
        assert row["bytes"] == photo.data  # kept: no later stage fetches again
        assert row["size_bytes"] == len(photo.data) and row["format"] == "JPEG"
    rotated = [p for p in web_run.photos.values() if p.size[0] < p.size[1]]
    assert rotated, "some test photos are portrait (stored sideways with an EXIF tag)"
    assert web_run.requests[web_run.twice] == 1
    assert rows[web.url(web_run.twice)]["scene"] is not None  # the manifest's scene column


def test_byte_identical_photos_share_an_image_id(web_run: _WebRun, web: _Web) -> None:
    rows = _rows(web_run.table)
    a, b = (rows[web.url(p)] for p in web_run.copies)
    assert a["image_id"] == b["image_id"] and a["uri"] != b["uri"]
    ok = [r for r in rows.values() if r["error"] is None]
    assert len({r["image_id"] for r in ok}) == len(ok) - 1  # only the copies collide


def test_every_bad_url_is_a_row_with_its_reason(web_run: _WebRun, web: _Web) -> None:
    rows = _rows(web_run.table)
    for path, kind in BAD.items():
        row = rows[web.url(path)]
        assert row["error"] is not None and row["error"].startswith(f"{kind}: "), (path, row)
        assert row["image_id"] is None and row["bytes"] is None and row["width"] is None
    assert "1x1" in rows[web.url("/one-pixel.png")]["error"]


def test_server_errors_and_timeouts_are_retried_client_errors_never(web_run: _WebRun) -> None:
    retries = web_run.conf.retries
    assert web_run.requests["/flaky.jpg"] == 2  # a 500, then the photo
    assert web_run.requests["/unavailable.jpg"] == 1 + retries
    assert web_run.requests["/slow.jpg"] == 1 + retries
    assert web_run.requests["/missing.jpg"] == 1
    assert web_run.requests["/text.jpg"] == 1
    assert web_run.seconds < 30


def test_rerun_fetches_again_only_the_transient_failures(web_run: _WebRun, web: _Web) -> None:
    web.reset_counts()
    web.routes["/unavailable.jpg"] = _ok(web_run.photos["/flaky.jpg"].data)  # back up
    run(web_run.conf)
    assert dict(web.requests) == {"/slow.jpg": 1 + web_run.conf.retries, "/unavailable.jpg": 1}
    rows = _rows(IMAGES.read(web_run.conf.output))
    assert rows[web.url("/unavailable.jpg")]["error"] is None
    assert rows[web.url("/slow.jpg")]["error"].startswith("timeout: ")
    assert rows[web.url("/missing.jpg")]["error"].startswith("http 404: ")
    assert len(rows) == web_run.table.num_rows

    web.reset_counts()
    run(replace(web_run.conf, retry_transient=False))  # the timeout stays as it is
    assert not web.requests


# ----------------------------------------------------------------------------- kill and resume


def _part_uris(images: Path) -> list[str]:
    uris: list[str] = []
    for part in IMAGES.parts(str(images)):
        uris += IMAGES.read_file(part, ["uri"])["uri"].to_pylist()
    return uris


def _uris_by_part(images: str) -> dict[str, list[str]]:
    return {p: IMAGES.read_file(p, ["uri"])["uri"].to_pylist() for p in IMAGES.parts(images)}


def test_killed_ingest_resumes_fetching_only_what_is_missing(
    web: _Web, tmp_path: Path, ray_session: None
) -> None:
    paths = [f"/r/{i:02d}.png" for i in range(24)]
    for i, path in enumerate(paths):
        web.routes[path] = _ok(_png((32 + i, 32)))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{web.url(p)}\n" for p in paths))
    out = tmp_path / "out"
    images = out / "images.parquet"
    flags = {"batch_size": 3, "threads": 3, "workers": 2, "timeout_s": 60.0}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]

    # Two batches' requests get answers, every later one hangs: the ingest is killed while
    # two parts are written and the rest are in flight.
    web.reset_counts()
    web.gate("/r/", budget=2 * flags["batch_size"])
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    free_before = ray.available_resources().get("CPU", 0)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.ingest",
            "--source",
            str(manifest),
            "--output",
            str(out),
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while len(list(images.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no parts written"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    written = _part_uris(images)
    assert len(written) == 2 * flags["batch_size"]
    assert not IMAGES_OUTPUT.is_complete(str(images))
    # The killed run's tasks live on until Ray ends its job, and a thread of theirs may still
    # send a request: count only once they are gone (the CPUs free before it are free again).
    deadline = time.monotonic() + 90
    while ray.available_resources().get("CPU", 0) < free_before:
        assert time.monotonic() < deadline, "the killed run's tasks still hold their CPUs"
        time.sleep(0.05)

    web.open()
    web.reset_counts()
    run(IngestConf(source=str(manifest), output=str(out), **flags))
    fetched = {web.url(p): n for p, n in web.requests.items()}
    assert set(fetched) == {web.url(p) for p in paths} - set(written)  # only what was missing
    assert set(fetched.values()) == {1}
    final = IMAGES.read(str(out))
    assert sorted(final["uri"].to_pylist()) == sorted(web.url(p) for p in paths)
    assert final["error"].null_count == final.num_rows


# ----------------------------------------------------------------------------- folders and S3


def _photo_tree(root: Path, photos: list[_Photo]) -> dict[str, _Photo]:
    """photos in scene folders (one two deep), two directly in ``root``, and a README."""
    placed = {}
    for i, photo in enumerate(photos):
        rel = photo.name if i < 2 else f"{photo.scene}/{photo.name}"
        if i == 2:
            rel = f"deep/er/{photo.name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(photo.data)
        placed[rel] = photo
    (root / "README.txt").write_text("not a photo, and not listed")
    return placed


def _expected_scene(rel: str) -> str | None:
    return rel.rpartition("/")[0] or None


def test_folder_source_scenes_from_subfolders_and_a_complete_rerun_skips(
    photos: list[_Photo], tmp_path: Path, ray_session: None, caplog: pytest.LogCaptureFixture
) -> None:
    placed = _photo_tree(tmp_path / "photos", photos[:12])
    conf = IngestConf(source=str(tmp_path / "photos"), output=str(tmp_path / "out"), batch_size=4)
    images = run(conf)
    usable = pc.field("error").is_null()
    table = IMAGES.read(images, ["uri", "scene", "image_id", "width", "height"], filter=usable)
    rows = _rows(table)
    assert len(rows) == len(placed)
    for rel, photo in placed.items():
        row = rows[str(tmp_path / "photos" / rel)]
        assert row["scene"] == _expected_scene(rel)
        assert (row["width"], row["height"]) == photo.size
        assert row["image_id"] == _sha(photo.data)[:20]

    parts = {p: p.stat().st_mtime_ns for p in Path(images).iterdir()}
    with caplog.at_level(logging.INFO, logger="pipeline.ingest"):
        assert run(conf) == images
    assert "complete for this source; skipping" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in Path(images).iterdir()} == parts


def test_photos_added_to_the_source_are_the_only_ones_ingested(
    photos: list[_Photo], tmp_path: Path, ray_session: None
) -> None:
    _photo_tree(tmp_path / "photos", photos[:4])
    conf = IngestConf(source=str(tmp_path / "photos"), output=str(tmp_path / "out"), batch_size=4)
    images = run(conf)
    before = _uris_by_part(images)
    identity = IMAGES_OUTPUT.manifest(images).identity
    for photo in photos[4:6]:
        (tmp_path / "photos" / "new" / photo.name).parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / "new" / photo.name).write_bytes(photo.data)
    assert run(conf) == images
    after = _uris_by_part(images)
    assert all(after[part] == uris for part, uris in before.items())  # kept as they were
    new = sorted(u for part, uris in after.items() if part not in before for u in uris)
    assert new == sorted(str(tmp_path / "photos" / "new" / p.name) for p in photos[4:6])
    manifest = IMAGES_OUTPUT.manifest(images)
    assert manifest.identity != identity and manifest.details["ingested"] == 6


def test_another_setting_stops_naming_it_and_overwrite_replaces(
    photos: list[_Photo], tmp_path: Path, ray_session: None
) -> None:
    _photo_tree(tmp_path / "photos", photos[:2])
    conf = IngestConf(source=str(tmp_path / "photos"), output=str(tmp_path / "out"))
    images = run(conf)
    smallest = min(min(p.size) for p in photos[:2])
    stricter = replace(conf, min_side=smallest + 1)
    with pytest.raises(OutputChanged) as err:
        run(stricter)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "--overwrite" in message
    assert f"min_side: 16 → {smallest + 1}" in message
    assert IMAGES_OUTPUT.manifest(images).settings["min_side"] == 16  # untouched

    run(replace(stricter, overwrite=True))
    table = IMAGES.read(images, ["error"])
    assert any((e or "").startswith("too small") for e in table["error"].to_pylist())
    assert IMAGES_OUTPUT.manifest(images).settings["min_side"] == smallest + 1


def test_s3_prefix_to_s3_output_gives_the_rows_of_a_local_manifest(
    photos: list[_Photo], tmp_path: Path, s3_bucket: str, ray_session: None
) -> None:
    placed = _photo_tree(tmp_path / "photos", photos[:6])
    (tmp_path / "photos" / "README.txt").unlink()
    for rel in placed:
        storage.write_bytes(
            f"s3://{s3_bucket}/photos/{rel}", (tmp_path / "photos" / rel).read_bytes()
        )
    s3_conf = IngestConf(source=f"s3://{s3_bucket}/photos", output=f"s3://{s3_bucket}/out")
    s3_images = run(s3_conf)
    assert s3_images == f"s3://{s3_bucket}/out/images.parquet"
    assert IMAGES_OUTPUT.is_complete(s3_images)

    # The same photos through a local Parquet manifest with relative paths and integer labels.
    manifest = pa.table(
        {
            "uri": [f"photos/{rel}" for rel in placed],
            "scene": [_expected_scene(rel) for rel in placed],
            "label": list(range(len(placed))),
        }
    )
    (tmp_path / "manifest.parquet").write_bytes(parquet_bytes(manifest))
    local = IMAGES.read(run(IngestConf(str(tmp_path / "manifest.parquet"), str(tmp_path / "out"))))

    def key(table: pa.Table) -> list[tuple]:
        cols = ["image_id", "scene", "width", "height", "error", "size_bytes"]
        return sorted(tuple(r[c] for c in cols) for r in table.to_pylist())

    remote = IMAGES.read(s3_images)
    assert key(remote) == key(local) and remote.num_rows == len(placed)
    assert sorted(local["label"].to_pylist()) == sorted(str(i) for i in range(len(placed)))
    assert IMAGES.ray_dataset(s3_images, ["image_id", "bytes"]).count() == len(placed)
    marker = IMAGES_OUTPUT.manifest(s3_images)
    assert run(s3_conf) == s3_images  # complete: skipped
    assert IMAGES_OUTPUT.manifest(s3_images) == marker


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_reported_at_once_before_any_fetch(
    tmp_path: Path, s3_server: str, web: _Web
) -> None:
    def problems(**kwargs: Any) -> str:
        with pytest.raises(ValueError) as err:
            run(IngestConf(**{"output": str(tmp_path / "out"), **kwargs}))
        message = str(err.value)
        assert all(line.strip() for line in message.splitlines())  # one problem a line
        return message

    message = problems(
        source="/nonexistent/photos", output="s3://no-such-bucket-4f2a/out", threads=0
    )
    assert "nothing at /nonexistent/photos" in message
    assert "bucket 'no-such-bucket-4f2a' does not exist" in message
    assert "threads must be at least 1" in message

    assert "bucket 'no-such-bucket-4f2a' does not exist" in problems(
        source="s3://no-such-bucket-4f2a/photos"
    )
    (tmp_path / "paths.csv").write_text("path,scene\n/a.jpg,x\n")
    assert "has no uri column (its columns: path, scene)" in problems(
        source=str(tmp_path / "paths.csv")
    )
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    assert "is not a readable manifest" in problems(source=str(tmp_path / "broken.parquet"))
    (tmp_path / "blank.csv").write_text('uri\nhttp://127.0.0.1:9/a.jpg\n""\n')
    assert "1 row with an empty uri" in problems(source=str(tmp_path / "blank.csv"))
    (tmp_path / "empty").mkdir()
    assert "no photos (.jpg, .jpeg, .png) under" in problems(source=str(tmp_path / "empty"))

    # A web manifest with an output of another schema: refused, and nothing was fetched.
    web.reset_counts()
    web.routes["/p/ok.png"] = _ok(_png((64, 64)))
    (tmp_path / "web.csv").write_text(f"uri\n{web.url('/p/ok.png')}\n")
    other = tmp_path / "other" / "images.parquet"
    other.mkdir(parents=True)
    (other / "part-0.parquet").write_bytes(parquet_bytes(pa.table({"uri": ["x"], "width": ["a"]})))
    message = problems(source=str(tmp_path / "web.csv"), output=str(other.parent))
    assert "missing column(s) image_id, error, height" in message
    assert "width is string, expected int32" in message
    assert not web.requests


def test_cli_bad_source_exits_2_with_one_error_line(tmp_path: Path) -> None:
    proc = run_stage("ingest", "--source", "/nonexistent", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing at /nonexistent" in errors[0]
    assert "Traceback" not in proc.stderr


def test_import_does_not_load_torch() -> None:
    code = "import pipeline.ingest, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
