"""Clustered runs for real: a multi-node Ray cluster on this machine, images, stores and runs on
a real S3-compatible server, and the faults a team meets (a node lost, the driver killed, the
object store gone for a while). Every `wf` here is the real command in its own process."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from storage.feature_store import FeatureStore, tap_column
from tests.conftest import make_dataset
from tests.multinode import MultiNode
from tests.s3 import S3Server
from workflows.cluster import environment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "wf-test"


def _env(extra: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COLUMNS="200", **(extra or {}))
    return env


def wf(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "workflows.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def wf_background(*args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "workflows.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def wait_for(condition, process: subprocess.Popen | None = None, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended first: {process.communicate()[1][-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def rows_of(store: str, env: dict | None = None) -> dict[tuple[str, int, str], bytes]:
    """``{(image_id, copy, split): the bytes of every tap}`` of a store (whatever its node)."""
    with environment(env or {}):
        feature_store = FeatureStore.open(store, "shapes", "efficientnet_lite0")
        out = {}
        for split in ("train", "validation"):
            taps = [tap_column(t) for t in sorted(feature_store.manifest.taps)]
            table = feature_store.read_table(split, ["image_id", "copy", *taps]).to_pylist()
            for row in table:
                key = (row["image_id"], row["copy"], split)
                assert key not in out, f"{key} twice"
                out[key] = b"".join(np.asarray(row[t], np.float16).tobytes() for t in taps)
        return out


def extract_args(data: Path | str, store: str, cache_dir: str) -> list[str]:
    return ["extract", str(data), "--store", store, "--shards", "8", "--cache-dir", cache_dir]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clustered")
    make_dataset(root / "shapes", ("circles", "squares"), 60, size=96)
    return root / "shapes"


@pytest.fixture(scope="module")
def reference(data, cache_dir, tmp_path_factory) -> str:
    """The store of an undisturbed run on one node (a local cluster of one machine)."""
    store = str(tmp_path_factory.mktemp("reference") / "store")
    done = wf(*extract_args(data, store, cache_dir), "--num-cpus", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.create_bucket(BUCKET)
    yield server
    server.close()


def test_a_store_written_on_three_nodes_equals_a_one_node_store(
    data, reference, cache_dir, tmp_path
):
    cluster = MultiNode(workers=2)
    try:
        store = str(tmp_path / "store")
        done = wf(*extract_args(data, store, cache_dir), "--address", cluster.address, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = FeatureStore.open(store, "shapes", "efficientnet_lite0").manifest
        nodes = {record.node for record in manifest.shards.values()}
        assert len(nodes) > 1 and nodes <= set(cluster.nodes.values())  # work really spread
        assert rows_of(store) == rows_of(reference)  # the same rows, the same feature bytes
        trained = wf("train-all", "--store", store, "--runs", str(tmp_path / "runs"), "--methods",
                     "bottleneck", "--epochs", "2", "--workers", "2", "--epoch-copies", "one",
                     "--cv", "0", "--address", cluster.address)  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        metrics = json.loads(
            (tmp_path / "runs" / "shapes" / "bottleneck" / "metrics.json").read_text()
        )
        assert len(metrics["nodes"]) == 2 and metrics["workers_in_sync"] is True  # 1 CPU a node
    finally:
        cluster.close()


@pytest.mark.parametrize("victim", ["worker1", "worker2"])
def test_a_worker_node_lost_mid_extract_changes_nothing(
    victim, data, reference, cache_dir, tmp_path
):
    # The head runs no shard (0 CPUs): every shard runs on the two worker nodes, and what the
    # driver depends on (the progress actor) sits on the head. Each run loses a different node.
    cluster = MultiNode(workers=2, head_cpus=0)
    try:
        store = tmp_path / "store"
        run = wf_background(
            *extract_args(data, str(store), cache_dir), "--address", cluster.address
        )
        commits = store / "shapes" / "efficientnet_lite0" / "_commits"
        wait_for(lambda: commits.exists() and any(commits.rglob("*.json")), run)
        cluster.kill(victim)  # SIGKILL of its raylet and every process under it
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        assert rows_of(str(store)) == rows_of(reference)  # none missing, none twice
        assert wf("verify", str(store)).returncode == 0
    finally:
        cluster.close()


def _names_a_checkpoint(filesystem: pafs.FileSystem, path: str, key: str) -> bool:
    """Whether the JSON file at ``path`` names a checkpoint under ``key`` yet: Ray Train's
    snapshot (``latest_checkpoint_result``, a job on several workers) or a pool job's pointer
    (``folder``, written after its epoch's files)."""
    try:
        with filesystem.open_input_stream(path) as stream:
            return bool(json.loads(stream.read()).get(key))
    except (OSError, ValueError):
        return False


def test_a_worker_node_lost_mid_train_all_goes_on_from_its_checkpoint(reference, tmp_path):
    cluster = MultiNode(workers=3, head_cpus=0)  # two workers of the job, one node to spare
    try:
        runs, epochs = tmp_path / "runs", 40
        run = wf_background("train-all", "--store", reference, "--runs", str(runs), "--methods",
                            "bottleneck", "--epochs", str(epochs), "--workers", "2",
                            "--epoch-copies", "one", "--cv", "0",
                            "--address", cluster.address)  # fmt: skip
        snapshot = str(runs / "_ray" / "shapes-bottleneck" / "checkpoint_manager_snapshot.json")
        wait_for(
            lambda: _names_a_checkpoint(
                pafs.LocalFileSystem(), snapshot, "latest_checkpoint_result"
            ),
            run,
        )
        hosts = cluster.actors("RayTrainWorker")
        assert len(hosts) == 2 and "head" not in hosts
        cluster.kill(hosts[0])  # a node that runs one of the job's two workers
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-3000:]
        metrics = json.loads((runs / "shapes" / "bottleneck" / "metrics.json").read_text())
        assert metrics["epochs"] == epochs and metrics["workers_in_sync"] is True
        assert metrics["optimizer_steps"] == epochs * metrics["steps_per_epoch"]
        assert 1 <= metrics["resumed_from_epoch"] < epochs  # from its checkpoint, not epoch 0
        assert set(metrics["nodes"]) <= set(cluster.nodes.values())  # it ended on nodes left
    finally:
        cluster.close()


def test_a_worker_node_lost_under_the_pool_moves_its_job_to_a_node_left(reference, tmp_path):
    cluster = MultiNode(workers=3, head_cpus=0)  # three one-CPU nodes; one job: one pool worker
    try:
        runs, epochs = tmp_path / "runs", 40
        run = wf_background("train-all", "--store", reference, "--runs", str(runs), "--methods",
                            "bottleneck", "--epochs", str(epochs), "--epoch-copies", "one",
                            "--cv", "0", "--address", cluster.address)  # fmt: skip
        pointer = str(runs / "_checkpoints" / "shapes-bottleneck" / "latest.json")
        wait_for(lambda: _names_a_checkpoint(pafs.LocalFileSystem(), pointer, "folder"), run)
        assert len(cluster.actors("TrainingWorker")) == 1  # no more workers than jobs
        lease = json.loads((runs / "shapes" / "bottleneck" / "_lease.json").read_text())
        host = cluster.node_of("TrainingWorker", lease["pid"])  # the worker that holds the job
        assert host is not None and host != "head"
        killed = cluster.nodes[host]
        cluster.kill(host)
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-3000:]
        metrics = json.loads((runs / "shapes" / "bottleneck" / "metrics.json").read_text())
        assert metrics["epochs"] == epochs
        assert metrics["optimizer_steps"] == epochs * metrics["steps_per_epoch"]
        assert 1 <= metrics["resumed_from_epoch"] < epochs  # from its checkpoint, not epoch 0
        assert set(metrics["nodes"]) <= set(cluster.nodes.values())  # it ended on a node left
        assert killed not in metrics["nodes"]
    finally:
        cluster.close()


def _s3_objects(server: S3Server, prefix: str) -> list[str]:
    return server.objects(f"{BUCKET}/{prefix}")


def test_images_store_and_runs_on_s3_as_for_local_folders(s3, data, tmp_path, cache_dir):
    env = s3.env()
    local = tmp_path / "local"
    (local / "shapes").mkdir(parents=True)
    for path in data.rglob("*.jpg"):
        target = local / "shapes" / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (local / "shapes" / "circles" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    (local / "shapes" / "squares" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    s3.upload(str(local), f"s3://{BUCKET}/images")
    images, store, runs = (f"s3://{BUCKET}/{p}" for p in ("images/shapes", "store", "runs"))
    args = ["--shards", "4", "--image-size", "64", "--cache-dir", cache_dir, "--num-cpus", "2"]
    first = wf("extract", images, "--store", store, *args, "--json", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    local_run = wf("extract", str(local / "shapes"), "--store", str(tmp_path / "store"), *args)
    assert local_run.returncode == 0
    assert rows_of(store, env) == rows_of(str(tmp_path / "store"))  # exactly as a local folder
    (report,) = json.loads(first.stdout)
    assert report["rejects"] == 1 and "rejects.parquet" in report["rejects_path"]
    again = wf("extract", images, "--store", store, *args, "--json", env=env)
    assert json.loads(again.stdout)[0]["shards_skipped"] == 8  # incremental, on S3 too
    trained = wf("train-all", "--store", store, "--runs", runs, "--methods",
                 "bottleneck,scratch", "--epochs", "2", "--scratch-image-size", "48",
                 "--cv", "0", "--num-cpus", "2", env=env)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = wf("evaluate", f"{runs}/shapes/scratch/model.keras", images, "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (
        json.loads(evaluated.stdout)["examples"] == 120
        and len(json.loads(evaluated.stdout)["rejects"]) == 1
    )
    checked = wf("verify", store, "--runs", runs, env=env)
    assert checked.returncode == 0 and "no problems" in checked.stdout
    # Credentials come from the environment and go nowhere: not in the store, the runs, the
    # logs, the settings or the metrics, nor in what wf printed.
    secret = env["AWS_SECRET_ACCESS_KEY"].encode()
    objects = _s3_objects(s3, "store") + _s3_objects(s3, "runs")
    assert any("_logs/" in o for o in objects) and any(o.endswith("settings.json") for o in objects)
    assert not [o for o in objects if secret in s3.read(o)]
    for done in (first, again, trained, evaluated, checked):
        assert secret.decode() not in done.stdout + done.stderr


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the command and its whole process group at once, as a crash would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def test_a_driver_killed_mid_extract_on_s3_recomputes_nothing_committed(s3, data, cache_dir):
    env = s3.env()
    s3.upload(str(data.parent), f"s3://{BUCKET}/killed")
    images, store = f"s3://{BUCKET}/killed/shapes", f"s3://{BUCKET}/killed-store"
    args = ["--shards", "8", "--augment", "6", "--cache-dir", cache_dir, "--num-cpus", "2"]
    run = wf_background("extract", images, "--store", store, *args, env=env)
    commits = lambda: [o for o in _s3_objects(s3, "killed-store") if "/_commits/" in o]  # noqa: E731
    wait_for(lambda: len(commits()) >= 2, run)
    _kill_tree(run)
    committed = len(commits())
    assert 2 <= committed < 16
    again = wf("extract", images, "--store", store, *args, "--json", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    (report,) = json.loads(again.stdout)
    assert report["shards_skipped"] == committed and report["shards_done"] == 16 - committed
    assert wf("verify", store, env=env).returncode == 0


def test_a_driver_killed_mid_train_all_on_s3_resumes_from_its_checkpoint(s3, reference, tmp_path):
    env = s3.env()
    s3.upload(reference, f"s3://{BUCKET}/trained-store")
    store, runs, epochs = f"s3://{BUCKET}/trained-store", f"s3://{BUCKET}/trained-runs", 40
    args = ["train-all", "--store", store, "--runs", runs, "--methods", "bottleneck",
            "--epochs", str(epochs), "--num-cpus", "2", "--cv", "0"]  # fmt: skip
    run = wf_background(*args, env=env)
    s3fs = s3.filesystem()
    pointer = f"{BUCKET}/trained-runs/_checkpoints/shapes-bottleneck/latest.json"
    wait_for(lambda: _names_a_checkpoint(s3fs, pointer, "folder"), run)
    _kill_tree(run)
    again = wf(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads(s3.read(f"{BUCKET}/trained-runs/shapes/bottleneck/metrics.json"))
    assert 1 <= metrics["resumed_from_epoch"] < epochs and metrics["epochs"] == epochs
    assert metrics["optimizer_steps"] == epochs * metrics["steps_per_epoch"]


def test_the_object_store_gone_for_a_while_mid_extract(s3, data, cache_dir):
    env = s3.env()
    s3.upload(str(data.parent), f"s3://{BUCKET}/outage")
    images, store = f"s3://{BUCKET}/outage/shapes", f"s3://{BUCKET}/outage-store"
    args = ["--shards", "8", "--augment", "4", "--cache-dir", cache_dir, "--num-cpus", "2"]
    run = wf_background("extract", images, "--store", store, *args, env=env)
    wait_for(lambda: any("/_commits/" in o for o in _s3_objects(s3, "outage-store")), run)
    s3.proxy.go_down()  # every connection cut, open or new, for 10 seconds
    time.sleep(10)
    s3.proxy.come_back()
    assert s3.proxy.refused > 0  # the run did call the store while it was down
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]  # retried with backoff, then went on
    checked = wf("verify", store, env=env)
    assert checked.returncode == 0, checked.stderr  # and the store reads back consistent


def test_a_commit_the_store_refuses_fails_its_shard_alone_and_the_rerun_does_only_it(
    s3, data, cache_dir
):  # fmt: skip
    env = s3.env()
    s3.upload(str(data.parent), f"s3://{BUCKET}/denied")
    images, store = f"s3://{BUCKET}/denied/shapes", f"s3://{BUCKET}/denied-store"
    args = ["--shards", "4", "--cache-dir", cache_dir, "--num-cpus", "2", "--json"]
    # The store answers 403 AccessDenied to one shard's commit record, and to nothing else.
    s3.proxy.refuse = re.compile(rb"PUT /[^ ]*/_commits/[^ ]*/train-00001\.json")
    try:
        failed = wf("extract", images, "--store", store, *args, env=env)
    finally:
        s3.proxy.refuse = None
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert s3.proxy.denied >= 1 and "Traceback" not in failed.stderr
    (report,) = json.loads(failed.stdout)
    assert (report["shards_done"], report["shards_failed"]) == (7, 1), report  # of 4 + 4
    assert len(report["failures"]) == 1 and report["failures"][0].startswith("train shard 1:")
    assert "run the same command again" in failed.stderr
    # Nothing of the refused shard counts: the manifest names the seven others, no part file
    # of it is left, and the store reads back consistent.
    manifest = json.loads(s3.read(f"{BUCKET}/denied-store/shapes/efficientnet_lite0/manifest.json"))
    assert "train/00001" not in manifest["shards"] and len(manifest["shards"]) == 7
    parts = [o for o in _s3_objects(s3, "denied-store") if "/part-" in o]
    assert len(parts) == 7 and not [o for o in _s3_objects(s3, "denied-store") if "_commits" in o]
    again = wf("extract", images, "--store", store, *args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    (report,) = json.loads(again.stdout)
    assert (report["shards_done"], report["shards_skipped"], report["shards_failed"]) == (1, 7, 0)
    checked = wf("verify", store, env=env)
    assert checked.returncode == 0, checked.stderr


def test_wf_label_moves_images_on_an_object_store_and_logs_them(s3, tmp_path):
    local = tmp_path / "local" / "pets"
    make_dataset(local / "train", ("cats", "dogs"), 2, size=32)
    make_dataset(local / "unlabelled", ("batch",), 3, size=32, seed=1)
    s3.upload(str(tmp_path / "local"), f"s3://{BUCKET}/labelling")
    labels = tmp_path / "labels.csv"
    rows = [
        "path,label",
        "unlabelled/batch/batch_0000.jpg,cats",
        "unlabelled/batch/batch_0001.jpg,dogs",
        "unlabelled/batch/gone.jpg,cats",
    ]
    labels.write_text("\n".join(rows) + "\n")
    done = wf("label", f"s3://{BUCKET}/labelling/pets", str(labels), "--json", env=s3.env())
    assert done.returncode == 1, done.stderr[-3000:]  # one row could not be applied
    report = json.loads(done.stdout)
    assert len(report["moved"]) == 2 and "gone.jpg is not in" in report["problems"][0]
    objects = {
        p.removeprefix(f"{BUCKET}/labelling/pets/") for p in s3.objects(f"{BUCKET}/labelling")
    }
    assert {"train/cats/batch_0000.jpg", "train/dogs/batch_0001.jpg"} <= objects
    assert "unlabelled/batch/batch_0000.jpg" not in objects
    assert "unlabelled/batch/batch_0002.jpg" in objects and ".wf-labels.jsonl" in objects
    logged = s3.read(f"{BUCKET}/labelling/pets/.wf-labels.jsonl").decode().splitlines()
    assert [json.loads(line)["to"] for line in logged] == ["train/cats/batch_0000.jpg",
                                                           "train/dogs/batch_0001.jpg"]  # fmt: skip
    moved = s3.read(f"{BUCKET}/labelling/pets/train/cats/batch_0000.jpg")
    assert moved == (local / "unlabelled" / "batch" / "batch_0000.jpg").read_bytes()


def test_an_onnx_backbone_on_the_object_store_extracts_into_a_store_there(s3, tmp_path, cache_dir):
    from tests.onnx_models import conv_model

    conv_model(tmp_path / "models" / "tinyconv.onnx")
    s3.upload(str(tmp_path / "models"), f"s3://{BUCKET}/models")
    make_dataset(tmp_path / "pets", ("cats", "dogs"), 4, size=32)
    source = f"onnx:s3://{BUCKET}/models/tinyconv.onnx"
    store = f"s3://{BUCKET}/onnx-store"
    args = ["--shards", "2", "--augment", "0", "--cache-dir", cache_dir]
    done = wf("extract", str(tmp_path / "pets"), "--store", store, "--backbone", source, *args,
              env=s3.env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(s3.read(f"{BUCKET}/onnx-store/pets/tinyconv/manifest.json"))
    assert manifest["weights_source"] == source and manifest["runtime"] == "onnxruntime"
    local = (tmp_path / "models" / "tinyconv.onnx").read_bytes()
    import hashlib

    assert manifest["weights_sha256"] == hashlib.sha256(local).hexdigest()


def test_the_lease_on_an_object_store_refuses_a_second_writer_and_survives_a_race(s3):
    from tests.storage.test_lease import race, refuse_second

    refuse_second(s3.filesystem(), f"{BUCKET}/leases/one/_lease.json")
    race(s3.filesystem(), f"{BUCKET}/leases/race/_lease.json")
