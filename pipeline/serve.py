"""The serve stage: search over an index on Ray Serve, behind HTTP and a Python client.

    python -m pipeline.serve --index OUT/index [--host 127.0.0.1] [--port 8000]

Serves the index at ``INDEX`` (a folder or ``s3://`` prefix written by ``pipeline.index``) in
the state its ``CURRENT`` record names (:mod:`cluster.served`: the version, its manifest and its
network; made from the newest complete version when absent), following that record as the
index stage publishes versions and ``POST /reload`` promotes them, as one Serve application of
four kinds of deployment:

- ``IndexShard`` (``cluster.router``), one per slot: slot ``i`` of ``--slots`` holds the
  shards ``number % slots == i`` of each version (default: a slot per shard), with
  ``--replicas`` replicas each (with ``--max-replicas``, as many as Serve's autoscaler starts
  under load, up to that), on CPU FAISS or, with ``--gpus-per-shard``, GPU FAISS;
- ``SearchRouter``: the one owner of the served version, which it switches once every shard
  replica holds a new state (``POST /reload``); it answers photos, batch requests and the
  Python handle: batches (``cluster.batching``, enough in flight to keep every shard replica
  busy) fanned out to the slots and merged, αQE included (``cluster.fanout``);
- ``Embedder`` (``--embedder-replicas``, autoscaled up to ``--embedder-max-replicas``): photo
  bytes → a descriptor with the network of the index version it is searched in (pinned in the
  index; one whose identity is not the one the descriptors recorded is refused);
- ``SearchApp`` (``cluster.app``): the FastAPI ingress, the search page and ``/docs``; it
  sends the descriptor queries that arrive together to the slots itself, as one batch, in the
  version the router serves (asked again every 0.2 s), so they take no hop through the router.

Everything that decides scale is configuration, here or in a Serve config file:
``--write-config serve.yaml`` writes one (the builder ``pipeline.serve:app_builder``, these
flags as its ``args``, every deployment's replicas or ``autoscaling_config``, admission limit
and resources spelled out) for ``serve deploy serve.yaml`` or ``serve run serve.yaml``.
(``serve build`` wants an application that exists at import time; ours needs its index first,
so it builds the file itself.) On a cluster:
``ray job submit --working-dir . -- python -m pipeline.serve --index s3://... --host 0.0.0.0``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import yaml
from ray import serve

from cluster import index_store, served
from cluster.app import SearchApp
from cluster.embedder import Embedder, network_problem
from cluster.resources import node_local_problems, on_a_cluster
from cluster.router import IndexShard, SearchRouter
from model import storage, tables
from model.cli import FlatFlags, log_settings, parse_memory, run_cli
from model.kreciprocal import KReciprocalOptions
from model.retrieval import QueryExpansion
from model.settings import raise_problems
from model.verification import VerifyOptions

__all__ = ["APP_NAME", "SERVE_ENV", "ServeConf", "app_builder", "build_app", "run", "start_serve"]

logger = logging.getLogger(__name__)

APP_NAME = "cirray"

SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}
"""The environment of Serve's controller, which its proxies inherit: the proxy hands each HTTP
request to the ingress over gRPC rather than through Ray's object store, which on
``bench/search.py`` takes the 4-shard path from 0.56x to 0.68x of single-process FAISS."""

_SERVE_METRICS_INTERVAL_S = 10.0
"""Serve's own default of ``autoscaling_config.metrics_interval_s``."""

DRAIN_CHECK_S = 0.2
"""How often a replica being stopped (scaled down, replaced, its app deleted) looks for the
requests it still answers; Serve's default, 2 s, holds every stop that long, while a search
lasts milliseconds."""


@dataclass(frozen=True)
class ServeConf(FlatFlags):
    """Settings of the search service; every field is a command-line flag."""

    index: str
    """Index folder or s3:// prefix written by pipeline.index."""
    host: str = "127.0.0.1"
    port: int = 8000
    version: int | None = None
    """Version to serve: made the served state (INDEX/CURRENT) before the service starts
    (default: the one CURRENT names, or the newest complete one when the index has none)."""
    slots: int | None = None
    """Shard deployments (default: one per shard of the version served first)."""
    replicas: int = 1
    """Replicas of each shard deployment (with --max-replicas: the fewest it scales down to)."""
    max_replicas: int | None = None
    """Most replicas of each shard deployment: above --replicas, Serve's autoscaler adds
    replicas while the shards are busy and removes them after (default: a fixed --replicas)."""
    cpus_per_shard: float | None = None
    """CPUs each shard replica reserves: default 1 on a cluster of several nodes (what the
    autoscaler starts nodes for; nothing lands on a head without CPUs), 0 on one machine."""
    gpus_per_shard: float = 0.0
    """GPUs each shard replica reserves; with faiss-gpu the shard is searched on the GPU."""
    memory_per_shard: str | None = None
    """Memory each shard replica reserves, e.g. 8G: default twice its shards' stored size in
    the version served first (a reload holds the old version and the new one) plus 512M."""
    threads_per_shard: int | None = None
    """FAISS threads of a shard replica (default: the CPUs it reserved; every core of its
    machine when it reserved none)."""
    embedder_replicas: int = 1
    """Replicas of the embedder (with --embedder-max-replicas: the fewest)."""
    embedder_max_replicas: int | None = None
    """Most replicas of the embedder, autoscaled as --max-replicas does the shards' (default: a
    fixed --embedder-replicas)."""
    cpus_per_embedder: float | None = None
    """CPUs the embedder reserves (its torch threads): default as --cpus-per-shard."""
    gpus_per_embedder: float = 0.0
    ingress_replicas: int = 1
    target_ongoing_requests: float = 2.0
    """Autoscaling: the requests each replica should have in hand (working on or queued for);
    Serve keeps the replica count near the deployment's total over this. A shard gets one call
    per batch of queries, so below 1 adds shard replicas before full batches queue up."""
    upscale_delay_s: float = 30.0
    """Autoscaling: how long the load must stay above the target before replicas are added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: how long the load must stay below the target before replicas are removed."""
    look_back_period_s: float = 30.0
    """Autoscaling: the window over which a deployment's load is averaged."""
    metrics_interval_s: float = 10.0
    """Autoscaling: how often the load is reported to Serve's controller (below
    --look-back-period-s)."""
    max_ongoing_requests: int = 64
    """Requests a replica works on at once (Serve's admission limit)."""
    max_batch_size: int = 32
    """Most queries sent on together to the shards, by the ingress and by the router: a batch
    leaves as soon as the one before it is answered, with every query that arrived meanwhile
    (no fixed wait)."""
    embed_batch_size: int = 8
    qe: QueryExpansion = field(default_factory=lambda: QueryExpansion(qe_k=10))
    """αQE of a query asked with qe=true (flags --qe-k, --qe-alpha)."""
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    """Spatial verification of a query asked with rerank=K (flags --rerank-ratio,
    --rerank-model, --rerank-max-error, --rerank-min-inliers, --rerank-max-trials): the same
    as pipeline.evaluate's, so both rank a query alike."""
    kreciprocal: KReciprocalOptions = field(default_factory=KReciprocalOptions)
    """k-reciprocal re-ranking of a query asked with kreciprocal=K (flags --kreciprocal-k1,
    --kreciprocal-k2, --kreciprocal-lambda): the same as pipeline.evaluate --kreciprocal-top K."""
    max_body_mb: float = 20.0
    watch_s: float = 0.0
    """Also promote every newer complete index version within this many seconds of its
    publication (for versions published with --no-promote; 0: off)."""
    follow_s: float = 1.0
    """How often every replica reads the served state (INDEX/CURRENT): a version the index
    stage publishes is served within about this long once every replica has loaded it."""
    switch_timeout_s: float = 300.0
    """How long POST /reload waits for every shard replica to load the version before it
    answers 503 (the old version is served until they have)."""
    detach: bool = False
    """Return once the app is up instead of serving until interrupted."""
    write_config: str | None = None
    """Write a Serve config file of these settings here (for serve deploy) and stop."""


def _check(conf: ServeConf) -> dict[str, Any]:
    """Every problem with the settings and the index at once; returns the manifest served."""
    problems = _flag_problems(conf)
    manifest, index_problems = _index_problems(conf)
    problems += index_problems
    raise_problems(problems)
    return manifest


def _flag_problems(conf: ServeConf) -> list[str]:
    problems = []
    for name in ("replicas", "embedder_replicas", "ingress_replicas", "max_ongoing_requests"):
        if getattr(conf, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name, least in (
        ("max_replicas", "replicas"),
        ("embedder_max_replicas", "embedder_replicas"),
    ):
        most = getattr(conf, name)
        if most is not None and most < getattr(conf, least):
            problems.append(
                f"--{name.replace('_', '-')} {most} is below --{least.replace('_', '-')} "
                f"{getattr(conf, least)}: replicas scale between the two"
            )
    if conf.target_ongoing_requests <= 0:
        problems.append("--target-ongoing-requests must be above 0")
    for name in ("upscale_delay_s", "downscale_delay_s"):
        if getattr(conf, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more seconds")
    if conf.metrics_interval_s <= 0:
        problems.append("--metrics-interval-s must be above 0 seconds")
    elif conf.look_back_period_s <= conf.metrics_interval_s:
        problems.append(
            f"--look-back-period-s {conf.look_back_period_s} must be longer than "
            f"--metrics-interval-s {conf.metrics_interval_s}: the window averages several reports"
        )
    if conf.slots is not None and conf.slots < 1:
        problems.append("--slots must be at least 1")
    if not 1 <= conf.max_batch_size <= 4096:
        problems.append("--max-batch-size must be in 1..4096")
    if conf.qe.qe_k < 1:
        problems.append("--qe-k must be at least 1 (queries ask for αQE with qe=true)")
    if conf.watch_s < 0:
        problems.append("--watch-s must be 0 (off) or a positive number of seconds")
    if conf.follow_s <= 0:
        problems.append("--follow-s must be a positive number of seconds")
    if conf.switch_timeout_s <= 0:
        problems.append("--switch-timeout-s must be a positive number of seconds")
    if not 0 < conf.port < 65536:
        problems.append(f"--port {conf.port} is not a port")
    return problems


def _index_problems(conf: ServeConf) -> tuple[dict[str, Any], list[str]]:
    """The manifest of the version served first, and why it cannot be served: none there, or
    a network that is gone or not the one its descriptors were made with."""
    bucket = storage.bucket_problem(conf.index)
    if bucket:
        return {}, [f"--index: {bucket}"]
    local = node_local_problems(index=conf.index)
    if local:
        return {}, local
    try:
        manifest = index_store.read_manifest(conf.index, _version_to_serve(conf))
    except (FileNotFoundError, ValueError) as err:
        return {}, [f"--index: {err}"]
    if not manifest.get("network"):
        return manifest, [f"--index: {conf.index} names no network, so photos cannot be described"]
    problem = network_problem(manifest["network"], manifest.get("settings", {}))
    return manifest, [f"--index: {problem}"] if problem else []


def _version_to_serve(conf: ServeConf) -> int | None:
    """``--version``, else the one ``CURRENT`` names (``None``: the newest complete one)."""
    if conf.version is not None:
        return conf.version
    current, _ = served.read_current(conf.index)
    return current.version if current is not None else None


def deployment_options(
    conf: ServeConf, manifest: dict[str, Any], *, multi_node: bool
) -> dict[str, dict[str, Any]]:
    """Serve options of every deployment, by name: what ``build_app`` binds and what a config
    file written by ``--write-config`` lists (where they can be changed without code).

    On a cluster of several nodes every deployment reserves CPUs, so none lands on a head that
    takes no work and the autoscaler starts nodes for them; on one machine the deployments
    share its cores and reserve none (the router and ingress mostly wait on the others)."""
    default_cpus = 1.0 if multi_node else 0.0
    slots = _slots(conf, manifest)
    shard_cpus = default_cpus if conf.cpus_per_shard is None else conf.cpus_per_shard
    embedder_cpus = default_cpus if conf.cpus_per_embedder is None else conf.cpus_per_embedder
    front_cpus = 0.5 if multi_node else 0.0
    options = {}
    for slot, memory in enumerate(_shard_memory(conf, manifest, slots)):
        options[f"IndexShard{slot}"] = {
            **_replicas(conf, conf.replicas, conf.max_replicas),
            "max_ongoing_requests": conf.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": shard_cpus,
                "num_gpus": conf.gpus_per_shard,
                "memory": memory,
            },
        }
    options["SearchRouter"] = {
        "num_replicas": 1,  # the one owner of the served version
        # room for its batches in flight and one filling
        "max_ongoing_requests": max(
            conf.max_ongoing_requests, (_router_batches(conf) + 1) * conf.max_batch_size
        ),
        "ray_actor_options": {"num_cpus": front_cpus},
    }
    options["Embedder"] = {
        **_replicas(conf, conf.embedder_replicas, conf.embedder_max_replicas),
        "max_ongoing_requests": conf.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": embedder_cpus, "num_gpus": conf.gpus_per_embedder},
    }
    options["SearchApp"] = {
        "num_replicas": conf.ingress_replicas,
        "max_ongoing_requests": conf.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": front_cpus},
    }
    for deployment in options.values():
        deployment["graceful_shutdown_wait_loop_s"] = DRAIN_CHECK_S
    return options


def _replicas(conf: ServeConf, least: int, most: int | None) -> dict[str, Any]:
    """A fixed ``num_replicas``, or, when ``most`` is above ``least``, Serve's
    ``autoscaling_config`` between the two (Serve takes one or the other)."""
    if most is None or most <= least:
        return {"num_replicas": least}
    autoscaling = {
        "min_replicas": least,
        "max_replicas": most,
        "target_ongoing_requests": conf.target_ongoing_requests,
        "upscale_delay_s": conf.upscale_delay_s,
        "downscale_delay_s": conf.downscale_delay_s,
        "look_back_period_s": conf.look_back_period_s,
    }
    if conf.metrics_interval_s != _SERVE_METRICS_INTERVAL_S:  # a field Serve deprecates
        autoscaling["metrics_interval_s"] = conf.metrics_interval_s
    return {"autoscaling_config": autoscaling}


def _router_batches(conf: ServeConf) -> int:
    """Batches the router has in flight at once: one per shard replica, or enough for the most
    replicas a slot scales to to each hold the target (one at a time, replicas take turns)."""
    if conf.max_replicas is None or conf.max_replicas <= conf.replicas:
        return conf.replicas
    return math.ceil(conf.max_replicas * conf.target_ongoing_requests)


def _shard_memory(conf: ServeConf, manifest: dict[str, Any], slots: int) -> list[int]:
    """Bytes each slot's replica reserves: ``--memory-per-shard``, or twice the stored size of
    its shards in ``manifest`` plus 512M."""
    if conf.memory_per_shard:
        return [parse_memory(conf.memory_per_shard)] * slots
    stored = [0] * slots
    for number, shard in enumerate(manifest.get("shards", [])):
        stored[number % slots] += int(shard.get("bytes", 0))
    return [2 * size + 512 * 2**20 for size in stored]


def _slots(conf: ServeConf, manifest: dict[str, Any]) -> int:
    return conf.slots or max(1, len(manifest["shards"]))


def _resolved(conf: ServeConf) -> ServeConf:
    """``conf`` with the index where it lies (a relative path means the same to every replica,
    whatever its working directory)."""
    return dataclasses.replace(conf, index=tables.resolve(conf.index))


def build_app(conf: ServeConf) -> Any:
    """The bound Serve application, for ``serve.run``."""
    conf = _resolved(conf)
    manifest = _check(conf)
    if conf.version is not None:
        served.promote(conf.index, int(manifest["version"]))
    else:
        served.served_state(conf.index)  # CURRENT made from the newest version when absent
    slots = _slots(conf, manifest)
    options = deployment_options(conf, manifest, multi_node=on_a_cluster())
    shard_handles = [
        IndexShard.options(name=f"IndexShard{slot}", **options[f"IndexShard{slot}"]).bind(
            conf.index,
            slot,
            slots,
            gpu=conf.gpus_per_shard > 0,
            threads=conf.threads_per_shard,
            follow_s=conf.follow_s,
        )
        for slot in range(slots)
    ]
    embedder = Embedder.options(**options["Embedder"]).bind(
        conf.index, max_batch_size=conf.embed_batch_size
    )
    router = SearchRouter.options(**options["SearchRouter"]).bind(
        conf.index,
        shard_handles,
        embedder,
        qe=conf.qe,
        verify=conf.verify,
        kreciprocal=conf.kreciprocal,
        max_batch_size=conf.max_batch_size,
        concurrent_batches=_router_batches(conf),
        watch_s=conf.watch_s,
        follow_s=conf.follow_s,
        switch_timeout_s=conf.switch_timeout_s,
    )
    return SearchApp.options(**options["SearchApp"]).bind(
        router,
        conf.index,
        shard_handles,
        qe=conf.qe,
        kreciprocal=conf.kreciprocal,
        max_body_bytes=int(conf.max_body_mb * 2**20),
        max_batch_size=conf.max_batch_size,
        concurrent_batches=_router_batches(conf),
    )


def serve_config(conf: ServeConf) -> dict[str, Any]:
    """A Serve config file's contents (``serve deploy`` / ``serve run`` it): the builder
    ``pipeline.serve:app_builder`` with these settings as ``args``, and every deployment's
    options spelled out for editing."""
    conf = _resolved(conf)
    manifest = _check(conf)
    defaults = ServeConf(index=conf.index).settings()
    args = {
        name: value
        for name, value in conf.settings().items()
        if name == "index" or value != defaults[name]
    }
    args = {k: v for k, v in args.items() if k not in ("host", "port", "detach", "write_config")}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": conf.host, "port": conf.port},
        "controller_options": {"runtime_env": {"env_vars": SERVE_ENV}},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "pipeline.serve:app_builder",
                "args": args,
                "deployments": [
                    {"name": name, **options}
                    # a config file is for a cluster (serve deploy): its defaults
                    for name, options in deployment_options(conf, manifest, multi_node=True).items()
                ],
            }
        ],
    }


def app_builder(args: dict[str, Any]) -> Any:
    """The application builder of Serve config files (``import_path:
    pipeline.serve:app_builder``): ``args`` are :class:`ServeConf`'s flags, ``index`` required."""
    known = set(ServeConf(index="").settings())
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown serve args {unknown}; known: {sorted(known)}")
    if "index" not in args:
        raise ValueError("serve args need 'index': the index folder or s3:// prefix")
    return build_app(ServeConf.from_flags(**args))


def start_serve(host: str, port: int) -> None:
    """Ray Serve on the cluster joined (or a local Ray), its HTTP proxy on ``host:port``, with
    ``SERVE_ENV``; a Serve already running is joined as it is."""
    if not ray.is_initialized():
        ray.init()
    serve.start(
        http_options={"host": host, "port": port},
        controller_options={"runtime_env": {"env_vars": SERVE_ENV}},
    )


def run(conf: ServeConf) -> str:
    """Start (or update) the app; returns its URL. Blocks until interrupted unless detached."""
    log_settings(logger, "serve", conf)
    if conf.write_config:
        text = yaml.safe_dump(serve_config(conf), sort_keys=False)
        storage.write_text(conf.write_config, text)
        logger.info("wrote %s: serve deploy %s", conf.write_config, conf.write_config)
        return conf.write_config
    app = build_app(conf)
    start_serve(conf.host, conf.port)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{conf.host}:{conf.port}"
    logger.info("serving %s at %s (search page at /, API at /docs)", conf.index, url)
    if not conf.detach:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(APP_NAME)
    return url


if __name__ == "__main__":
    run_cli(run, ServeConf)
