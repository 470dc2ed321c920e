"""ray-cluster.yaml passes the Ray autoscaler's own validation, and what it needs to come up on AWS
holds without AWS: current images named by their public parameters, Ray/Python/uv pinned once (the
lock files for packages), FAISS as one extra per node type, setup that fails loudly, the IAM the
head needs, uploads without run outputs, and a README whose commands reach the dashboard the way
Ray documents it."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray._private.runtime_env import packaging as ray_packaging
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import merge_setup_commands, prepare_config, validate_config

from tests.conftest import REPO

LOCKS = {"cpu": REPO / "requirements/cluster-cpu.txt", "gpu": REPO / "requirements/cluster-gpu.txt"}
PYTHON = "3.11.18"  # the cluster's Python, to the patch release (Ray compares it node to node)
UV = "0.13.9"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


def _pins(lock: Path) -> dict[str, str]:
    """name -> version of every package a lock file pins."""
    pins = {}
    for line in lock.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _node_setup(config: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs, merged as Ray merges them: setup_commands before
    head_setup_commands or worker_setup_commands, and a node type's own worker_setup_commands in
    place of both."""
    merged = merge_setup_commands(copy.deepcopy(config))
    types = config["available_node_types"]
    return {
        name: merged["head_setup_commands"]
        if name == config["head_node_type"]
        else types[name].get("worker_setup_commands", merged["worker_setup_commands"])
        for name in types
    }


def test_validates_with_the_autoscaler_schema(config) -> None:
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # with Ray's defaults filled in


def test_the_validator_is_not_a_no_op(config) -> None:
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match=r"'eight' is not of type 'integer'"):
        validate_config(broken)


def test_head_cpu_and_gpu_types(config) -> None:
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu-worker"]["node_config"]["InstanceType"].startswith(("c6i", "c7i", "m6i"))
    assert types["gpu-worker"]["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    for name in ("cpu-worker", "gpu-worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]  # autoscaling
        assert types[name]["node_config"]["IamInstanceProfile"]["Name"]  # S3 without keys
    assert config["file_mounts"] == {"~/cirray": "."}


def test_every_image_is_current_ubuntu_named_by_its_public_parameter(config) -> None:
    """No `latest_dlami` (Ray's Ubuntu 18.04 DLAMI, CUDA 11.2) and no bare AMI id: EC2 resolves
    AWS's and Canonical's public SSM parameters to the newest build in the cluster's region."""
    images = {
        name: t["node_config"]["ImageId"] for name, t in config["available_node_types"].items()
    }
    assert images["gpu-worker"] == (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
        "base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    )
    for name in ("head", "cpu-worker"):
        assert images[name] == (
            "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/"
            "amd64/hvm/ebs-gp3/ami-id"
        )


def test_the_locks_pin_this_ray_python_311_and_one_faiss_each() -> None:
    cpu, gpu = _pins(LOCKS["cpu"]), _pins(LOCKS["gpu"])
    assert cpu["ray"] == gpu["ray"] == ray.__version__  # the Ray the tests here run
    assert "faiss-cpu" in cpu and "faiss-gpu-cu12" not in cpu
    assert "faiss-gpu-cu12" in gpu and "faiss-cpu" not in gpu
    # One resolution: every package both locks list has the same version in both.
    assert {n: v for n, v in gpu.items() if n in cpu} == {n: v for n, v in cpu.items() if n in gpu}
    assert set(gpu) - set(cpu) <= {"faiss-gpu-cu12"} | {n for n in gpu if n.endswith("-cu12")}
    for lock in LOCKS.values():
        text = lock.read_text()
        assert "--python-version 3.11 " in text.splitlines()[1]  # the command that made it
        # Every pin carries its hashes (`uv pip sync --require-hashes` refuses a lock without).
        assert text.count("==") == len(_pins(lock)) <= text.count("--hash=sha256:")


def test_the_locks_satisfy_pyproject() -> None:
    """A changed dependency in pyproject.toml fails here until the locks are made again."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base = [Requirement(r) for r in project["dependencies"]]
    assert not [r for r in base if r.name.startswith("faiss")]  # FAISS only as an extra
    assert [Requirement(r).name for r in extras["cpu"]] == ["faiss-cpu"]
    assert [Requirement(r).name for r in extras["gpu"]] == ["faiss-gpu-cu12"]
    for extra, lock in LOCKS.items():
        pins = _pins(lock)
        for req in base + [Requirement(r) for r in extras["weights"] + extras[extra]]:
            name = canonicalize_name(req.name)
            assert name in pins, f"{lock.name} lacks {name}"
            assert req.specifier.contains(pins[name], prereleases=True), (lock.name, str(req))


def test_uv_and_python_are_pinned_on_every_node(config) -> None:
    for name, commands in _node_setup(config).items():
        setup = "\n".join(commands)
        assert f"https://astral.sh/uv/{UV}/install.sh" in setup, name
        assert f"'^uv {re.escape(UV)} '" in setup, name  # an older uv on the image is replaced
        assert f"uv python install {PYTHON}" in setup, name
        assert f"--managed-python --python {PYTHON} ~/cirray-env" in setup, name
        # One Python release named, nowhere another.
        assert set(re.findall(r"\b3\.\d+\.\d+\b", setup)) == {PYTHON}, name
    # Ray itself starts from that venv on every node, never from whatever the image has.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        rays = re.findall(r"(\S*ray) (?:start|stop)\b", "\n".join(config[key]))
        assert rays == ["~/cirray-env/bin/ray"] * 2, (key, rays)


def test_setup_installs_from_the_lock_and_fails_loudly(config) -> None:
    lock_of = {"head": "cpu", "cpu-worker": "cpu", "gpu-worker": "gpu"}
    for name, commands in _node_setup(config).items():
        setup = "\n".join(commands)
        swallowed = re.search(r"\|\|\s*(?:true\b|:(?!\S)|exit 0\b)", setup)
        assert swallowed is None, f"{name}: an error is swallowed"
        # FAISS comes from the lock only: no command installs or removes a build by name.
        assert "uninstall" not in setup and not re.search(r"install[^\n]*faiss", setup), name
        syncs = re.findall(r"uv pip sync .*?--require-hashes\s+(\S+)", setup)
        assert syncs == [f"~/cirray/requirements/cluster-{lock_of[name]}.txt"], name
        assert "--no-deps ~/cirray" in setup  # the project itself, its dependencies the lock's
        assert "uv pip check" in setup and "import sys, faiss, torch, ray" in setup
        # Ray sources ~/.bashrc before each start command: a job's `python` is the venv's.
        assert """echo 'export PATH="$HOME/cirray-env/bin:$PATH"' >> ~/.bashrc""" in setup
    gpu = "\n".join(_node_setup(config)["gpu-worker"])
    assert "assert faiss.get_num_gpus() > 0" in gpu and "torch.cuda.is_available()" in gpu


def _policy(name: str) -> list[dict]:
    return json.loads((REPO / f"docs/aws-iam-{name}.json").read_text())["Statement"]


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _allows(statements: list[dict], action: str, resource: str) -> bool:
    """Whether a policy allows the action on the resource (wildcards as IAM reads them)."""
    return any(
        s["Effect"] == "Allow"
        and action in _listed(s["Action"])
        and any(fnmatch.fnmatchcase(resource, r) for r in _listed(s["Resource"]))
        for s in statements
    )


def test_the_head_may_start_workers_and_the_workers_only_reach_s3(config) -> None:
    types = config["available_node_types"]
    head = types["head"]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {types[n]["node_config"]["IamInstanceProfile"]["Name"] for n in types if n != "head"}
    assert workers == {"cirray-worker"} and head == "cirray-head"
    launcher = _policy("head")
    # What Ray's AWS node provider calls from the head (cache_stopped_nodes is off: no stop/start).
    assert config["provider"]["cache_stopped_nodes"] is False
    for action in ("RunInstances", "CreateTags", "TerminateInstances", "DescribeInstances"):
        assert _allows(launcher, f"ec2:{action}", "*"), action
    assert _allows(launcher, "ec2:DescribeInstanceTypes", "*")
    # Launching a worker with its instance profile passes the worker's role.
    assert _allows(launcher, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/cirray-worker")
    assert not _allows(launcher, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/cirray-head")
    # EC2 reads the image parameters with the launcher's rights.
    for t in types.values():
        parameter = t["node_config"]["ImageId"].removeprefix("resolve:ssm:")
        arn = f"arn:aws:ssm:{config['provider']['region']}::parameter{parameter}"
        assert _allows(launcher, "ssm:GetParameters", arn), arn
    s3 = _policy("s3")
    assert _allows(s3, "s3:ListBucket", "arn:aws:s3:::my-bucket")
    for action in ("GetObject", "PutObject", "DeleteObject"):
        assert _allows(s3, f"s3:{action}", "arn:aws:s3:::my-bucket/run/x.parquet")
    assert all(a.startswith("s3:") for s in s3 for a in s["Action"])
    assert _policy("trust")[0]["Principal"] == {"Service": "ec2.amazonaws.com"}


# A checkout after local runs: what the nodes need (`.ci/run` and `datasets/data.py` are named
# like run outputs but are sources), and what must stay behind.
KEPT = {
    "pyproject.toml",
    "requirements/cluster-cpu.txt",
    "model/a.py",
    "cluster/search.html",
    ".ci/run",
    "pipeline/datasets/data.py",
}
LEFT_BEHIND = {
    ".git/HEAD",
    ".venv/bin/python",
    "outputs/demo/results.json",
    "data/photos/a.jpg",
    "run/images.parquet/part-0.parquet",
    ".hypothesis/examples/x",
    "model/__pycache__/a.pyc",
}


def _sample_tree(root: Path) -> None:
    for name in (".gitignore", ".rayignore"):  # the project's own ignore files
        shutil.copy(REPO / name, root / name)
    for path in KEPT | LEFT_BEHIND:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")


def test_job_uploads_leave_run_outputs_behind(tmp_path) -> None:
    """`ray job submit --working-dir .` as the README writes it (no per-command excludes): the
    files Ray's own packing walk takes, reading .gitignore and .rayignore as Ray 2.60 does."""
    _sample_tree(tmp_path)
    packed: set[str] = set()
    ray_packaging._dir_travel(
        tmp_path,
        [ray_packaging._get_excludes(tmp_path, [])],
        lambda p: packed.add(p.relative_to(tmp_path).as_posix()) if p.is_file() else None,
        include_gitignore=True,
    )
    assert packed == KEPT | {".gitignore", ".rayignore"}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed here")
def test_file_mounts_rsync_leaves_run_outputs_behind(config, tmp_path) -> None:
    """`ray up` copies the project with rsync and these exact arguments (Ray builds them from
    rsync_exclude and rsync_filter); a dry run lists what it would copy."""
    src = tmp_path / "src"
    src.mkdir()
    _sample_tree(src)
    options = {"rsync_exclude": config["rsync_exclude"], "rsync_filter": config["rsync_filter"]}
    args = SSHCommandRunner._create_rsync_filter_args(None, options=options)
    command = ["rsync", "-a", "--dry-run", "--out-format=%n", *args, f"{src}/", f"{tmp_path}/dst"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    copied = {line for line in out.splitlines() if line and not line.endswith("/")}
    assert copied == KEPT | {".gitignore", ".rayignore"}


def _cluster_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]


def test_readme_commands_reach_the_dashboard_through_ray_dashboard() -> None:
    section = _cluster_section()
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", section, flags=re.S))
    assert "HEAD:8265" not in section  # the default security group opens only SSH
    # `-y`: pasted, a confirmation prompt would take the next line as its answer.
    assert "ray up -y ray-cluster.yaml" in commands and "ray down -y ray-cluster.yaml" in commands
    assert "ray dashboard ray-cluster.yaml" in commands
    submits = re.findall(r"ray job submit\s(.*?)\s--\s", commands, flags=re.S)
    assert submits and {" ".join(s.replace("\\", " ").split()) for s in submits} == {
        "--address http://localhost:8265 --working-dir ."
    }
    # The launcher's Ray is the cluster's.
    assert f'"ray[default]=={_pins(LOCKS["cpu"])["ray"]}"' in commands
    assert "not been run on AWS" in section
    assert "docs/cluster.md" in section and (REPO / "docs/cluster.md").is_file()


def test_make_installs_the_cpu_faiss() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert '-e ".[cpu,weights,test]"' in makefile
