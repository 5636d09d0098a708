"""The Ray cluster wf starts gives its workers wf's TensorFlow settings."""

import json
import os
import subprocess
import sys

from workflows.settings import TENSORFLOW_ENV, tensorflow_env

WORKER_ENV = """
import json, os, ray
from workflows.cluster import ray_cluster
from workflows.settings import ClusterSettings

@ray.remote(num_cpus=0)
def env():
    return {name: os.environ.get(name) for name in ("TF_ENABLE_ONEDNN_OPTS",)}

with ray_cluster(ClusterSettings(num_cpus=1)):
    print(json.dumps(ray.get(env.remote())))
"""


def test_tensorflow_env_defaults_and_the_users_value_wins(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert tensorflow_env() == TENSORFLOW_ENV == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert tensorflow_env() == {"TF_ENABLE_ONEDNN_OPTS": "0"}


def test_ray_workers_get_the_tensorflow_env():
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    # A fresh process: the test session's own Ray cluster would be reused as it is.
    out = subprocess.run(
        [sys.executable, "-c", WORKER_ENV], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"TF_ENABLE_ONEDNN_OPTS": "1"}
