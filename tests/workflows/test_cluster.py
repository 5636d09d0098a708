"""The Ray cluster wf starts gives its workers wf's TensorFlow and Ray Train settings; wf runs
on a Ray cluster it did not start (`--address`)."""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_dataset
from workflows.settings import RAY_TRAIN_ENV, TENSORFLOW_ENV, tensorflow_env, worker_env

PRINT_WORKER_ENV = """
import json, os, ray, time
from ray._private.node import Node
from tests.workflows.test_cluster import ray_programs
from workflows.cluster import ray_cluster
from workflows.reaper import _processes, descendants
from workflows.settings import ClusterSettings

def head_processes():
    \"\"\"Which of Ray's head-node programs this driver's descendants run.\"\"\"
    pids = descendants(os.getpid(), _processes())
    return sorted(program.rsplit("/", 1)[1] for program in ray_programs(pids))

methods = (Node.start_api_server, Node.start_monitor)

@ray.remote(num_cpus=0)
def env():
    names = ("TF_ENABLE_ONEDNN_OPTS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    return {name: os.environ.get(name) for name in names}

with ray_cluster(ClusterSettings(num_cpus=1)):
    names = ("TF_ENABLE_ONEDNN_OPTS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    driver = {name: os.environ.get(name) for name in names}  # its own, as it was
    workers = ray.get(env.remote())
    deadline = time.time() + 60  # the API server is started after ray.init
    while "dashboard.py" not in head_processes() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # and it stays up (it is not killed with a thread that started it)
    seen = {"workers": workers, "driver": driver, "processes": head_processes()}
seen["restored"] = methods == (Node.start_api_server, Node.start_monitor)
print(json.dumps(seen))
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
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["workers"] == {
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    # The workers have them from the raylet's environment; the driver's is left as it was.
    assert seen["driver"] == {name: None for name in names}
    # The head node runs without the autoscaler's monitor (1 s of shut-down); its API server is
    # started once ray.init has returned (1.3 s of start-up), and Ray's own code is as it was.
    assert seen["processes"] == ["dashboard.py", "gcs_server", "log_monitor.py", "raylet"]
    assert seen["restored"]


AUTH_AND_ADDRESS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def separate_cluster():
    """A Ray cluster started apart from wf (`ray start --head`), as on a real cluster's head
    node, with token authentication on: ``(address, token)``. Its own temp dir, so the test
    session's cluster is not touched."""
    temp = tempfile.mkdtemp(prefix="wf-head-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_AND_ADDRESS}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = Path(temp) / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        address = None
        while address is None:  # "ray start --address='IP:PORT'" once it is up
            assert head.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
            match = re.search(r"--address='([^']+)'", log.read_text())
            address = match.group(1) if match else None
        yield address, token
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what SIGTERM left (the GCS, the monitor)
        head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_extract_train_and_serve_on_a_cluster_wf_did_not_start(
    separate_cluster, tmp_path, cache_dir
):
    address, token = separate_cluster
    make_dataset(tmp_path / "data" / "shapes", ("circles", "squares"), 12, size=64)
    extract = [
        "extract", str(tmp_path / "data" / "shapes"), "--store", str(tmp_path / "store"),
        "--shards", "2", "--image-size", "64", "--validation-fraction", "0.3",
        "--cache-dir", cache_dir, "--address", address,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in AUTH_AND_ADDRESS}
    env.update(COLUMNS="300", TF_CPP_MIN_LOG_LEVEL="3")

    def wf(args, **extra):
        return subprocess.run(
            [sys.executable, "-m", "workflows.cli", *args],
            env={**env, **extra}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    # A driver without RAY_AUTH_MODE=token is refused: one line that says what to set, not a
    # traceback.
    refused = wf(extract)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "RAY_AUTH_MODE=token" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    extracted = wf(extract, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert extracted.returncode == 0, extracted.stderr[-3000:]
    trained = wf(
        ["train-all", "--store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs"),
         "--methods", "bottleneck", "--epochs", "2", "--cv", "0", "--address", address],
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "shapes" / "bottleneck" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["accuracy"] is not None
    # and its model served from that cluster, called over HTTP
    from tests.s3 import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--runs", str(tmp_path / "runs"),
         "--port", str(port), "--address", address],
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/models/shapes/bottleneck:predict"
        photo = next((tmp_path / "data" / "shapes" / "circles").iterdir()).read_bytes()
        deadline, answer = time.time() + 240, None
        while answer is None:
            assert server.poll() is None, server.communicate()[1][-3000:]
            assert time.time() < deadline, "wf serve --address did not come up"
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url, data=photo), timeout=60
                ) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert (
            answer["label"] in ("circles", "squares") and answer["model"]["method"] == "bottleneck"
        )
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


RAY_HEAD_PROGRAMS = ("dashboard/dashboard.py", "autoscaler/_private/monitor.py",
                     "_private/log_monitor.py", "raylet/raylet", "gcs/gcs_server")  # fmt: skip


def ray_programs(pids) -> set[str]:
    """Which of :data:`RAY_HEAD_PROGRAMS` the processes ``pids`` run (their command lines)."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            found |= {p for p in RAY_HEAD_PROGRAMS if any(w.endswith(f"/{p}") for w in words)}
    return found


def _descendants(pid: int) -> dict[int, str]:
    from workflows.reaper import _processes, descendants

    return descendants(pid, _processes())


def _listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses that ``pids`` listen on (TCP), read from ``/proc``."""
    import ipaddress

    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            # /proc writes each 32-bit word of the address in the host's (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            address = ipaddress.ip_address(raw)
            mapped = getattr(address, "ipv4_mapped", None)
            found.add(str(mapped or address))
    return found


@pytest.mark.slow
def test_the_local_cluster_is_gone_within_seconds_of_a_killed_wf(tmp_path, cache_dir):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 30, size=64)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "extract", str(tmp_path / "shapes"), "--store",
         str(tmp_path / "store"), "--augment", "60", "--image-size", "64", "--shards", "2",
         "--cache-dir", cache_dir, "--num-cpus", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    commits = tmp_path / "store" / "shapes" / "efficientnet_lite0" / "_lease.json"
    deadline = time.time() + 240
    seen: dict[int, str] = {}
    while not commits.exists() or len(seen) < 6:  # the store is leased: Ray is up and working
        assert process.poll() is None and time.time() < deadline
        seen.update(_descendants(process.pid))
        time.sleep(0.2)
    time.sleep(2)
    seen.update(_descendants(process.pid))
    # An extraction's cluster runs neither Ray's API server nor its autoscaler monitor.
    programs = ray_programs(seen)
    assert "_private/log_monitor.py" in programs, programs  # the listing saw Ray's processes
    assert not programs & {"dashboard/dashboard.py", "autoscaler/_private/monitor.py"}, programs
    # Everything the local cluster listens on is bound to the loopback address: Ray's gRPC
    # servers, its agents, the workers (no wildcard, no outward address, no dashboard).
    addresses = _listening_addresses(set(seen))
    assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
    process.kill()  # SIGKILL of wf alone, as a crash or an OOM kill would
    process.wait(30)
    deadline = time.time() + 15
    while True:
        alive = {pid for pid, started in seen.items() if _started(pid) == started}
        if not alive:
            break
        assert time.time() < deadline, f"still running after 15 s: {alive}"
        time.sleep(0.5)


def _started(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]
