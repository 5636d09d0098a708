"""The KubeRay manifest a cluster operator applies: it parses, runs wf's real commands with
options wf accepts, keeps data on S3, takes credentials from a secret, and pins wf's Ray."""

import shlex
from pathlib import Path

import ray
import typer
import yaml

from workflows.cli import app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


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


def test_the_image_uses_the_same_ray_as_wf():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
