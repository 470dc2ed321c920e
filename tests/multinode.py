"""Multi-node Ray clusters on this machine, for the tests that need more than one node.

``AutoscalingHead``: a real ``ray start --head`` whose autoscaler uses Ray's ``fake_multinode``
provider: worker nodes are launched on demand from ``available_node_types``, as on AWS, each a
raylet of its own on this machine. The head takes no work (``CPU: 0``) and every worker type
starts at zero nodes, as in ``ray-cluster.yaml``. Everything listens on 127.0.0.1 (Ray's
"local cluster" setting), under a temporary folder and in a process group of the test's own,
killed by its pid when done.

``submit``: ``ray job submit`` to it, as a user runs the stages on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_cluster_env(**extra: str) -> dict[str, str]:
    """This environment with Ray held to 127.0.0.1 and this Python's tools first on PATH.

    OpenCV's import prepends its own folder to ``LD_LIBRARY_PATH`` in this process; a fresh
    process given it loads libraries torch's MKL cannot live with, so it is left out."""
    inherited = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    library_path = [
        p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and "cv2" not in p
    ]
    if library_path:
        inherited["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    return {
        **inherited,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's switch to loopback addresses
        "RAY_USAGE_STATS_ENABLED": "0",
        **extra,
    }


def fake_multinode_config(gcs_port: int, worker_types: dict[str, Any]) -> dict[str, Any]:
    """An autoscaler config for the ``fake_multinode`` provider (its example config is not in
    the wheel): a head of no CPUs named ``ray.head.default`` and ``worker_types`` beside it."""
    return {
        "cluster_name": "cirray-fake",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{
                name: {"node_config": {}, "min_workers": 0, **spec}
                for name, spec in worker_types.items()
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingHead:
    """A head with ``CPU: 0`` and an autoscaler that launches ``worker_types`` on demand."""

    def __init__(self, folder: Path, worker_types: dict[str, Any]) -> None:
        self.folder = folder
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        # Token authentication on, as Ray recommends (and does by default): the jobs CLI and
        # the nodes the autoscaler starts read the token from the environment.
        self.env = local_cluster_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        config = folder / "ray_bootstrap_config.yaml"  # JSON is YAML
        config.write_text(json.dumps(fake_multinode_config(self.gcs_port, worker_types)))
        # Short, under /tmp: Ray's socket paths must fit AF_UNIX's 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.process = subprocess.Popen(
            [
                f"{BIN}/ray",
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                f"--autoscaling-config={config}",
                *(
                    f"--{name}={free_port()}"
                    for name in (
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "metrics-export-port",
                        "runtime-env-agent-port",
                        "ray-client-server-port",
                        "node-manager-port",
                        "object-manager-port",
                    )
                ),
            ],
            env={
                **self.env,
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # The head's home holds the autoscaler's config where `ray up` leaves it
                # (~/ray_bootstrap_config.yaml), where drivers on the head read it.
                "HOME": str(folder),
            },
            stdout=(folder / "head.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: everything it starts dies with it
        )
        try:
            self._wait_for_jobs_api()
        except BaseException:
            self.stop()
            raise

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self._request("/api/version"), timeout=2).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "head.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the Ray head did not start:\n{log}") from None
                time.sleep(0.5)

    def _request(self, path: str) -> urllib.request.Request:
        token = self.env["RAY_AUTH_TOKEN"]
        return urllib.request.Request(
            f"{self.address}{path}", headers={"Authorization": f"Bearer {token}"}
        )

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has known, alive or dead: id, alive, head, resources."""
        return [
            {
                "node_id": node["node_id"],
                "alive": node["state"] == "ALIVE",
                "head": node["is_head_node"],
                "resources": node.get("resources_total", {}),
            }
            for node in self.state("nodes")
        ]

    def state(self, kind: str) -> list[dict[str, Any]]:
        """Ray's state API (``tasks``, ``actors``…), every entry with its details."""
        path = f"/api/v0/{kind}?detail=1&limit=10000&timeout=30"
        with urllib.request.urlopen(self._request(path), timeout=60) as reply:
            return json.loads(reply.read())["data"]["result"]["result"]

    def autoscaler_log(self) -> str:
        logs = self.temp_dir / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("monitor*")))

    def stop(self) -> None:
        """SIGTERM to the head's process group, a short grace, then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        logs = self.folder / "ray-logs"
        if not logs.exists():  # kept with the test's files, for a failure's post-mortem
            shutil.copytree(self.temp_dir / "session_latest" / "logs", logs, dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def submit(
    address: str, env: dict[str, str], cwd: Path, *commands: str, timeout: float = 900
) -> str:
    """One job running each ``python -m <command>`` in turn from ``cwd`` (a command is one
    string of space-separated words), waited for; its output. The head's job agent may still
    be starting just after the head answers, so that one refusal is retried (bounded).

    The code is the project installed in the cluster's environment (as ``ray-cluster.yaml``
    installs it on every node), not a ``--working-dir`` upload: nodes sharing one machine share
    one runtime-env folder, which a node starting later clears under a running job."""
    entrypoint = f"cd {shlex.quote(str(cwd))} && " + " && ".join(
        f"python -m {shlex.join(c.split())}" for c in commands
    )
    args = [f"{BIN}/ray", "job", "submit", "--address", address, "--", "bash", "-c", entrypoint]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        output = done.stdout + done.stderr
        if done.returncode == 0 or "No available agent" not in output:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    if done.returncode != 0:
        raise AssertionError(f"job failed ({done.returncode}):\n{output[-4000:]}")
    return done.stdout
