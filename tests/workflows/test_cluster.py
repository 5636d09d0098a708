"""The Ray cluster wf starts gives its workers wf's TensorFlow and Ray Train settings."""

import json
import os
import subprocess
import sys

from workflows.settings import RAY_TRAIN_ENV, TENSORFLOW_ENV, tensorflow_env, worker_env

PRINT_WORKER_ENV = """
import json, os, ray
from workflows.cluster import ray_cluster
from workflows.settings import ClusterSettings

@ray.remote(num_cpus=0)
def env():
    names = ("TF_ENABLE_ONEDNN_OPTS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    return {name: os.environ.get(name) for name in names}

with ray_cluster(ClusterSettings(num_cpus=1)):
    print(json.dumps(ray.get(env.remote())))
"""


def test_worker_env_defaults_and_the_users_value_wins(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert tensorflow_env() == TENSORFLOW_ENV == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert worker_env() == {**TENSORFLOW_ENV, **RAY_TRAIN_ENV}
    assert worker_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    assert tensorflow_env() == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert worker_env() == {
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    }


def test_ray_workers_get_the_worker_env():
    names = ("TF_ENABLE_ONEDNN_OPTS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    env = {k: v for k, v in os.environ.items() if k not in names}
    # A fresh process: the test session's own Ray cluster would be reused as it is.
    out = subprocess.run(
        [sys.executable, "-c", PRINT_WORKER_ENV],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
