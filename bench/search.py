"""Queries per second and latency of the search service for 1, 2 and 4 shards, over HTTP and
through the Python handle, beside single-process FAISS in the same run.

Data: ``bench.index.clustered`` vectors (``--n`` × ``--dim``, 1,000 centres, sigma 1.4) as one
descriptor table; ``pipeline.index`` builds a Flat index of it with 1, 2 and 4 shards, so every
configuration answers with recall@10 = 1 against exact search (measured, not assumed). Each
is served by ``pipeline.serve``'s app on a local Ray Serve (a slot per shard, CPU FAISS) and
loaded by ``--clients`` threads, each sending one query at a time and waiting for its answer:

- HTTP: ``POST /search`` with the JSON vector, through ``cluster.client.SearchClient``;
- handle: ``SearchRouter.search`` through a Serve ``DeploymentHandle`` from this process.

The baseline is one ``faiss.IndexFlatIP`` of all vectors in this process, searched the same
way (``--clients`` threads, one query per call), and also all queries in one batched call.
On a single machine the client threads, the proxy and the replicas share its cores: the ratios
say what the service's hops cost against FAISS itself, not what a cluster would do.

With ``--photos DIR`` it also measures photo queries over HTTP with and without
re-ranking (``kreciprocal=K``, ``rerank=K``, both; k = K results): the photos go through ingest,
extract, features and index as a user's would, and each is sent, one at a time, without and
with each.

    python -m bench.search                                 # 100,000 x 256
    python -m bench.search --no-vectors --photos ../shared/data/photos \
        --out bench/results/search_rerank.json
    python -m bench.search --n 20000 --queries 200 --out bench/results/x.json
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 python -m bench.search --out bench/results/search_cpu_grpc.json
"""

import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import ray
import tyro
from fastapi import FastAPI, Request
from ray import serve

from bench import write_results
from bench.index import clustered
from cluster.client import SearchClient
from model.descriptors import write_descriptors
from pipeline.extract import ExtractConf
from pipeline.extract import run as extract
from pipeline.features import FeaturesConf
from pipeline.features import run as features
from pipeline.index import IndexConf
from pipeline.index import run as build_index
from pipeline.ingest import IngestConf
from pipeline.ingest import run as ingest
from pipeline.serve import APP_NAME, ServeConf, build_app, start_serve


@dataclass(frozen=True)
class BenchConf:
    n: int = 100_000
    dim: int = 256
    queries: int = 400
    """Queries per measurement (spread over the clients)."""
    clients: int = 8
    k: int = 10
    shards: tuple[int, ...] = (1, 2, 4)
    seed: int = 0
    threads_per_shard: int | None = None
    """FAISS threads of each shard replica (``pipeline.serve --threads-per-shard``)."""
    vectors: bool = True
    """Measure the descriptor queries (--no-vectors: the photo queries alone)."""
    photos: str | None = None
    """A folder of photos (a sub-folder per scene): also measure photo queries over HTTP with
    and without spatial re-ranking, through ingest, extract, features and index."""
    rerank: int = 100
    """Candidates re-ranked per photo query (and results asked for)."""
    out: str | None = "bench/results/search_cpu.json"


NETWORK = {"weights": "imagenet", "meta": {"backbone": "efficientnet_lite0"}}

noop_api = FastAPI()


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(noop_api)
class NoopIngress:
    """Serve's own cost: an HTTP ingress that answers at once, its body unread (``/search``)
    or read whole first, as any ingress that looks at a query must (``/read``)."""

    @noop_api.post("/search")
    async def search(self) -> dict:
        return {"results": [], "version": 0}

    @noop_api.post("/read/search")
    async def read(self, request: Request) -> dict:
        await request.body()
        return {"results": [], "version": 0}


@serve.deployment(max_ongoing_requests=64)
class Noop:
    """Serve's own cost through a handle: the argument back."""

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return x


def _transport() -> str:
    """How Serve carries requests between its processes in this run: as the service sets it
    (the proxy hands requests to the ingress over gRPC, ``pipeline.serve.SERVE_ENV``; the
    ingress's calls to the shards by value, over gRPC; the router's by object reference), or
    gRPC everywhere when ``RAY_SERVE_USE_GRPC_BY_DEFAULT=1`` was set before the run."""
    if os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT") == "1":
        return "gRPC everywhere (RAY_SERVE_USE_GRPC_BY_DEFAULT=1)"
    return "the service's (proxy to ingress and ingress to shards over gRPC)"


def _processes() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process of this machine, by pid: ``(name, seconds)``, from
    ``/proc``. Ray names its workers ``ray::<actor>`` (``ray::ServeReplica:cirray:...``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        name = line if line.startswith("ray::") else Path(line).name or "?"
        if int(entry.name) == os.getpid():
            name = "bench-client"
        out[int(entry.name)] = (name, seconds)
    return out


def _cpu_per_query(before: dict, after: dict, queries: int) -> dict[str, float]:
    """Milliseconds of CPU each kind of process spent per query between two snapshots."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used = seconds - before.get(pid, (name, 0.0))[1]
        short = name.replace("ray::ServeReplica:", "").split(" ")[0]
        spent[short] = spent.get(short, 0.0) + used
    total = sum(spent.values())
    kept = {k: v * 1e3 / queries for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    kept = {k: v for k, v in kept.items() if v >= 0.05}
    return {"total": total * 1e3 / queries, **kept}


def _load(send: Callable[[np.ndarray], list[int]], queries: np.ndarray, clients: int) -> dict:
    """``clients`` threads share ``queries``; returns QPS, p50/p99 latency and the answers."""
    answers: list[list[int] | None] = [None] * len(queries)
    latencies = np.zeros(len(queries))
    cursor = iter(range(len(queries)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            t = time.perf_counter()
            answers[i] = send(queries[i])
            latencies[i] = time.perf_counter() - t

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {
        "qps": len(queries) / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "answers": answers,
    }


def _recall(answers: list[list[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(t)) / k for a, t in zip(answers, truth, strict=True)]))


_CEILING_HEADER = (
    "Ceiling of the HTTP path under the load above: FAISS's CPU a query over what Serve and Ray "
    "alone spend a query (the no-op HTTP round trip with the body read, the shard processes, "
    "the ingress's side of a handle call to each shard once a batch of --clients queries, Ray's "
    "own processes), as if the service's own code cost nothing:"
)


def _is_ray_process(name: str) -> bool:
    """Ray's and Serve's own processes, not a replica of the service (nor the proxy, which
    the no-op round trip already counts)."""
    if name in ("gcs_server", "raylet"):
        return True
    return name.startswith("ray::") and not name.startswith("ray::ProxyActor")


def ceilings(rows: list[dict], clients: int) -> list[str]:
    """For each HTTP row, the most its ratio to FAISS could be on these cores, from Serve's,
    Ray's and FAISS's CPU per query measured in this run."""
    by_path = {row["path"]: row for row in rows if "cpu_ms_per_query" in row}
    baseline = by_path.get("single-process FAISS, a query per call")
    http = by_path.get("Serve no-op over HTTP, body read")
    handle = by_path.get("Serve no-op via handle")
    if baseline is None or http is None or handle is None:
        return []
    faiss_ms = baseline["cpu_ms_per_query"]["total"]
    http_ms = http["cpu_ms_per_query"]["total"]
    call_ms = handle["cpu_ms_per_query"].get("bench-client", 0.0)  # the caller's side
    out = []
    for row in rows:
        if not row["path"].startswith("HTTP") or "cpu_ms_per_query" not in row:
            continue
        spent = row["cpu_ms_per_query"]
        shard_ms = sum(v for k, v in spent.items() if k.startswith("cirray:IndexShard"))
        calls_ms = row["shards"] * call_ms / clients
        ray_ms = sum(v for k, v in spent.items() if _is_ray_process(k))
        floor = http_ms + shard_ms + calls_ms + ray_ms
        out.append(
            f"  {row['shards']} shard(s): FAISS {faiss_ms:.1f} ms / (HTTP {http_ms:.1f} + shards "
            f"{shard_ms:.1f} + calls {calls_ms:.1f} + Ray {ray_ms:.1f} = {floor:.1f}) = at most "
            f"{faiss_ms / floor:.2f}x; measured {spent['total']:.1f} ms, the service's own code "
            f"and the larger answers {spent['total'] - floor:.1f}"
        )
    return out


def main(conf: BenchConf) -> dict:
    rng = np.random.default_rng(conf.seed)
    centres = rng.standard_normal((1000, conf.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = clustered(rng, centres, conf.n, 1.4)
    Q = clustered(rng, centres, conf.queries, 1.4)
    _, truth = faiss.knn(Q, X, conf.k, metric=faiss.METRIC_INNER_PRODUCT)

    rows: list[dict] = []
    profiles: list[tuple[str, dict[str, float]]] = []

    def measured(name: str, shards: int, send: Callable[[np.ndarray], list[int]]) -> None:
        _load(send, Q[:20], conf.clients)  # warm: connections, batching, caches
        before = _processes()
        row = {"path": name, "shards": shards, **_load(send, Q, conf.clients)}
        row["cpu_ms_per_query"] = _cpu_per_query(before, _processes(), len(Q))
        profiles.append((f"{name}, {shards} shard(s)", row["cpu_ms_per_query"]))
        rows.append(row)

    flat = faiss.IndexFlatIP(conf.dim)
    flat.add(X)
    measured(
        "single-process FAISS, a query per call",
        1,
        lambda q: flat.search(q[None], conf.k)[1][0].tolist(),
    )
    t = time.perf_counter()
    _, batched = flat.search(Q, conf.k)
    rows.append(
        {
            "path": "single-process FAISS, all queries in one call",
            "shards": 1,
            "qps": len(Q) / (time.perf_counter() - t),
            "p50_ms": None,
            "p99_ms": None,
            "answers": batched.tolist(),
        }
    )

    if not conf.vectors:
        rows.clear()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="cirray-bench-search-"))
    ids = [f"v{i:07d}" for i in range(conf.n)]  # sorted like the rows: global id == row
    desc = write_descriptors(str(work / "desc"), ids, X, network=NETWORK)
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = 8000 + int(rng.integers(100, 900))
    start_serve("127.0.0.1", port)

    photo_lines: list[str] = []
    try:
        if conf.photos:
            photo_lines = _photo_latency(conf, work, port)
        if not conf.vectors:
            return _write(conf, rows, photo_lines)
        serve.run(NoopIngress.bind(), name="noop", route_prefix="/")
        noop_client = SearchClient(f"http://127.0.0.1:{port}")
        measured(
            "Serve no-op over HTTP (proxy + ingress)",
            0,
            lambda q: [r.score for r in noop_client.search_vector(q, k=conf.k).results],
        )
        reading_client = SearchClient(f"http://127.0.0.1:{port}/read")
        measured(
            "Serve no-op over HTTP, body read",
            0,
            lambda q: [r.score for r in reading_client.search_vector(q, k=conf.k).results],
        )
        serve.delete("noop")
        noop = serve.run(Noop.bind(), name="noop", route_prefix=None)
        measured("Serve no-op via handle", 0, lambda q: noop.remote(q).result()[:0].tolist())
        serve.delete("noop")
        for shards in conf.shards:
            root = str(work / f"index{shards}")
            build_index(IndexConf(descriptors=desc, output=root, factory="Flat", shards=shards))
            serve.run(
                build_app(ServeConf(index=root, threads_per_shard=conf.threads_per_shard)),
                name=APP_NAME,
                route_prefix="/",
            )
            client = SearchClient(f"http://127.0.0.1:{port}")
            router = serve.get_deployment_handle("SearchRouter", app_name=APP_NAME)

            def over_http(q: np.ndarray, client=client) -> list[int]:
                return [int(r.image_id[1:]) for r in client.search_vector(q, k=conf.k).results]

            def by_handle(q: np.ndarray, router=router) -> list[int]:
                return [h.id for h in router.search.remote(q, conf.k).result()["hits"]]

            for name, send in (("HTTP (POST /search)", over_http), ("Python handle", by_handle)):
                measured(name, shards, send)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()

    base = rows[0]["qps"]
    lines = [
        f"device: {platform.machine()} CPU, {cores} cores; faiss {faiss.__version__}; "
        f"{conf.n:,} x {conf.dim} clustered vectors, Flat, k={conf.k}; "
        f"{conf.queries} queries from {conf.clients} client threads, one query per request; "
        f"Serve's transport: {_transport()}",
        f"{'path':<48}{'shards':>7}{'recall@10':>11}{'QPS':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'vs FAISS':>10}",
        "-" * 103,
    ]
    for row in rows:
        answers = row.pop("answers")
        row["recall_at_10"] = _recall(answers, truth) if row["shards"] else 0.0
        p50 = f"{row['p50_ms']:>9.1f}" if row["p50_ms"] is not None else f"{'-':>9}"
        p99 = f"{row['p99_ms']:>9.1f}" if row["p99_ms"] is not None else f"{'-':>9}"
        lines.append(
            f"{row['path']:<48}{row['shards']:>7}{row['recall_at_10']:>11.3f}{row['qps']:>9.1f}"
            f"{p50}{p99}{row['qps'] / base:>9.2f}x"
        )
    lines += ["", "CPU milliseconds per query, by process (the load above; 2 cores = 2,000 ms/s):"]
    for name, spent in profiles:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in spent.items() if k != "total")
        lines.append(f"  {name}: {spent['total']:.1f} in all: {parts}")
    ceiling_lines = ceilings(rows, conf.clients)
    if ceiling_lines:
        lines += ["", _CEILING_HEADER, *ceiling_lines]
    return _write(conf, rows, lines + photo_lines)


def _write(conf: BenchConf, rows: list[dict], lines: list[str]) -> dict:
    print("\n".join(lines))
    result = {"conf": asdict(conf), "rows": rows, "lines": lines}
    write_results(conf.out, result, lines)
    return result


def _photo_latency(conf: BenchConf, work: Path, port: int) -> list[str]:
    """Photo queries over HTTP, one at a time, asking for ``--rerank`` results, without
    re-ranking, with ``kreciprocal``, with ``rerank`` and with both: p50/p99 latency, each
    against the first in this run."""
    images = ingest(IngestConf(source=conf.photos, output=str(work / "run")))
    desc = extract(ExtractConf.from_flags(images=images, output=str(work / "run/descriptors")))
    local = features(FeaturesConf.from_flags(images=images, output=str(work / "run/local")))
    root = str(work / "run/index")
    build_index(IndexConf(descriptors=desc, output=root, local_features=local))
    serve.run(build_app(ServeConf(index=root)), name=APP_NAME, route_prefix="/")
    client = SearchClient(f"http://127.0.0.1:{port}")
    paths = sorted(p for p in Path(conf.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    queries = [p.read_bytes() for p in paths[:: max(1, len(paths) // 48)]]
    k = conf.rerank
    measured = {}
    for kreciprocal, rerank in ((0, 0), (k, 0), (0, k), (k, k)):
        asked = {"k": k, "rerank": rerank, "kreciprocal": kreciprocal}
        client.search(queries[0], **asked)  # warm: the features' places are read
        latencies, verified = [], 0
        for photo in queries:
            started = time.perf_counter()
            answer = client.search(photo, **asked)
            latencies.append(time.perf_counter() - started)
            verified += (answer.reranked or {}).get("verified", 0)
        label = " + ".join(f"{n}={v}" for n, v in asked.items() if n != "k" and v) or "none"
        measured[label] = (np.percentile(latencies, 50) * 1e3, np.percentile(latencies, 99) * 1e3)
        measured[label] += (verified / len(queries),)
    serve.delete(APP_NAME)
    base = measured["none"][0]
    lines = [
        "",
        f"device: {platform.machine()} CPU, {os.cpu_count()} cores; photo queries over HTTP "
        f"(POST /search, k={k}), one at a time: {len(queries)} of the "
        f"{len(paths)} photos of {conf.photos}, each against all of them",
        f"{'re-ranking':<32}{'p50 ms':>9}{'p99 ms':>9}{'verified':>10}{'p50 vs none':>14}",
    ]
    for label, (p50, p99, verified) in measured.items():
        lines.append(f"{label:<32}{p50:>9.1f}{p99:>9.1f}{verified:>10.1f}{p50 / base:>13.2f}x")
    return lines


if __name__ == "__main__":
    main(tyro.cli(BenchConf))
