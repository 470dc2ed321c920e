"""Stages run while one of their worker nodes dies: ``python -m tests.node_loss WORK STAGE…``.

Run by ``tests/test_node_loss.py`` in a process of its own (a driver joins one cluster only):
Ray's ``ray.cluster_utils.Cluster`` starts a head without CPUs and a 1-CPU worker node per
stage plus one on this machine; each ``STAGE`` (``extract``, ``sfm``) in turn runs on the inputs
under ``WORK``, and as soon as its real work runs, the raylet of a worker node running it is
killed (SIGKILL, by the pid this script started): the stage goes on with the nodes left.
Writes ``WORK/STAGE-report.json`` for each: the killed node, and what the stage returned.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from tests.multinode import free_port


def _raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


WORK_UNDER_WAY = {"extract": "Describer", "sfm": "_task"}
"""A name in the stage's running tasks once its real work runs (not its reads or writes)."""


def _busy_node(stage: str, workers: list, address: str) -> object | None:
    """A worker node running the stage's work now, or ``None`` yet."""
    from ray.util.state import list_tasks  # the dashboard's state API

    running = list_tasks(
        address=address, filters=[("state", "=", "RUNNING")], raise_on_missing_output=False
    )
    busy = {t.node_id for t in running if WORK_UNDER_WAY[stage] in t.name}
    return next((n for n in workers if n.node_id in busy), None)


def main(work: Path, stages: list[str]) -> None:
    cluster = Cluster(
        initialize_head=True,
        # the dashboard and its agent on free ports: another Ray on this machine may hold the
        # defaults (8265, 52365)
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            # a lost node is declared dead after 3 missed health checks 0.5 s apart, where
            # Ray's defaults (5 checks 3 s apart) left each stage waiting 15 s to hear of it
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 500,
                "health_check_failure_threshold": 3,
            },
        },
    )
    # the worker nodes start side by side; then every one of them has joined
    workers = [cluster.add_node(wait=False, num_cpus=1) for _ in range(len(stages) + 1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        for stage in stages:
            _lose_a_node_during(stage, work, cluster, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _lose_a_node_during(stage: str, work: Path, cluster: Cluster, workers: list) -> None:
    out = str(work / stage)
    killed: dict[str, str] = {}

    def kill_when_under_way() -> None:
        victim = None
        while victim is None:
            time.sleep(0.5)
            victim = _busy_node(stage, workers, cluster.address)
        os.kill(_raylet_pid(victim), signal.SIGKILL)
        killed["node"] = victim.node_id
        workers.remove(victim)

    killer = threading.Thread(target=kill_when_under_way, daemon=True)
    killer.start()
    if stage == "extract":
        from pipeline.extract import ExtractConf, run  # the stages' code, once the cluster is up

        result = run(
            ExtractConf.from_flags(images=str(work / "run"), output=out, max_size=320, batch_size=2)
        )
    else:
        from pipeline.sfm import SfmConf, run  # the stages' code, once the cluster is up

        result = run(
            SfmConf(
                images=str(work / "run"),
                groups=str(work / "groups"),
                output=out,
                mapper="incremental",
            )
        )
    killer.join(timeout=5)
    report = {"killed": killed.get("node"), "output": result}
    (work / f"{stage}-report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
