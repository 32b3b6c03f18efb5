"""Cluster-launcher configs (cluster/config.yaml, cluster/local.yaml) checked offline.

Schema: each file goes through Ray's own ``prepare_config`` (merges the provider's ``defaults.yaml``
shipped inside Ray, merges ``setup_commands`` into the head/worker lists, fills per-type worker
counts; for ``local`` also builds the single on-prem node type from ``head_ip``/``worker_ips``) and
then ``validate_config`` (Ray's ``ray-schema.json`` plus its cross-field checks), the same two steps
``ray up`` runs before it touches any machine. For the AWS provider ``prepare_config`` only reads
``ray/autoscaler/aws/defaults.yaml``; everything that talks to AWS (key pairs, IAM, subnets, AMIs)
happens later, in ``bootstrap_aws`` during ``ray up``, which these tests never call. To make sure of
that, preparation runs with ``boto3``/``botocore`` made unimportable and every socket connection
and DNS lookup raising, so a config change that needed the network would fail here, not reach a
cloud.

The other tests check what the launcher's schema cannot: this package is installed with the pinned
versions of constraints.txt from the synced checkout, a GPU worker type exists, shared storage and
its environment variables are set, and the docker image's Ray and Python tags match the Ray
installed here.
"""

from __future__ import annotations

import copy
import re
import socket
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
FILES = ("config.yaml", "local.yaml")
REMOTE_REPO = "/home/ray/rcl-dist"
INSTALL = f"pip install -c {REMOTE_REPO}/constraints.txt -e \"{REMOTE_REPO}[cluster]\""  # with the cluster extras
SHARED = "/mnt/shared"
ENV = {"RCL_DIST_HOME": f"{SHARED}/rcl_dist", "RCL_DIST_DATA": f"{SHARED}/data"}  # read by rcl_dist
RESULTS = f"{SHARED}/ray_results"  # the one storage path of Ray Train / Tune runs on the cluster
PYTHON_TAG = "py311"  # the project's Python (3.11), the one .venv and the image must share


def _raw(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _offline(*_args, **_kwargs):
    raise AssertionError("network access while preparing a cluster config")


def _prepare(raw: dict) -> dict:
    """Ray's own preparation and validation, with boto3 and the network out of reach."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.MonkeyPatch.context() as mp:
        for mod in ("boto3", "botocore"):
            mp.setitem(sys.modules, mod, None)  # `import boto3` now raises ImportError
        mp.setattr(socket.socket, "connect", _offline)
        mp.setattr(socket, "create_connection", _offline)
        mp.setattr(socket, "getaddrinfo", _offline)
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, dict]:
    return {name: _prepare(_raw(name)) for name in FILES}


@pytest.fixture(scope="module")
def raw() -> dict[str, dict]:
    return {name: _raw(name) for name in FILES}


def _image_tag(cfg: dict) -> re.Match:
    image = cfg["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<platform>cu\d+|gpu)", image)
    assert m, f"{image!r} is not a rayproject/ray GPU image tag ({{ray}}-py{{NNN}}-cu{{NN}})"
    return m


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_validates_against_rays_schema_offline(prepared, name):
    cfg = prepared[name]
    assert cfg["provider"]["type"] == {"config.yaml": "aws", "local.yaml": "local"}[name]
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_validation_is_not_a_no_op(raw):
    """A misspelled key or a wrong type must fail the same path the real files pass."""
    typo = copy.deepcopy(raw["config.yaml"])
    typo["setup_command"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        _prepare(typo)
    bad_type = copy.deepcopy(raw["config.yaml"])
    bad_type["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        _prepare(bad_type)


# --- install -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_every_node_installs_this_package_with_pinned_versions(raw, prepared, name):
    cfg = prepared[name]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert INSTALL in cfg[key], f"{name}: {key} does not run {INSTALL!r}"
    # Any other pip install in the setup is held to the same pins.
    for cmd in cfg["head_setup_commands"] + cfg["worker_setup_commands"]:
        if "pip install" in cmd:
            assert f"-c {REMOTE_REPO}/constraints.txt" in cmd, f"{name}: unpinned install {cmd!r}"
    assert raw[name]["setup_commands"] == raw["config.yaml"]["setup_commands"], "local.yaml drifted"


def test_constraints_pin_the_installed_ray_and_name_this_package():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["ray"] == ray.__version__
    assert pins["torch"] == "2.13.0"
    assert 'name = "rcl-dist"' in (REPO / "pyproject.toml").read_text()  # what `-e REMOTE_REPO` installs


@pytest.mark.parametrize("name", FILES)
def test_file_mounts_ship_the_checkout_without_its_venv(raw, name):
    cfg = raw[name]
    assert cfg["file_mounts"] == {REMOTE_REPO: "."}
    assert ".gitignore" in cfg["rsync_filter"]
    assert {"**/.git", "**/.git/**"} <= set(cfg["rsync_exclude"])
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


# --- nodes -------------------------------------------------------------------------------------


def test_gpu_worker_type(prepared):
    cfg = prepared["config.yaml"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1, "one GPU worker type"
    (worker,) = gpu
    assert worker["min_workers"] == 0 and worker["max_workers"] == 4 <= cfg["max_workers"]
    assert worker["resources"]["CPU"] >= 1
    assert worker["node_config"]["InstanceType"].startswith("g5.")  # A10G; resources follow it
    assert cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", FILES)
def test_start_commands_follow_rays_examples(raw, name):
    head, worker = raw[name]["head_start_ray_commands"], raw[name]["worker_start_ray_commands"]
    assert head[0] == worker[0] == "ray stop"
    assert "cluster/mlflow_server.sh start" in head[1]  # the cluster's MLflow first: `ray start` inherits its URI
    assert "ray start --head --port=6379" in head[2] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[2]
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker[1]
    assert "idle_timeout_minutes" in raw[name]


# --- shared storage --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_shared_storage_is_mounted_and_named_in_the_environment(prepared, name):
    cfg = prepared[name]
    options = cfg["docker"]["run_options"]
    assert f"-v {SHARED}:{SHARED}" in options
    for var, path in ENV.items():
        assert f"--env {var}={path}" in options, f"{name}: {var} not set in the container"
    init = " ".join(cfg["initialization_commands"])
    assert re.search(rf"mount -t nfs4? .*{SHARED}\)?$", cfg["initialization_commands"][0]), init
    for path in [*ENV.values(), RESULTS]:
        assert path in cfg["initialization_commands"][1]  # created on the shared mount
    # Both default storage paths lead to RESULTS: rcl_dist's ($RCL_DIST_HOME/ray_results, used when
    # dist.storage_path is unset) and Ray's own (~/ray_results).
    setup = " ".join(cfg["setup_commands"])
    assert f"ln -s {RESULTS} {ENV['RCL_DIST_HOME']}/ray_results" in setup
    assert f"ln -sfn {RESULTS} ~/ray_results" in setup


def test_rcl_dist_reads_the_variables_the_cluster_sets():
    """The environment names the folders only if the package reads those names."""
    from rcl_dist import paths
    from rcl_dist.data import images

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCL_DIST_HOME", ENV["RCL_DIST_HOME"])
        assert paths.rcl_home() == Path(ENV["RCL_DIST_HOME"])
    assert "RCL_DIST_DATA" in Path(images.__file__).read_text()

def test_aws_placeholders_agree(raw):
    """The region appears twice (provider and EFS address); the zones must belong to it."""
    cfg = raw["config.yaml"]
    region = cfg["provider"]["region"]
    assert re.search(rf"EFS_ADDRESS=fs-[^.\s]+\.efs\.{re.escape(region)}\.amazonaws\.com;", cfg["initialization_commands"][0])
    zones = cfg["provider"]["availability_zone"].split(",")
    assert zones and all(z.startswith(region) for z in zones)
    assert "REPLACE_ME" in (CLUSTER / "config.yaml").read_text()


def test_local_lists_its_machines(raw):
    provider = raw["local.yaml"]["provider"]
    assert provider["head_ip"] and provider["worker_ips"]
    assert raw["local.yaml"]["auth"]["ssh_user"]


# --- image ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_docker_image_matches_installed_ray_and_python(raw, name):
    m = _image_tag(raw[name])
    assert m["ray"] == ray.__version__, f"{name}: image has Ray {m['ray']}, installed Ray is {ray.__version__}"
    assert m["py"] == PYTHON_TAG
    assert raw[name]["docker"]["container_name"]
    assert not {"head_image", "worker_image"} & set(raw[name]["docker"]), "one image for all nodes"
    assert raw[name]["docker"]["image"] == raw["config.yaml"]["docker"]["image"]


# --- README ---------------------------------------------------------------------------------------


def test_readme_shows_the_workflow():
    text = (CLUSTER / "README.md").read_text()
    for cmd in (
        "ray up cluster/config.yaml",
        "ray submit cluster/config.yaml pipelines/pretrain.py -- --config",
        "ray attach cluster/config.yaml -p 5000",
        "ray dashboard cluster/config.yaml",
        "ray down cluster/config.yaml",
        "cluster/local.yaml",
        "RCL_DIST_HOME",
    ):
        assert cmd in text, cmd
    assert (REPO / "pipelines" / "pretrain.py").is_file()
