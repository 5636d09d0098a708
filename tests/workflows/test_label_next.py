"""What to label next, end to end on a real local Ray cluster: unlabelled images stored as their
own split, `wf suggest` ranking them from a trained run, `wf label` moving the labelled ones into
class folders, and the next extract and train-all redoing only what those labels changed."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.feature_store import FeatureStore
from tasks.methods import Recipe
from tests.conftest import make_colour_dataset, make_dataset
from workflows.cli.listing import list_stores
from workflows.extract.run import run_extract
from workflows.extract.settings import DatasetSource, ExtractSettings
from workflows.label.apply import LOG, label_images
from workflows.label.settings import SuggestSettings
from workflows.label.suggest import run_suggest
from workflows.train.run import run_train_all
from workflows.train.settings import TrainSettings, default_recipes

CLASSES = ("circles", "squares")


def _dataset(root: Path) -> Path:
    shapes = root / "data" / "shapes"
    make_dataset(shapes / "train", CLASSES, 8, size=64)
    make_dataset(shapes / "validation", CLASSES, 4, size=64, seed=1)
    make_dataset(root / "pool", CLASSES, 10, size=64, seed=2)
    batch = shapes / "unlabelled" / "batch1"
    batch.mkdir(parents=True)
    for label in CLASSES:  # the true class is kept in the name, for the simulated labeller
        for path in sorted((root / "pool" / label).iterdir()):
            shutil.copy(path, batch / f"u_{path.name}")
    # A copy of a labelled image and two copies of one unlabelled image: never suggested twice.
    shutil.copy(shapes / "train" / "circles" / "circles_0000.jpg", batch / "u_copy_of_train.jpg")
    shutil.copy(batch / "u_squares_0003.jpg", batch / "u_twin.jpg")
    make_colour_dataset(root / "data" / "pairs", 10, size=64)
    return shapes


def _extract(root: Path, cache_dir: str) -> dict:
    settings = ExtractSettings(datasets=(DatasetSource(str(root / "data")),),
                               store=str(root / "store"), shards=2, input_size=64, augment=1,
                               validation_fraction=0.3, cache_dir=cache_dir)  # fmt: skip
    return {r.dataset: r for r in run_extract(settings)}


def _train(root: Path) -> dict:
    settings = TrainSettings(
        store=str(root / "store"),
        runs=str(root / "runs"),
        methods=("bottleneck", "prototype"),
        cv=0,
        recipes={**default_recipes(), "bottleneck": Recipe(epochs=4)},
    )
    return {f"{r.dataset}/{r.method}": r for r in run_train_all(settings)}


@pytest.mark.slow
def test_suggest_label_extract_train_redoes_only_what_the_labels_changed(
    tmp_path, cache_dir, ray_local
):
    shapes = _dataset(tmp_path)
    extracted = _extract(tmp_path, cache_dir)
    store = FeatureStore.open(str(tmp_path / "store"), "shapes", "efficientnet_lite0")
    pool = store.read_table("unlabelled", ["path", "label", "label_index", "copy"])
    assert pool.num_rows == 22 and set(pool["copy"].to_pylist()) == {0}  # never augmented
    assert set(pool["label_index"].to_pylist()) == {-1} and set(pool["label"].to_pylist()) == {""}
    assert store.manifest.images_per_class("train") == [8, 8]  # the pool is no class's
    listed = {s["dataset"]: s for s in list_stores(str(tmp_path / "store"))}
    assert listed["shapes"]["images"] == {"train": 16, "unlabelled": 22, "validation": 8}
    assert extracted["shapes"].rows == 2 * 16 + 8 + 22

    trained = _train(tmp_path)
    assert all(r.status == "done" for r in trained.values()), trained
    prototype = json.loads((tmp_path / "runs/shapes/prototype/metrics.json").read_text())
    assert prototype["epochs"] == 0 and prototype["optimizer_steps"] == 0
    assert prototype["accuracy"] >= 0.75 and prototype["store_ids"]["efficientnet_lite0"]

    budget = 21
    asked = SuggestSettings(
        store=str(tmp_path / "store"),
        runs=str(tmp_path / "runs"),
        output=str(tmp_path / "next"),
        budget=budget,
    )
    (summary,) = run_suggest(asked).values()
    assert summary["dataset"] == "shapes"  # pairs has no unlabelled images
    rows = list(csv.DictReader((tmp_path / "next/shapes/suggestions.csv").open()))
    assert list(rows[0]) == ["rank", "path", "score", "predicted_label", "probability", "reason"]
    suggested = [r["path"] for r in rows]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(set(suggested)) == len(rows) and all(
        p.startswith("unlabelled/batch1/") for p in suggested
    )
    # Near duplicates: a copy of a labelled image never; of the twins at most one. So one
    # batch holds at most 20 of the 22, even when 21 are asked for.
    assert "unlabelled/batch1/u_copy_of_train.jpg" not in suggested
    assert (
        len(
            {"unlabelled/batch1/u_squares_0003.jpg", "unlabelled/batch1/u_twin.jpg"}
            & set(suggested)
        )
        == 1
    )
    assert len(rows) == 20
    assert {r["reason"] for r in rows} <= {"uncertain", "spread", "filled"}
    assert all(
        r["predicted_label"] in CLASSES and 0.5 <= float(r["probability"]) <= 1 for r in rows
    )
    scores = [float(r["score"]) for r in rows]
    # The ranking does not depend on the budget: a batch of 3 is the first 3 of the 20, and
    # they come least sure first until the pool runs out (filling at the end may take images
    # passed over for lying near a labelled image).
    run_suggest(dataclasses.replace(asked, budget=3, output=str(tmp_path / "next3")))
    three = list(csv.DictReader((tmp_path / "next3/shapes/suggestions.csv").open()))
    assert three == rows[:3]
    assert float(rows[0]["score"]) == max(s for s, r in zip(scores, rows, strict=True)
                                          if r["reason"] != "filled")  # fmt: skip
    assert pq.read_table(tmp_path / "next/shapes/suggestions.parquet").num_rows == len(rows)
    assert (tmp_path / "next/shapes/report.html").read_text().count("<img") == len(rows)

    # The labeller answers five of them (the true class is in the file's name), plus a label
    # that is no class, a file that is not there, and a target that exists.
    def truth(path: str) -> str:
        return "squares" if "squares" in path or "twin" in path else "circles"

    answers = [(p, truth(p)) for p in suggested[:5]]

    clash = suggested[6]  # its name is taken in its class folder already
    taken = shapes / "train" / truth(clash) / Path(clash).name
    taken.write_bytes(b"already here")
    rows_csv = [("path", "label"), *answers, (suggested[5], "dogs"),
                ("unlabelled/batch1/missing.jpg", "circles"),
                (clash, truth(clash))]  # fmt: skip
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows_csv)
    report = label_images(str(shapes), str(tmp_path / "labels.csv"))
    assert len(report.moved) == 5 and len(report.problems) == 3
    assert any("'dogs' is not a class" in p for p in report.problems)
    assert any("exists; not overwritten" in p for p in report.problems)
    assert taken.read_bytes() == b"already here"
    for path, label in answers:
        assert not (shapes / path).exists()
        assert (shapes / "train" / label / Path(path).name).is_file()
    logged = [json.loads(line) for line in (shapes / LOG).read_text().splitlines()]
    assert [(e["from"], e["to"]) for e in logged] == [
        (p, f"train/{label}/{Path(p).name}") for p, label in answers]  # fmt: skip
    assert all(e["by"] and e["at"] for e in logged)
    taken.unlink()

    before = {k: r.sha256 for k, r in store.manifest.shards.items()}
    again = _extract(tmp_path, cache_dir)
    assert again["pairs"].shards_done == 0  # untouched
    after = FeatureStore.open(str(tmp_path / "store"), "shapes", "efficientnet_lite0").manifest
    changed = {k for k, r in after.shards.items() if before.get(k) != r.sha256}
    assert again["shapes"].shards_done == len(changed) and again["shapes"].shards_skipped > 0
    assert {k.split("/")[0] for k in changed} <= {
        "train",
        "unlabelled",
    } and "validation/0" not in changed
    gained = [sum(label == c for _, label in answers) for c in CLASSES]
    assert after.images_per_class("train") == [8 + gained[0], 8 + gained[1]]

    retrained = _train(tmp_path)
    assert {k: r.status for k, r in retrained.items()} == {
        "shapes/bottleneck": "done", "shapes/prototype": "done",
        "pairs/bottleneck": "kept", "pairs/prototype": "kept"}  # fmt: skip
    metrics = json.loads((tmp_path / "runs/shapes/bottleneck/metrics.json").read_text())
    assert metrics["store_ids"]["efficientnet_lite0"] == after.labelled_id
    assert np.isfinite(metrics["accuracy"])
