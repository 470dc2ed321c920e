"""The index stage's driver memory against the bytes of the vectors it indexes, and its peak for
a million photos.

Data: ``--count`` unit vectors of ``--dim`` (default 50,000 x 1280, EfficientNet-Lite0's size),
written through ``model.tables.DESCRIPTORS`` in ``--parts`` part files with row groups of
``--row-group`` rows (what Ray Data's writes in extract look like), image_ids in another order
than the rows (content hashes: every shard gathers from every part); and the same at a half and
a quarter of the rows, in as many parts (the same fixed costs: parts read at once).

The contender is ``pipeline.index.run`` (``--factory``, default ``IVF256,Flat``: a training task
and a tuning task as well as the shard tasks) as a driver process of its own, joined to a local
Ray started by this command; its peak resident memory (``VmHWM``) is read as it ends. The
baselines, from the same command:

- the vectors' bytes (``count x dim x 4``): what the driver held at the least before (it read
  every vector, then copied them in id order and once more per shard);
- ``model.descriptors.read_descriptors`` in a process of its own: the old driver's first step
  alone (every vector in memory), measured the same way;
- an idle driver: the same process importing the stage and joining Ray, doing nothing else.

The peak for ``--at`` photos (1,000,000) is extrapolated along the least-squares line through
the three sizes' peaks (what a row costs the driver, and what it costs whatever the rows), each
the lowest of ``--repeats`` runs; at the default size a row's cost is near the runs' noise, and
the slope is printed with it. With ``--count`` at least ``--at`` the figure is measured.

    python -m bench.driver_memory                       # 50,000 x 1280, under 2 minutes
    python -m bench.driver_memory --count 1000000       # the real figure (5 GB of vectors)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import tyro

from bench import write_results
from model import tables
from model.descriptors import read_descriptors
from pipeline import index as stage

REPO = Path(__file__).resolve().parent.parent
MB = 2**20
NETWORK = {"name": "synthetic", "identity": "bench-driver-memory"}


@dataclass(frozen=True)
class BenchConf:
    count: int = 50_000
    """Descriptor rows (photos)."""
    dim: int = 1280
    at: int = 1_000_000
    """The collection size to state the driver's peak for."""
    factory: str = "IVF256,Flat"
    """The index built (auto picks Flat below 100,000 rows: no training, no tuning)."""
    shards: int = 2
    parts: int = 5
    row_group: int = 1_000
    seed: int = 0
    repeats: int = 2
    """Drivers run per size; the lowest peak counts (a transient peak varies run to run), and
    the spread of the peaks is the measurement's noise."""
    read_all: bool = True
    """Also measure the old driver's first step (every vector read into memory)."""
    work_dir: str | None = None
    """Where the descriptors and the index are written; default: a temporary folder."""
    out: str | None = "bench/results/driver_memory_cpu.json"
    """Write the figures as JSON here, and the printed table next to it as .txt."""
    child: str | None = None
    """Internal: run one measured driver (a JSON job) and print its figures."""


def write_synthetic(
    uri: str, count: int, dim: int, *, rows_per_part: int, row_group: int, seed: int = 0
) -> str:
    """A complete descriptors output of ``count`` seeded unit vectors, written a part at a
    time through ``model.tables`` (never the whole matrix in memory); returns its folder.
    No dictionary encoding: random floats and unique ids repeat nothing, and pyarrow's try at
    a dictionary took most of the writing time."""
    base = tables.resolve(uri)
    tables.DESCRIPTORS_OUTPUT.clear(base)
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, count, rows_per_part)):
        stop = min(start + rows_per_part, count)
        X = rng.standard_normal((stop - start, dim), dtype=np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        # 20 hex characters, as ingest's content hashes; sorted unlike the rows.
        ids = pa.array([f"{i * 2654435761 % 2**32:08x}{i:012x}" for i in range(start, stop)])
        table = pa.table(
            {
                "image_id": ids,  # not in storage order: shards gather from every part
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim),
                "error": pa.nulls(stop - start, type=pa.string()),
            }
        )
        tables.DESCRIPTORS.write(
            base,
            table,
            part=f"part-{part:05d}",
            row_group_size=row_group,
            use_dictionary=False,
        )
    tables.DESCRIPTORS_OUTPUT.publish(
        base,
        inputs={"network": json.dumps(NETWORK, sort_keys=True)},
        details={"dim": dim, "count": count, "failed": [], "network": NETWORK, "settings": {}},
    )
    return base


def measure_driver(job: dict[str, Any], *, address: str, timeout: float = 1800) -> dict[str, Any]:
    """Run one driver (``job``: ``{"mode": "index"|"idle"|"read_all", ...}``) in a process of
    its own joined to the Ray at ``address``; its figures (``peak_bytes``: its peak resident
    memory; ``joined_bytes``: its resident memory once imports and Ray were up)."""
    env = {**os.environ, "RAY_ADDRESS": address}
    command = [sys.executable, "-m", "bench.driver_memory", "--child", json.dumps(job)]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"driver {job['mode']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``: resident now,
    ``VmHWM``: its peak). Not ``ru_maxrss``: Linux carries that over ``execve`` from the
    forking parent, so a child started by a large process reports the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _child(job: dict[str, Any]) -> None:
    """One measured driver: imports, joins Ray, does its job, prints its figures as JSON."""
    ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False, log_to_driver=False)
    joined = _status_bytes("VmRSS")
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if job["mode"] == "index":
        conf = stage.IndexConf(**job["conf"])
        result["version"] = stage.run(conf)
    elif job["mode"] == "read_all":
        desc = read_descriptors(job["descriptors"])
        result["vectors_bytes"] = int(desc.vectors.nbytes)
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    print(json.dumps({**result, "peak_bytes": peak, "joined_bytes": joined, "seconds": seconds}))


def main(conf: BenchConf) -> dict[str, Any]:
    work = Path(conf.work_dir or tempfile.mkdtemp(prefix="cirray-bench-driver-"))
    sizes = sorted({max(1, conf.count // 4), max(1, conf.count // 2), conf.count})
    t0 = time.perf_counter()
    folders = {
        n: write_synthetic(
            str(work / f"desc-{n}"),
            n,
            conf.dim,
            rows_per_part=-(-n // conf.parts),
            row_group=conf.row_group,
            seed=conf.seed,
        )
        for n in sizes
    }
    written = time.perf_counter() - t0
    vectors = 4 * conf.count * conf.dim

    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=256 * MB,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        address = ray.get_runtime_context().gcs_address
        idle = measure_driver({"mode": "idle"}, address=address)
        runs, spread = {}, {}
        for n in sizes:
            found = []
            for _ in range(max(1, conf.repeats)):
                shutil.rmtree(work / f"index-{n}", ignore_errors=True)
                settings = {
                    "descriptors": folders[n],
                    "output": str(work / f"index-{n}"),
                    "factory": conf.factory,
                    "shards": conf.shards,
                    "seed": conf.seed,
                    "train_cpus": min(2, cpus),
                }
                found.append(measure_driver({"mode": "index", "conf": settings}, address=address))
            runs[n] = min(found, key=lambda run: run["peak_bytes"])
            spread[n] = max(r["peak_bytes"] for r in found) - runs[n]["peak_bytes"]
        old = None
        if conf.read_all:
            job = {"mode": "read_all", "descriptors": folders[conf.count]}
            old = measure_driver(job, address=address)
    finally:
        ray.shutdown()
    manifest = json.loads((work / f"index-{conf.count}" / "v1" / tables.MANIFEST).read_text())[
        "details"
    ]
    if not conf.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    peaks = np.array([runs[n]["peak_bytes"] for n in sizes], dtype=np.float64)
    rows = np.array(sizes, dtype=np.float64)
    per_row, fixed = np.polyfit(rows, peaks, 1) if len(sizes) > 1 else (0.0, peaks[0])
    at_vectors = 4 * conf.at * conf.dim
    measured_at = conf.count >= conf.at
    peak = float(peaks[-1])
    stated = peak if measured_at else float(fixed + per_row * conf.at)
    # The line's slope is known to about the peaks' noise over the rows between the sizes.
    noise = float(max(spread.values()))
    slope_error = 2 * noise / max(1, sizes[-1] - sizes[0])
    lines = [
        f"{conf.count:,} x {conf.dim} float32 descriptors ({vectors / MB:,.0f} MB of vectors) in "
        f"{conf.parts} parts, row groups of {conf.row_group:,}; {manifest['factory']}, "
        f"{len(manifest['shards'])} shards; written in {written:.0f} s; {cpus} CPUs",
        f"{'driver process':<56}{'peak MB':>9}{'x vectors':>11}{'seconds':>9}",
        "-" * 85,
    ]

    def row(name: str, bytes_: float, seconds: float | None = None) -> None:
        tail = f"{seconds:>9.1f}" if seconds is not None else f"{'':>9}"
        lines.append(f"{name:<56}{bytes_ / MB:>9,.0f}{bytes_ / vectors:>11.2f}{tail}")

    row(f"baseline: the vectors' bytes ({conf.count:,} rows)", vectors)
    if old is not None:
        row("baseline: read_descriptors (the old driver's first step)", *_figures(old))
    row("idle driver (imports, joined to Ray)", *_figures(idle))
    for n in sizes:
        row(f"pipeline.index.run, {n:,} rows", *_figures(runs[n]))
    if measured_at:
        lines.append(
            f"driver peak for {conf.count:,} photos (measured): {peak / MB:,.0f} MB; the line "
            f"through the {len(sizes)} sizes: {fixed / MB:,.0f} MB + {per_row:,.0f} bytes a row; "
            f"their vectors alone are {vectors / MB:,.0f} MB ({vectors / peak:.1f}x the peak)"
        )
    else:
        lines.append(
            f"driver peak for {conf.at:,} photos (extrapolated): {stated / MB:,.0f} MB = "
            f"{fixed / MB:,.0f} MB + {per_row:,.0f} +- {slope_error:,.0f} bytes a row (least "
            f"squares over {len(sizes)} sizes, the lowest of {conf.repeats} peaks each, "
            f"+-{noise / MB:.0f} MB between runs); their vectors alone are "
            f"{at_vectors / MB:,.0f} MB ({at_vectors / stated:.1f}x the driver's peak)"
        )
    print("\n".join(lines))
    payload = {
        "conf": asdict(conf),
        "cpus": cpus,
        "factory": manifest["factory"],
        "vectors_bytes": vectors,
        "write_s": written,
        "idle": idle,
        "index": {str(n): {**runs[n], "rows": n, "spread_bytes": spread[n]} for n in sizes},
        "read_all": old,
        "ratios": {
            "peak_over_vectors": peak / vectors,
            "read_all_over_peak": old["peak_bytes"] / peak if old else None,
        },
        "at": {
            "photos": conf.at,
            "vectors_bytes": at_vectors,
            "measured": measured_at,
            "peak_bytes": stated,
            "fixed_bytes": float(fixed),
            "bytes_per_row": float(per_row),
            "bytes_per_row_error": slope_error,
            "noise_bytes": noise,
        },
    }
    write_results(conf.out, payload, lines)
    return payload


def _figures(run: dict[str, Any]) -> tuple[float, float]:
    return run["peak_bytes"], run["seconds"]


if __name__ == "__main__":
    settings = tyro.cli(BenchConf)
    if settings.child:
        _child(json.loads(settings.child))
    else:
        main(settings)
