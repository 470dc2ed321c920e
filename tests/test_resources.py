"""cluster.resources: what an autoscaler config lets the cluster reach, which paths every node
sees, and the threads a Ray task gets from the CPUs it reserved."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np  # noqa: F401  (its own BLAS is one threadpoolctl must reach)
import pytest
import ray
import yaml
from threadpoolctl import threadpool_info

from cluster import resources


def _write_config(path: Path) -> Path:
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 8, "memory": 32e9}, "max_workers": 4},
            "gpu": {"resources": {"CPU": 4, "GPU": 1}},  # the cluster's max_workers: 3
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_autoscaler_maxima_are_worker_types_times_their_max_workers(tmp_path: Path) -> None:
    maxima = resources.autoscaler_maxima(_write_config(tmp_path / "cluster.yaml"))
    assert maxima == {"CPU": 8 * 4 + 4 * 3, "memory": 32e9 * 4, "GPU": 3}


def test_autoscaler_maxima_without_a_readable_config_are_empty(tmp_path: Path) -> None:
    assert resources.autoscaler_maxima(tmp_path / "missing.yaml") == {}
    (tmp_path / "bad.yaml").write_text("{not: yaml: at all")
    assert resources.autoscaler_maxima(tmp_path / "bad.yaml") == {}


def test_shared_storage_is_a_network_mount_or_a_declared_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(resources.SHARED_STORAGE_VARIABLE, raising=False)
    assert not resources.on_shared_storage(tmp_path / "run")
    monkeypatch.setenv(resources.SHARED_STORAGE_VARIABLE, f"/nonexistent{os.pathsep}{tmp_path}")
    assert resources.on_shared_storage(tmp_path / "run" / "index")
    assert not resources.on_shared_storage(tmp_path.parent / "elsewhere")


def test_one_machine_takes_any_local_path(ray_session, tmp_path: Path) -> None:
    assert resources.node_local_problems(output=str(tmp_path), source="s3://bucket/x") == []


def _threads_seen(threads: int | None = None) -> dict[str, int]:
    """Runs in a Ray task: FAISS's and BLAS's threads before and after use_reserved_threads."""

    def blas() -> int:  # NumPy's own BLAS, which FAISS's OpenMP setting does not reach
        pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
        return min(p["num_threads"] for p in pools)

    before = {"faiss_before": faiss.omp_get_max_threads(), "blas_before": blas()}
    used = resources.use_reserved_threads(threads)
    return {**before, "used": used, "faiss": faiss.omp_get_max_threads(), "blas": blas()}


def test_a_task_uses_the_cpus_it_reserved_despite_omp_num_threads_1(ray_session) -> None:
    # As the autoscaler starts workers: OMP_NUM_THREADS=1 and BLAS limited alike.
    single = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    task = ray.remote(_threads_seen)
    env = {"env_vars": single}
    reserved, unreserved = ray.get(
        [
            task.options(num_cpus=2, runtime_env=env).remote(),
            task.options(num_cpus=0, runtime_env=env).remote(),
        ]
    )
    assert (reserved["faiss_before"], reserved["blas_before"]) == (1, 1)
    assert reserved == {**reserved, "used": 2, "faiss": 2, "blas": 2}
    # No CPUs reserved: it shares the machine (a laptop, a test), as Ray's 0-CPU actors do.
    machine = os.cpu_count() or 1
    assert unreserved == {**unreserved, "used": machine, "faiss": machine, "blas": machine}


def test_a_request_no_node_can_hold_is_named() -> None:
    shapes = [
        {"CPU": 0.0, "node:10.0.0.1": 1.0},
        {"CPU": 8.0, "memory": 32 * 2**30},
        {"CPU": 4.0, "GPU": 1.0},
    ]
    assert resources.unschedulable({"CPU": 4, "GPU": 1}, shapes) is None
    assert resources.unschedulable({"CPU": 8, "GPU": 0}, shapes) is None
    assert resources.unschedulable({"GPU": 8}, [*shapes, {}]) is None  # a type left to its cloud
    assert resources.unschedulable({"CPU": 8, "memory": 2**40}, shapes) is not None
    assert resources.unschedulable({"CPU": 4, "memory": 2**40}, shapes) is None  # memory untold
    problem = resources.unschedulable({"CPU": 8, "GPU": 1}, shapes)
    assert problem == (
        "no node of this cluster, nor one its autoscaler can start, has CPU: 8, GPU: 1 "
        "({CPU: 0}; {CPU: 8, memory: 32.0 GiB}; {CPU: 4, GPU: 1})"
    )


def test_node_shapes_are_the_nodes_alive_and_the_types_the_autoscaler_can_start(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (local,) = resources.node_shapes()
    assert local["CPU"] == 2
    monkeypatch.setattr(resources, "AUTOSCALER_CONFIG", _write_config(tmp_path / "cluster.yaml"))
    shapes = resources.node_shapes()
    assert shapes[1:] == [{"CPU": 8, "memory": 32e9}, {"CPU": 4, "GPU": 1}]
