"""The KubeRay manifest a cluster operator applies: it parses, runs wf's real commands with
options wf accepts, keeps data on S3, takes credentials from a secret, and runs the Ray that
constraints.txt (the versions the suite passed on) pins, one that pyproject.toml allows."""

import shlex
import tomllib
from pathlib import Path

import typer
import yaml

from workflows.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _locked(package: str) -> str:
    """The version constraints.txt pins for ``package``."""
    from packaging.utils import canonicalize_name

    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version and canonicalize_name(name.strip()) == canonicalize_name(package):
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def test_the_rayjob_runs_extract_then_train_all_with_options_wf_accepts():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    commands = [shlex.split(c) for c in job["spec"]["entrypoint"].split("&&")]
    assert [c[:2] for c in commands] == [["wf", "extract"], ["wf", "train-all"]]
    command = typer.main.get_command(app)
    for words in commands:  # every option is one wf knows, with a value of the right type
        context = command.make_context("wf", words[1:], resilient_parsing=False)
        sub = command.get_command(context, words[1])
        sub.make_context(words[1], words[2:])
    extract, train = commands
    assert extract[2].startswith("s3://") and extract[extract.index("--store") + 1].startswith(
        "s3://"
    )
    assert train[train.index("--runs") + 1].startswith("s3://")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _locked("ray")


def test_credentials_come_from_a_secret_never_from_the_manifest():
    text = (DEPLOY / "kuberay" / "rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": "wf-s3"}}]
            assert "env" not in container
    documented = "--from-literal=AWS_SECRET_ACCESS_KEY=..."  # the comment's kubectl line
    assert "AWS_SECRET_ACCESS_KEY=" not in text.replace(documented, "")


def test_the_image_the_rayjob_and_the_lock_agree_on_a_ray_wf_allows():
    from packaging.requirements import Requirement

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ray = _locked("ray")
    assert f"FROM rayproject/ray:{ray}-" in dockerfile and "-c /home/ray/wf/constraints.txt" in (
        dockerfile
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = next(r for r in map(Requirement, project["dependencies"]) if r.name == "ray")
    assert allowed.specifier.contains(ray), (ray, str(allowed.specifier))
    # every dependency wf names is pinned, at a version its range allows
    for requirement in map(Requirement, project["dependencies"]):
        assert requirement.specifier.contains(_locked(requirement.name)), requirement
