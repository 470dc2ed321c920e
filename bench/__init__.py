"""Benchmarks: each prints its figures as ratios against a baseline run in the same command."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path | None, payload: dict, lines: list[str]) -> None:
    """``payload`` as JSON at ``out`` and the printed ``lines`` beside it as ``.txt`` (what the
    README quotes); nothing when ``out`` is None."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
