"""The run's typed files: metrics.json and a checkpoint's state.json read and written in one
place, through storage on a local folder."""

from __future__ import annotations

import json

import pytest

from storage.errors import StoreError
from storage.runs import (
    Artifact,
    CheckpointState,
    FinalCounts,
    JobCheckpoints,
    JobMetrics,
    RunsLayout,
)


def test_job_metrics_round_trip_keeps_unknown_keys_and_leaves_out_cv_without_it(tmp_path):
    files = RunsLayout(str(tmp_path)).job("cats", "bottleneck")
    metrics = JobMetrics("cats", "bottleneck", accuracy=0.9, n=10, accuracy_interval=[0.6, 0.98],
                         epochs=3, store_ids={"efficientnet_lite0": "abc"})  # fmt: skip
    metrics.update(examples=10, from_a_newer_wf={"x": 1})
    files.write_metrics(metrics)
    on_disk = json.loads((tmp_path / "cats" / "bottleneck" / Artifact.METRICS).read_text())
    assert on_disk["from_a_newer_wf"] == {"x": 1} and on_disk["n"] == on_disk["examples"] == 10
    assert "cv" not in on_disk and "temperature" not in on_disk  # no --cv: the keys are absent
    assert on_disk["workers_in_sync"] is None and on_disk["abstain"] is None  # always written
    read = files.metrics()
    assert read == metrics and read.extra == {"from_a_newer_wf": {"x": 1}}
    assert read.store_ids == {"efficientnet_lite0": "abc"} and read.accuracy_interval == [0.6, 0.98]


def test_job_metrics_read_an_older_file_and_refuse_one_that_is_not_an_object(tmp_path):
    folder = tmp_path / "cats" / "scratch"
    folder.mkdir(parents=True)
    (folder / Artifact.METRICS).write_text(json.dumps({"accuracy": 0.8, "examples": 5,
                                                      "manifest_ids": {"b": "m"}}))  # fmt: skip
    read = RunsLayout(str(tmp_path)).job("cats", "scratch").metrics()
    assert read.accuracy == 0.8 and read.n == read.examples == 5  # n from examples
    assert read.store_ids == {} and read.manifest_ids == {"b": "m"} and read.cv is None
    (folder / Artifact.METRICS).write_text("[1, 2]")
    with pytest.raises(StoreError, match="not a JSON object"):
        RunsLayout(str(tmp_path)).job("cats", "scratch").metrics()


def test_checkpoint_state_round_trips_with_and_without_final_counts(tmp_path):
    log = {"history": {"loss": [0.5, 0.4]}, "epoch": 2}
    state = CheckpointState(
        log, {"best_val_loss": 0.3, "best_epoch": 2}, {"best": 0.3, "waited": 0}
    )
    again = CheckpointState.from_bytes(state.to_bytes())
    assert again == state and again.final is None and again.epoch == 2 and again.best_epoch == 2
    state.final = FinalCounts(resumed_from=1, rows_per_epoch=8, steps_per_epoch=2,
                              optimizer_steps=4)  # fmt: skip
    checkpoints = JobCheckpoints(RunsLayout(str(tmp_path)).location, "cats-bottleneck")
    checkpoints.save(2, {"state.json": state.to_bytes()})
    latest = checkpoints.latest()
    assert latest is not None
    assert CheckpointState.from_bytes(latest["state.json"]).final == state.final
    assert CheckpointState().epoch == 0 and CheckpointState().history == {}
