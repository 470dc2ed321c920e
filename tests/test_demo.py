"""``make demo``: the product end to end on the built-in collection, as a newcomer runs it —
photos to a served, self-trained index, queried over HTTP, with the run report."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO, SMALL_RUN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_serves_a_trained_index_and_answers_over_http(tmp_path: Path) -> None:
    """In a process of its own (its own local Ray and Serve, as ``make demo`` has), on the
    tiny preset with the tests' small settings."""
    port = _free_port()
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({**SMALL_RUN, "serve": {"port": port, "detach": True}}))
    command = [sys.executable, "-m", "pipeline.demo", "--collection", "tiny", "--no-stay"]
    command += ["--output", str(tmp_path / "demo"), "--config", str(config)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    correct = re.search(r"^(\d+) of (\d+) results show the query's landmark", done.stdout, re.M)
    assert correct, done.stdout[-2000:]
    assert int(correct[2]) == 6 * 5 and int(correct[1]) >= 24  # 6 unseen queries, top 5
    run = tmp_path / "demo" / "run"
    assert f"run report:  {(run / 'report.html').as_uri()}" in done.stdout
    assert f"search page: http://127.0.0.1:{port}/" in done.stdout
    summary = yaml.safe_load((run / "run.json").read_text())
    assert "skipped" not in summary["stages"]["train"]  # trained on its own SfM pairs
    assert summary["search"] == f"http://127.0.0.1:{port}"
    assert summary["report"] == str(run / "report.html")
