"""The real ``wf`` command on a real local Ray cluster, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.hashing import content_id
from tests.conftest import make_dataset

WF = [sys.executable, "-m", "workflows.cli"]


def _wf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*WF, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_extract_8_shards_end_to_end(tmp_path, cache_dir):
    data = make_dataset(tmp_path / "toys", ("balls", "blocks", "cones"), 10, size=40)
    (data / "blocks" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    store = tmp_path / "store"
    result = _wf(
        "extract", str(data), "--shards", "8", "--store", str(store), "--image-size", "64",
        "--augment", "2", "--validation-fraction", "0.3", "--cache-dir", cache_dir,
        "--num-cpus", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toys" in result.stdout and "rejected files" in result.stderr

    root = store / "toys" / "efficientnet_lite0"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["classes"] == ["balls", "blocks", "cones"] and manifest["num_shards"] == 8
    assert len(manifest["shards"]) == 16  # 8 train + 8 validation
    assert manifest["weights_source"] == "imagenet" and len(manifest["weights_sha256"]) == 64
    parts = sorted(root.glob("*/part-*.parquet"))
    assert [p.name for p in parts if p.parent.name == "train"] == [
        f"part-{i:05d}-of-00008.parquet" for i in range(8)
    ]
    rows = pq.read_table([str(p) for p in parts]).to_pylist()
    expected = {}
    for label_index, label in enumerate(manifest["classes"]):
        for image in sorted((data / label).iterdir()):
            if image.name != "broken.jpg":
                expected[f"{label}/{image.name}"] = (
                    content_id(image.read_bytes()),
                    label,
                    label_index,
                )
    seen: dict[str, set[int]] = {}
    splits = {}
    taps = manifest["taps"]
    for row in rows:
        image_id, label, label_index = expected[row["path"]]
        assert (row["image_id"], row["label"], row["label_index"]) == (image_id, label, label_index)
        seen.setdefault(row["path"], set()).add(row["copy"])
        splits[row["path"]] = row["split"]
        for tap, spec in taps.items():
            values = np.asarray(row[f"tap_{tap}"], dtype=np.float32)
            assert values.size == np.prod(spec["shape"]) and np.isfinite(values).all()
    assert set(seen) == set(expected)  # every good image, and nothing else
    for path, copies in seen.items():
        assert copies == ({0, 1, 2} if splits[path] == "train" else {0})
    assert 0 < sum(s == "validation" for s in splits.values()) < len(splits)
    rejects = pq.read_table(root / "rejects.parquet").to_pylist()
    assert [(r["path"], r["reason"]) for r in rejects] == [("blocks/broken.jpg", "corrupt")]

    again = _wf("extract", str(data), "--shards", "8", "--store", str(store), "--image-size", "64",
                "--augment", "2", "--validation-fraction", "0.3", "--cache-dir", cache_dir,
                "--num-cpus", "2")  # fmt: skip
    assert again.returncode == 0
    line = next(x for x in again.stdout.splitlines() if "toys" in x)
    assert "16" in line.split("│")[6]  # all 16 shards skipped


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "/no/such/folder"], "is not a folder"),
        (["extract", "{data}", "--backbone", "resnet9000"], "unknown backbone"),
        (["extract", "{data}", "--shards", "0"], "--shards must be"),
        (["extract", "{data}", "--weights", "/no/weights.h5"], "existing file"),
        (["extract"], "no dataset given"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    data = make_dataset(tmp_path / "d", ("a", "b"), 2, size=16)
    result = _wf(*[a.format(data=data) for a in args], "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_documents_every_option_with_an_example():
    result = _wf("extract", "--help")
    assert result.returncode == 0
    for option in ("--shards", "--augment", "--backbone", "--weights", "--store", "--address",
                   "--config", "--taps", "--dtype", "--runtime", "Example:"):  # fmt: skip
        assert option in result.stdout


def test_unknown_option_is_a_message_not_a_traceback(tmp_path):
    result = _wf("extract", str(tmp_path), "--shardz", "3")
    assert result.returncode == 2 and "No such option" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_on_a_fresh_machine(tmp_path, cache_dir):
    # The README's main job, end to end in its own process, with fewer epochs and shards.
    result = _wf("demo", "--dir", str(tmp_path / "demo"), "--images-per-class", "8",
                 "--epochs", "2", "--shards", "2",
                 "--num-cpus", "2", "--cache-dir", cache_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        Path(tmp_path) / "demo" / "store" / "shapes" / "efficientnet_lite0" / "manifest.json"
    ).exists()
    summary = (Path(tmp_path) / "demo" / "runs" / "summary.md").read_text()
    for method in ("bottleneck", "finetune", "scratch"):
        assert f"| shapes | {method} | done |" in summary, summary
