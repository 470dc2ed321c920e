"""``bench.search``'s ceiling of the HTTP path: what Serve, Ray and FAISS alone spend a query,
from the CPU profile of the same run (the figures here are given, not measured)."""

from __future__ import annotations

import pytest

from bench.search import ceilings


def _row(path: str, shards: int, **cpu: float) -> dict:
    return {"path": path, "shards": shards, "cpu_ms_per_query": {"total": sum(cpu.values()), **cpu}}


def test_the_ceiling_counts_serve_ray_and_the_shards_but_not_the_service_code() -> None:
    rows = [
        _row("single-process FAISS, a query per call", 1, **{"bench-client": 6.0}),
        _row(
            "Serve no-op over HTTP, body read", 0, **{"bench-client": 1.0, "ray::ProxyActor": 2.0}
        ),
        _row("Serve no-op via handle", 0, **{"bench-client": 1.6, "noop:Noop": 0.9}),
        _row(
            "HTTP (POST /search)",
            2,
            **{
                "cirray:IndexShard0": 1.0,
                "cirray:IndexShard1": 1.0,
                "cirray:SearchApp": 3.0,  # the service's own code: not in the floor
                "ray::ProxyActor": 2.5,  # counted by the no-op round trip
                "gcs_server": 0.2,
                "ray::ServeController.listen_for_change": 0.3,
                "python": 0.5,  # not known to be Ray's: left out
            },
        ),
        _row("Python handle", 2, **{"cirray:IndexShard0": 1.0}),
    ]
    (line,) = ceilings(rows, clients=8)
    # floor: HTTP 3.0 + shards 2.0 + 2 calls x 1.6 / 8 clients = 0.4 + Ray 0.5 = 5.9
    assert "(HTTP 3.0 + shards 2.0 + calls 0.4 + Ray 0.5 = 5.9)" in line
    assert f"at most {6.0 / 5.9:.2f}x" in line
    assert "measured 8.5 ms" in line and "own code and the larger answers 2.6" in line


@pytest.mark.parametrize("missing", ["single-process FAISS", "body read", "via handle"])
def test_no_ceiling_without_the_rows_it_needs(missing: str) -> None:
    rows = [
        _row("single-process FAISS, a query per call", 1, **{"bench-client": 6.0}),
        _row("Serve no-op over HTTP, body read", 0, **{"bench-client": 1.0}),
        _row("Serve no-op via handle", 0, **{"bench-client": 1.6}),
        _row("HTTP (POST /search)", 1, **{"cirray:IndexShard0": 1.0}),
    ]
    assert ceilings([r for r in rows if missing not in r["path"]], clients=8) == []
