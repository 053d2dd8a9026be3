"""cluster.yaml passes the checks `ray up` makes, and keeps its promises (pins, auth, scaling, secrets).

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster -> _bootstrap_config) loads the
YAML with yaml.safe_load, runs prepare_config (defaults, merged setup commands, Docker check,
per-type worker limits), fills node resources from EC2's instance catalog, runs validate_config
(Ray's JSON schema plus its own consistency checks) and then the AWS bootstrap (key pair, subnets,
security group, IAM). test_ray_accepts_cluster_yaml and test_ray_rejects_broken_copy run the first
two offline, exactly as Ray ships them; test_aws_bootstrap_against_moto runs _bootstrap_config with
moto standing in for AWS (only the catalog listing is narrowed to the config's instance types, for
speed), so nothing reaches a cloud account.
"""

import copy
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"

IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py3\d+)-(?P<platform>cpu|gpu|cu\d+)$")
PINNED_IN_COMMAND = re.compile(r"\b(?P<name>ray|torch|torchvision)(?:\[[^\]]*\])?==(?P<version>[\w.+-]+)")
PIP_INSTALL_OF_PINNED = re.compile(r"pip install[^;&|]*\b(ray|torch|torchvision)\b(?!\[[^\]]*\]==|==)")

# What a leaked secret looks like. The AWS patterns follow AWS's documented key formats; Ray's own
# tokens are 64 hex characters (secrets.token_hex(32)).
SECRET_PATTERNS = {
    "AWS credential field": re.compile(r"(?i)aws_(access_key_id|secret_access_key|session_token|credentials)"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
    "hex token": re.compile(r"(?i)\b[0-9a-f]{32,}\b"),
    "inline Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[=:]"),
    "bearer header": re.compile(r"(?i)\bbearer\s+\S"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def load_cluster() -> dict[str, Any]:
    """cluster.yaml as `ray up` reads it."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own offline validation, in the order _bootstrap_config runs it; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def pyproject_pins() -> dict[str, str]:
    """Exact `name==version` pins from pyproject.toml's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        exact = [spec.version for spec in req.specifier if spec.operator == "=="]
        if exact:
            pins[req.name] = exact[0]
    return pins


def node_images(config: dict[str, Any]) -> dict[str, str]:
    """The container image each node type runs, resolved the way Ray's DockerCommandRunner does."""
    docker = config.get("docker", {})
    images = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            images[name] = docker.get("head_image", docker.get("image"))
        else:
            merged = {**docker, **node_type.get("docker", {})}
            images[name] = merged.get("worker_image", merged.get("image"))
    return images


def all_commands(config: dict[str, Any]) -> list[str]:
    """Every shell command the launcher runs on the nodes."""
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    commands = [cmd for key in keys for cmd in config.get(key, [])]
    for node_type in config["available_node_types"].values():
        commands += [cmd for key in keys for cmd in node_type.get(key, [])]
    return commands


def gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node types that advertise at least one GPU."""
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def worker_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every node type except the head's."""
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def find_secrets(text: str) -> list[str]:
    """One line per credential-looking match in text."""
    return [f"{kind}: {m.group(0)!r}" for kind, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)]


def test_ray_accepts_cluster_yaml() -> None:
    prepared = ray_up_checks(load_cluster())
    # prepare_config merged the common setup into both node kinds, so the install runs everywhere.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("-e ~/xray_ray" in cmd for cmd in prepared[key]), key


_DROP = object()


def _edit(*path: str, value: Any = _DROP) -> Callable[[dict], None]:
    """An edit that sets (or, without value, deletes) the key at path."""

    def edit(config: dict) -> None:
        target = config
        for key in path[:-1]:
            target = target[key]
        if value is _DROP:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


GPU = ("available_node_types", "ray.worker.gpu")
BROKEN = {
    "unknown top-level key": _edit("max_worker", value=6),
    "max_workers of the wrong type": _edit("max_workers", value="six"),
    "unknown node-type key": _edit(*GPU, "min_worker", value=0),
    "fractional GPU resource": _edit(*GPU, "resources", "GPU", value=0.5),
    "unknown per-node docker key": _edit(*GPU, "docker", "image", value="x"),
    "node type without resources": _edit("available_node_types", "ray.worker.cpu", "resources"),
    "head type not defined": _edit("head_node_type", value="ray.head.missing"),
    "min_workers above the global max_workers": _edit(*GPU, "min_workers", value=99),
}


@pytest.mark.parametrize("edit", BROKEN.values(), ids=BROKEN.keys())
def test_ray_rejects_broken_copy(edit: Callable[[dict], None]) -> None:
    config = load_cluster()
    edit(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_checks(config)


def test_images_and_installs_match_pyproject_pins() -> None:
    config, pins = load_cluster(), pyproject_pins()
    assert {"ray", "torch", "torchvision"} <= pins.keys(), pins
    images = node_images(config)
    parsed = {name: IMAGE.match(image or "") for name, image in images.items()}
    assert all(parsed.values()), f"missing, unpinned or unknown image: {images}"
    assert {m["ray"] for m in parsed.values()} == {pins["ray"]}, images
    assert len({m["py"] for m in parsed.values()}) == 1, f"mixed Python versions: {images}"
    for name in gpu_node_types(config):
        assert parsed[name]["platform"] != "cpu", f"{name} has GPUs but runs {images[name]}"

    commands = all_commands(config)
    for cmd in commands:
        for m in PINNED_IN_COMMAND.finditer(cmd):
            assert m["version"] == pins[m["name"]], f"{cmd!r} disagrees with pyproject ({pins[m['name']]})"
        assert not PIP_INSTALL_OF_PINNED.search(cmd), f"unpinned install in {cmd!r}"
    # The package itself, from the synced checkout, brings the remaining pins.
    assert any(re.search(r"pip install\b.*-e ~/xray_ray\b", cmd) for cmd in config["setup_commands"])
    # Local paths are relative to where `ray up` runs: the repository root.
    assert (ROOT / config["file_mounts"]["~/xray_ray"]).resolve() == ROOT.resolve()


def test_token_auth_stays_on_and_dashboard_stays_local() -> None:
    config, text = load_cluster(), CLUSTER_YAML.read_text()
    run_options = config["docker"]["run_options"]
    assert any(re.search(r"--env[ =]RAY_AUTH_MODE=token\b", opt) for opt in run_options), run_options
    assert not re.search(r"RAY_AUTH_MODE=(?!token\b)", text), "RAY_AUTH_MODE set to something other than token"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"

    head_start = " ".join(config["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert all(host in ("127.0.0.1", "localhost") for host in hosts), hosts
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("FromPort", 0) <= 8265 <= r.get("ToPort", -1) for r in rules), "port 8265 opened"


def test_workers_scale_from_zero_and_gpus_use_spot() -> None:
    config = load_cluster()
    assert config["idle_timeout_minutes"] > 0
    gpu_types = gpu_node_types(config)
    assert gpu_types, "no node type advertises a GPU"
    assert config["head_node_type"] not in gpu_types, "the head should not be a GPU machine"
    for name, node_type in worker_node_types(config).items():
        assert node_type.get("min_workers", 0) == 0, name
        assert node_type.get("max_workers", config["max_workers"]) > 0, name
    for name, node_type in gpu_types.items():
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"


def test_no_credentials_in_cluster_yaml() -> None:
    found = find_secrets(CLUSTER_YAML.read_text())
    assert not found, found
    assert "aws_credentials" not in load_cluster()["provider"]


# Pieces are joined at run time so this file does not itself look like it holds a key.
PLANTED = {
    "field name": "provider:\n  aws_" + "secret_access_key: x",
    "access key id": "key: " + "AKIA" + "IOSFODNN7EXAMPLE",
    "secret key": "secret: " + "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY",
    "ray token": "token: " + secrets.token_hex(32),
    "inline ray token": "- export RAY_AUTH_" + "TOKEN=abc",
    "bearer": "headers: {Authorization: " + "Bearer abc}",
}


@pytest.mark.parametrize("text", PLANTED.values(), ids=PLANTED.keys())
def test_secret_scan_finds_planted_credentials(text: str) -> None:
    assert find_secrets(CLUSTER_YAML.read_text() + "\n" + text)


def test_runs_as_shipped_with_no_placeholders() -> None:
    """Nothing to edit before `ray up`: the launcher fills in the AMI and the head's instance profile."""
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_INSTANCE_PROFILE

    text, config = CLUSTER_YAML.read_text(), load_cluster()
    assert not re.search(r"REPLACE|\bTODO\b|\bCHANGEME\b", text), "placeholder left in cluster.yaml"
    assert not re.search(r"ImageId:", text), "a fixed AMI exists in one region only; leave it to the launcher"
    head = config["available_node_types"][config["head_node_type"]]
    assert "IamInstanceProfile" not in head["node_config"], "the launcher creates the head's default profile"
    for name, node_type in worker_node_types(config).items():
        # Workers write checkpoints to S3, so they need a profile; the launcher gives the head one only.
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": DEFAULT_RAY_INSTANCE_PROFILE}, name


def test_the_docs_say_how_to_pin_what_the_launcher_chooses_and_what_it_costs() -> None:
    doc = CLUSTER_DOC.read_text()
    for needle in ("ImageId", "IamInstanceProfile", "iam:PassRole", "ray down cluster.yaml", "per hour"):
        assert needle in doc, f"docs/cluster.md does not mention {needle!r}"
    assert "REPLACE_WITH" not in doc


def test_aws_bootstrap_against_moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rest of `ray up` before launching: EC2 catalog, subnets per zone, security group, key pair.

    moto answers the EC2/IAM calls in-process; no request leaves this machine. It proves the AWS
    sections are shaped the way Ray's AWS bootstrap needs, and that the CPU/GPU counts declared per
    node type agree with EC2's instance catalog, and that the launcher fills in what cluster.yaml leaves
    out (the region's default AMI, its default instance profile for the head). It cannot prove the AMI,
    quotas or IAM work.
    """
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from ray.autoscaler._private import commands
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import node_provider

    # Fake credentials and an empty home: the launcher writes its SSH key to ~/.ssh.
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws_config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws_credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # The launcher attaches AWS managed policies (AmazonEC2FullAccess, AmazonS3FullAccess) to its role.
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")

    config = load_cluster()
    catalog: dict[str, dict] = {}

    def list_config_instance_types(region: str, aws_credentials: Any = None) -> list[dict]:
        # Ray lists all ~1,400 instance types; moto takes seconds to serialise that, and Ray only
        # looks up the config's own types in the result, so ask EC2 for just those.
        types = sorted({t["node_config"]["InstanceType"] for t in config["available_node_types"].values()})
        instances = boto3.client("ec2", region_name=region).describe_instance_types(InstanceTypes=types)
        catalog.update({i["InstanceType"]: i for i in instances["InstanceTypes"]})
        return instances["InstanceTypes"]

    monkeypatch.setattr(node_provider, "list_ec2_instances", list_config_instance_types)
    # The launcher waits 15 s twice for IAM to propagate after creating its default profile and role.
    monkeypatch.setattr(aws_config.time, "sleep", lambda seconds: None)
    zones = set(config["provider"]["availability_zone"].split(","))
    region = config["provider"]["region"]
    with moto.mock_aws():
        resolved = commands._bootstrap_config(copy.deepcopy(config), no_config_cache=True)
        ec2 = boto3.client("ec2", region_name=region)
        for name, node_type in resolved["available_node_types"].items():
            node_config = node_type["node_config"]
            assert node_config["SecurityGroupIds"] and node_config["KeyName"], name
            subnets = ec2.describe_subnets(SubnetIds=node_config["SubnetIds"])["Subnets"]
            assert {s["AvailabilityZone"] for s in subnets} == zones, f"{name}: a listed zone has no subnet"
            # Left out of cluster.yaml, so the launcher's default AMI for the region fills it in.
            assert node_config["ImageId"] == aws_config.DEFAULT_AMI[region], name
        # The launcher created its default profile (S3 and EC2 access) and gave it to the head; the
        # workers name that same profile.
        profile = resolved["head_node"]["IamInstanceProfile"]["Arn"]
        assert profile.endswith(f"instance-profile/{aws_config.DEFAULT_RAY_INSTANCE_PROFILE}"), profile
        role = boto3.client("iam").get_instance_profile(InstanceProfileName=aws_config.DEFAULT_RAY_INSTANCE_PROFILE)[
            "InstanceProfile"
        ]["Roles"][0]
        iam = boto3.client("iam")
        attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
        assert "AmazonS3FullAccess" in {p["PolicyName"] for p in attached}
        # ...but nothing lets the head pass that role to the workers it launches: hence the one
        # iam:PassRole grant docs/cluster.md asks for.
        actions = set()
        for policy in attached:
            version = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]["DefaultVersionId"]
            document = iam.get_policy_version(PolicyArn=policy["PolicyArn"], VersionId=version)["PolicyVersion"]
            statements = document["Document"]["Statement"]
            actions |= {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
        assert "ec2:*" in actions and not {"iam:PassRole", "iam:*", "*"} & actions, sorted(actions)

    for name, node_type in config["available_node_types"].items():
        info = catalog[node_type["node_config"]["InstanceType"]]
        declared = node_type["resources"]
        assert declared.get("CPU", 0) <= info["VCpuInfo"]["DefaultVCpus"], name
        gpus = sum(g["Count"] for g in info.get("GpuInfo", {}).get("Gpus", []))
        assert declared.get("GPU", 0) == gpus, f"{name} declares {declared.get('GPU', 0)} GPUs, EC2 says {gpus}"
