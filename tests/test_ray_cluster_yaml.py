"""ray_cluster.yaml passes Ray's own launcher validation and sets up what share-cl needs.

Uses the same functions `ray up` runs before it talks to a cloud (prepare_config, then
validate_config against Ray's JSON schema), so nothing here contacts AWS.
"""

import copy
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _joined(commands: list[str]) -> str:
    return "\n".join(commands)


def test_ray_accepts_the_config(prepared: dict) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_a_gpu_worker_type_declares_gpus(prepared: dict) -> None:
    workers = {
        name: spec for name, spec in prepared["available_node_types"].items() if name != prepared["head_node_type"]
    }
    gpu_types = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker node type declares resources: {GPU: 1}"
    for spec in gpu_types:
        assert spec["max_workers"] >= 1
        assert spec["min_workers"] <= spec["max_workers"]
        assert spec["node_config"]["InstanceType"]


def test_setup_installs_torch_then_the_project(prepared: dict, raw: dict) -> None:
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = _joined(prepared[role])
        torch_at = commands.find("pip install -q torch==")
        project_at = commands.find("pip install -q -e ~/share-cl")
        assert 0 <= torch_at < project_at, f"{role} must install torch, then the project"
    # The project comes from the checkout that file_mounts syncs: the repository root.
    mounts = raw["file_mounts"]
    assert (REPO / mounts["~/share-cl"] / "pyproject.toml").is_file()
    assert ".venv" in raw["rsync_exclude"]


def test_pins_match_this_environment(raw: dict) -> None:
    # The cluster's Ray must equal the launching machine's, and torch should be what tests ran with.
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-"), (
        f"update docker.image in ray_cluster.yaml to Ray {ray.__version__}"
    )
    pinned = re.search(r"torch==([\w.]+)", _joined(raw["setup_commands"])).group(1)
    installed = importlib.metadata.version("torch").split("+")[0]
    assert installed == pinned, f"tests ran with torch {installed}; update torch=={pinned} in ray_cluster.yaml"


def test_every_node_gets_redis_and_mlflow_addresses(prepared: dict) -> None:
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = _joined(prepared[role])
        assert "SHARECL_REDIS_URL=" in commands and "MLFLOW_TRACKING_URI=" in commands
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[role] if "ray start" in c]
        assert starts and all("source ~/sharecl.env" in c for c in starts)


def test_redis_port_matches_the_url_and_avoids_rays_port(prepared: dict) -> None:
    setup = _joined(prepared["head_setup_commands"])
    url_port = re.search(r"SHARECL_REDIS_URL=redis://[^:]+:(\d+)", setup).group(1)
    head_start = _joined(prepared["head_start_ray_commands"])
    server_port = re.search(r"redis-server --port (\d+)", head_start).group(1)
    ray_port = re.search(r"ray start --head --port=(\d+)", head_start).group(1)
    assert url_port == server_port != ray_port


def test_every_command_is_valid_bash(prepared: dict) -> None:
    roles = ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for role in roles:
        for command in prepared[role]:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{role}: {command!r}: {result.stderr}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_worker_env_file_resolves_the_head_address(prepared: dict, tmp_path: Path) -> None:
    # Run the real env-file commands (not the pip lines) in a scratch HOME, as a worker would.
    commands = [c for c in prepared["worker_setup_commands"] if "sharecl.env" in c]
    env = {"HOME": str(tmp_path), "RAY_HEAD_IP": "10.1.2.3", "PATH": "/usr/bin:/bin"}
    for command in commands + commands:  # twice: a second `ray up` must not stack .bashrc lines
        subprocess.run(["bash", "-c", command], env=env, check=True)
    assert (tmp_path / ".bashrc").read_text().count("sharecl.env") == 1
    shown = subprocess.run(
        ["bash", "-c", "source ~/sharecl.env && echo $SHARECL_REDIS_URL $MLFLOW_TRACKING_URI $SHARECL_HOME"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown == ["redis://10.1.2.3:6380/0", "http://10.1.2.3:5000", f"{tmp_path}/sharecl-data"]
