"""A stage run while one of its worker nodes dies: ``python -m tests.node_loss STAGE WORK``.

Run by ``tests/test_node_loss.py`` in a process of its own (a driver joins one cluster only):
Ray's ``ray.cluster_utils.Cluster`` starts a head without CPUs and two 1-CPU worker nodes on
this machine, ``STAGE`` (``extract`` or ``sfm``) runs on the inputs under ``WORK``, and as soon
as the stage has stored its first result, the raylet of a worker node that is running its work
is killed (SIGKILL, by the pid this script started). A fresh node joins, as an autoscaler would
start one. Writes ``WORK/STAGE-report.json``: the killed node, and what the stage returned.
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


def _raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


WORK_UNDER_WAY = {"extract": "Describer", "sfm": "_task"}
"""A name in the stage's running tasks once its real work runs (not its reads or writes)."""


def _busy_node(stage: str, workers: list) -> object | None:
    """A worker node running the stage's work now, or ``None`` yet."""
    from ray.util.state import list_tasks  # the dashboard's state API

    running = list_tasks(filters=[("state", "=", "RUNNING")], raise_on_missing_output=False)
    busy = {t.node_id for t in running if WORK_UNDER_WAY[stage] in t.name}
    return next((n for n in workers if n.node_id in busy), None)


def main(stage: str, work: Path) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = str(work / stage)
    killed: dict[str, str] = {}

    def kill_when_under_way() -> None:
        victim = None
        while victim is None:
            time.sleep(0.5)
            victim = _busy_node(stage, workers)
        os.kill(_raylet_pid(victim), signal.SIGKILL)
        killed["node"] = victim.node_id
        cluster.add_node(num_cpus=1)  # the autoscaler's replacement

    killer = threading.Thread(target=kill_when_under_way, daemon=True)
    killer.start()
    try:
        if stage == "extract":
            from pipeline.extract import ExtractConf, run  # one stage per process

            result = run(
                ExtractConf.from_flags(
                    images=str(work / "run"), output=out, max_size=320, batch_size=2
                )
            )
        else:
            from pipeline.sfm import SfmConf, run  # one stage per process

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
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
