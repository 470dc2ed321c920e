"""What the cluster can grow to, what a task or actor reserved, and which paths every node sees.

On an autoscaling cluster the resources present when a stage starts are not the ones it runs
on: the head takes no work and every worker type may start at zero nodes. Pools are sized from
what the cluster can reach (its autoscaler's node types, read from the GCS as Ray Data reads
them) and every task and actor declares what it needs, so the autoscaler sees the demand and
starts the nodes. A piece of work sets its thread counts from the CPUs it reserved: the
autoscaler exports ``OMP_NUM_THREADS=1`` and Ray gives an actor without CPUs one thread.

Torch-free; Ray is imported by the functions that talk to a cluster.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from model import storage

__all__ = [
    "AUTOSCALER_CONFIG",
    "SHARED_STORAGE_VARIABLE",
    "autoscaler_maxima",
    "check_schedulable",
    "is_multi_node",
    "node_local_problems",
    "node_shapes",
    "on_a_cluster",
    "on_shared_storage",
    "reachable_resources",
    "reserved_threads",
    "unschedulable",
    "use_reserved_threads",
]

SHARED_STORAGE_VARIABLE = "CIRRAY_SHARED_STORAGE"
"""Folders (``:``-separated) mounted alike on every node, beside those found network-mounted."""

_NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "lustre", "cifs", "smb3", "ceph", "glusterfs", "beegfs", "gpfs", "wekafs"}
)
"""Mount types whose files every node of a cluster sees (FUSE mounts of object stores too)."""


AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""Where ``ray up`` leaves the cluster's config on the head (node types with their resources
filled in), read by drivers running there, as ``ray job submit`` runs them."""


def reachable_resources() -> dict[str, float]:
    """Each resource at the most the cluster has now or can scale to: its autoscaler's worker
    types times their ``max_workers``, as autoscaler v2 reports them to the GCS or as the
    head's ``~/ray_bootstrap_config.yaml`` lists them; a cluster without one has what it has."""
    import ray  # the driver's cluster, joined by the caller

    now = ray.cluster_resources()
    most: Mapping[str, float] = (
        ray._private.state.state.get_max_resources_from_cluster_config() or {}
    )
    if not most:
        most = autoscaler_maxima(AUTOSCALER_CONFIG.expanduser())
    names = set(now) | set(most)
    return {name: max(float(now.get(name, 0)), float(most.get(name, 0))) for name in names}


def autoscaler_maxima(config: Path) -> dict[str, float]:
    """The resources of an autoscaler config's worker types at their ``max_workers`` (the
    cluster's ``max_workers`` where a type sets none); empty without a readable config."""
    total: dict[str, float] = {}
    for resources, count in _worker_types(config):
        for resource, amount in resources.items():
            total[resource] = total.get(resource, 0.0) + amount * count
    return total


def _worker_types(config: Path) -> list[tuple[dict[str, float], int]]:
    """``(resources, max_workers)`` of each worker type an autoscaler config lists."""
    try:
        cluster = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(cluster, dict):
        return []
    head = cluster.get("head_node_type")
    return [
        (
            {name: float(amount) for name, amount in (node_type.get("resources") or {}).items()},
            int(node_type.get("max_workers", cluster.get("max_workers", 0))),
        )
        for name, node_type in (cluster.get("available_node_types") or {}).items()
        if name != head
    ]


def node_shapes() -> list[dict[str, float]]:
    """The resources of each node the cluster has, and of each worker type its autoscaler
    can start (as autoscaler v2 reports them to the GCS, or the head's bootstrap config)."""
    import ray  # the driver's cluster, joined by the caller

    shapes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs]
    else:
        groups = _worker_types(AUTOSCALER_CONFIG.expanduser())
    return shapes + [resources for resources, count in groups if count != 0]


def unschedulable(request: dict[str, float], shapes: list[dict[str, float]]) -> str | None:
    """Why no node of ``shapes`` can ever hold one ``request`` (a task's or actor's
    resources), or ``None`` when one can: Ray would wait for it without end. Memory counts
    only against shapes that state theirs (the autoscaler fills it in at launch)."""
    wanted = {name: amount for name, amount in request.items() if amount}
    if not wanted or any(_holds(shape, wanted) for shape in shapes):
        return None
    asked = _listed(wanted)
    known = "; ".join("{" + _listed(shape) + "}" for shape in shapes) or "none"
    return f"no node of this cluster, nor one its autoscaler can start, has {asked} ({known})"


def check_schedulable(what: str, request: dict[str, float]) -> None:
    """``ValueError`` naming ``what`` (the flags that set ``request``) when no node of the
    cluster can ever hold one ``request``: fail at once rather than wait without end."""
    problem = unschedulable(request, node_shapes())
    if problem:
        raise ValueError(f"{what}: {problem}")


def _holds(shape: dict[str, float], wanted: dict[str, float]) -> bool:
    if not shape:  # a worker type whose resources its config leaves to the cloud's instance
        return True
    return all(
        shape.get(name, 0.0) >= amount
        for name, amount in wanted.items()
        if name != "memory" or name in shape
    )


def _listed(resources: dict[str, float]) -> str:
    """``CPU: 2, memory: 4.0 GiB, …`` without Ray's per-node and object-store bookkeeping."""
    return ", ".join(
        f"{name}: {amount / 2**30:.1f} GiB" if name == "memory" else f"{name}: {amount:g}"
        for name, amount in sorted(resources.items())
        if not name.startswith("node:") and name != "object_store_memory"
    )


def is_multi_node() -> bool:
    """Whether work may run on another machine than the driver's: more than one node alive,
    or an autoscaler that can start worker nodes."""
    import ray  # the driver's cluster, joined by the caller

    if sum(node["Alive"] for node in ray.nodes()) > 1:
        return True
    config = ray._private.state.state.get_cluster_config()
    if config is not None and any(g.max_count != 0 for g in config.node_group_configs):
        return True
    return any(autoscaler_maxima(AUTOSCALER_CONFIG.expanduser()).values())


def reserved_threads() -> int:
    """Threads for the calling task or actor: the whole CPUs Ray reserved for it; every core
    of the machine for one that reserved none (it shares the machine, as on a laptop) and in a
    process Ray did not start (a driver, a test)."""
    machine = os.cpu_count() or 1
    if not _joined():
        return machine
    import ray  # inside a worker: its own runtime context

    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return machine
    cpus = int(context.get_assigned_resources().get("CPU", 0))
    return cpus if cpus >= 1 else machine


def use_reserved_threads(threads: int | None = None) -> int:
    """Give FAISS (OpenMP) and NumPy's BLAS ``threads`` or ``reserved_threads()`` threads;
    returns them (Ray and the autoscaler export ``OMP_NUM_THREADS=1``, which both would keep)."""
    import faiss  # only the pieces that search or train an index load it
    from threadpoolctl import threadpool_limits  # with FAISS, by the pieces that use it

    threads = threads or reserved_threads()
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads)  # every BLAS and OpenMP runtime loaded in this process
    return threads


def on_shared_storage(path: str | os.PathLike[str]) -> bool:
    """Whether a local path lies on storage every node mounts: a network filesystem (NFS, EFS,
    Lustre, a FUSE mount of an object store…) or a folder named in ``CIRRAY_SHARED_STORAGE``."""
    target = Path(path).expanduser().resolve()
    declared = os.environ.get(SHARED_STORAGE_VARIABLE, "")
    for folder in filter(None, declared.split(os.pathsep)):
        if target.is_relative_to(Path(folder).expanduser().resolve()):
            return True
    kind = _mount_type(target)
    return kind in _NETWORK_FILESYSTEMS or kind.startswith("fuse.")


def _mount_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (``""`` where mounts are unknown)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = Path("/"), ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(fields[1].replace("\\040", " "))
        if path.is_relative_to(mount) and len(mount.parts) >= len(best.parts):
            best, kind = mount, fields[2]
    return kind


def node_local_problems(**flags: str | None) -> list[str]:
    """``"--flag: …"`` for each local path that only this machine sees, when the stage's work
    runs on a cluster of more than one node (joined through ``RAY_ADDRESS``, as ``ray job
    submit`` sets it, or already joined): its tasks would read or write whichever node they
    land on. S3 URIs and shared storage are fine; a single machine takes any path."""
    local = {
        name: uri
        for name, uri in flags.items()
        if uri and not storage.is_remote(uri) and not on_shared_storage(storage.local_path(uri))
    }
    if not local or not on_a_cluster():
        return []
    return [
        f"--{name.replace('_', '-')}: {uri} is on this machine only, but the cluster has more "
        f"than one node; give an s3:// URI or a folder on shared storage "
        f"(network-mounted, or named in {SHARED_STORAGE_VARIABLE})"
        for name, uri in local.items()
    ]


def on_a_cluster() -> bool:
    """Join the cluster ``RAY_ADDRESS`` names (if not joined yet) and tell whether it has more
    than one node; ``False`` without a named or joined cluster."""
    if not _joined() and not os.environ.get("RAY_ADDRESS"):
        return False
    import ray  # a cluster is named: the stage joins it anyway

    if not ray.is_initialized():
        ray.init()
    return is_multi_node()


def _joined() -> bool:
    """Whether this process has joined a Ray cluster (without importing Ray to ask)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
