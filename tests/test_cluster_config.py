"""ray-cluster.yaml passes the Ray autoscaler's own validation and has the node types it needs."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


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
    setup = " ".join(config["setup_commands"])
    assert "cirray[weights]" in setup and config["file_mounts"] == {"~/cirray": "."}
