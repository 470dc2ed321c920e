"""The GPU checks' dry run: ``python -m bench.gpu --device cpu --size tiny`` works end to end
here, so it works the first time a GPU machine is at hand. Timings are never asserted: each
measurement must be there with a finite ratio, and the serving check's answers equal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

REPO = Path(__file__).resolve().parent.parent
CHECKS = ("extract", "search", "mining", "train", "serve")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    # on the session's Ray (a Ray of its own would start and idle beside it for nothing)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--size", "tiny"]
    done = subprocess.run(
        [*command, "--out", str(out), "--address", address],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["printed"] = done.stdout
    result["txt"] = out.with_suffix(".txt").read_text()
    return result


def test_every_check_has_a_finite_ratio(dry_run):
    for name in CHECKS:
        ratio = dry_run[name]["ratio"]
        assert math.isfinite(ratio) and ratio > 0, (name, ratio)
        assert dry_run[name]["what"]
    assert dry_run["size"] == "tiny" and dry_run["faiss_gpus"] == 0
    assert dry_run["lines"] and dry_run["txt"].splitlines() == dry_run["lines"]
    assert all(f"\n{name} " in dry_run["printed"] for name in CHECKS)


def test_the_serving_slot_answers_as_the_cpu_under_concurrent_calls(dry_run):
    serve = dry_run["serve"]
    assert serve["equal"] is True
    assert [row["factory"] for row in serve["indexes"]] == ["Flat", "IVF16,Flat"]
    for row in serve["indexes"]:
        assert row["ids_equal"] and row["vectors_equal"] and row["max_score_difference"] == 0
        assert row["cpu_concurrent"]["ids_equal"] and row["overlap"] == 1.0
        assert row["planned"] == "gpu" and row["on_gpu"] is False  # faiss-cpu: planned only


def test_the_exact_searches_agree_with_each_other(dry_run):
    assert dry_run["mining"]["exact_found"] == 1.0  # Flat: the reference's negatives exactly
    assert dry_run["search"]["fp16_recall"] > 0.9  # fp16 ranks as the exact pool, nearly
