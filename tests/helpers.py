"""Helpers the tests share: stage outputs built through the table specs, without running the
stages before them."""

from __future__ import annotations

import contextlib
import io
import runpy
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from model import tables
from model.descriptors import write_descriptors
from model.images import image_id
from model.tables import IMAGES, IMAGES_OUTPUT

REPO = Path(__file__).resolve().parent.parent

SMALL_RUN = {
    "extract": {"max_size": 128},
    "sfm": {"mapper": "incremental"},
    "train": {
        "epochs": 1,
        "image_size": 128,
        "val_size": 128,
        "queries": 12,
        "nnum": 1,
        "held_out": 0.3,
        "tuples_per_step": 2,
        "whiten": False,
        "whiten_shrinkage": 0.0,
        "whiten_dim": 1280,
    },
    "index": {"shards": 2},
}
"""A run small enough for the tests: 128 px, one epoch, validation's Lw settings fixed."""


def written_serve_app(conf: Any) -> dict[str, Any]:
    """``pipeline.serve`` with ``--write-config``: the one application of the file it wrote,
    after Serve's own validation of the whole file."""
    from ray.serve.schema import ServeDeploySchema  # Serve's import starts its own machinery

    from pipeline.serve import run as serve_run  # pulls Ray Serve in; most tests never need it

    assert serve_run(conf) == conf.write_config
    config = yaml.safe_load(Path(conf.write_config).read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    return app


def run_stage(stage: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline.<stage> FLAGS`` as a user types it, run in this process: the same
    ``__main__`` code and exit status, its printed output captured, without a new interpreter
    importing torch and Ray again for a command that ends at its flags."""
    command = [sys.executable, "-m", f"pipeline.{stage}", *flags]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = [f"pipeline.{stage}", *flags]
    returncode = 0
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported
            runpy.run_module(f"pipeline.{stage}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
        returncode = code if isinstance(code, int) else (0 if code is None else 1)
        if isinstance(code, str):
            stderr.write(code + "\n")
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(command, returncode, stdout.getvalue(), stderr.getvalue())


def usable_images(images: str, columns: list[str]) -> pa.Table:
    """``columns`` of an ingest output's usable photos (``error`` null)."""
    return tables.IMAGES.read(images, columns, filter=pc.field("error").is_null())


def synthetic_sfm(out: str, *, clusters: int = 3, photos: int = 10) -> list[str]:
    """A complete sfm output of ``clusters`` groups of ``photos`` registered photos, one model
    each, where photo ``i`` of a model sees points ``5i .. 5i+19`` of it at one scale (its
    neighbours share three quarters of its points); returns the photos' ids."""
    rows = []
    for group in range(clusters):
        for i in range(photos):
            rows.append(
                {
                    "image_id": f"g{group}-p{i:02d}",
                    "group_id": group,
                    "attached": False,
                    "model_id": f"{group}-0",
                    "registered": True,
                    "cluster_id": group,
                    "centre_x": float(i),
                    "centre_y": 0.0,
                    "centre_z": 0.0,
                    "point3d_ids": list(range(5 * i, 5 * i + 20)),
                    "scale": 1.0,
                    "observations": 20,
                }
            )
    models = [
        {
            "model_id": f"{g}-0",
            "group_id": g,
            "images": photos,
            "points": 5 * photos + 15,
            "mean_reprojection_error": 0.5,
            "mean_track_length": 4.0,
            "mapper": "incremental",
            "seconds": 1.0,
        }
        for g in range(clusters)
    ]
    groups = [
        {
            "group_id": g,
            "photos": photos,
            "offered": 0,
            "status": "ok",
            "reason": None,
            "seconds": 1.0,
        }
        for g in range(clusters)
    ]
    for spec, table_rows in (
        (tables.SFM_IMAGES, rows),
        (tables.SFM_MODELS, models),
        (tables.SFM_GROUPS, groups),
    ):
        spec.write(out, pa.Table.from_pylist(table_rows, schema=spec.schema))
    tables.SFM_OUTPUT.publish(out, inputs={"groups": "synthetic", "images": "synthetic"})
    return [r["image_id"] for r in rows]


def synthetic_descriptors(
    out: str, image_ids: list[str], *, dim: int = 1280, seed: int = 0, weights: str = "imagenet"
) -> str:
    """A descriptors output of unit vectors near one centre per cluster (the id's prefix), as
    ImageNet Lite0 + GeM would have made them (``weights``)."""
    rng = np.random.default_rng(seed)
    prefixes = sorted({i.split("-")[0] for i in image_ids})
    centres = {p: rng.standard_normal(dim) for p in prefixes}
    x = np.stack([centres[i.split("-")[0]] + 0.5 * rng.standard_normal(dim) for i in image_ids])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    network = {
        "weights": weights,
        "meta": {"backbone": "efficientnet_lite0", "pooling": "gem", "p": 3.0},
    }
    return write_descriptors(out, image_ids, x.astype(np.float32), network=network)


def write_images(folder: Path, paths: list[Path], extra=(), *, publish: bool = True) -> Path:
    """An ingest output as pipeline.ingest writes it: a part of the images table, then its
    manifest (its source input the rows' uris).

    ``extra`` rows are ``(uri, bytes or None, error or None)``; ids are content hashes.
    """
    rows = [(str(p), p.read_bytes(), None) for p in paths] + list(extra)
    table = pa.table(
        {
            "image_id": [image_id(b) if e is None else None for _, b, e in rows],
            "uri": [u for u, _, _ in rows],
            "error": pa.array([e for _, _, e in rows], type=pa.string()),
            "bytes": pa.array([b if e is None else None for _, b, e in rows], type=pa.binary()),
        }
    )
    full = pa.table(
        {
            f.name: table[f.name] if f.name in table.column_names else pa.nulls(len(rows), f.type)
            for f in IMAGES.schema
        },
        schema=IMAGES.schema,
    )
    images = Path(IMAGES_OUTPUT.locate(str(folder)))
    IMAGES_OUTPUT.clear(str(images))
    IMAGES.write(str(images), full, part="part-0")
    if publish:
        IMAGES_OUTPUT.publish(str(images), inputs={"source": "|".join(u for u, _, _ in rows)})
    return images


@dataclass
class PageCheck:
    """What headless Chromium saw of a page: its console errors, failed requests, and the
    images that did not load."""

    errors: list[str]
    broken_images: list[str]
    images: int
    text: str


def chromium() -> str | None:
    """Debian's Chromium, which .ci/run installs; ``None`` when absent (the test skips)."""
    return shutil.which("chromium")


def check_page(url: str, screenshot: Path | None = None) -> PageCheck:
    """Open ``url`` in headless Chromium as a person would and report what went wrong."""
    from playwright.sync_api import sync_playwright  # only the tests that render pages use it

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
        page.goto(url, wait_until="load")
        broken = page.eval_on_selector_all(
            "img", "all => all.filter(i => !(i.complete && i.naturalWidth)).map(i => i.src)"
        )
        images = page.eval_on_selector_all("img", "all => all.length")
        text = page.inner_text("body")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return PageCheck(errors=errors, broken_images=broken, images=images, text=text)
