"""Training on a real local Ray cluster: the three methods, several datasets in one run, a failed
job, fine-tuned models on images against stored taps, two workers in sync, resume, predict."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from storage.feature_store import FeatureStore
from storage.runs import RunsLayout
from tasks.images import decode_image
from tasks.methods import METHODS, Recipe, TrainOptions
from tasks.training.weights import set_named_weights
from tests.conftest import make_colour_dataset, make_dataset
from workflows.extract.run import run_extract
from workflows.extract.settings import DatasetSource, ExtractSettings
from workflows.train.run import plan_jobs, run_train_all
from workflows.train.settings import TrainSettings, default_recipes

pytestmark = pytest.mark.slow
SHAPES = ("circles", "squares", "triangles")


def _recipes(epochs: int = 4, scratch: int = 12, **more: Recipe) -> dict[str, Recipe]:
    recipes = default_recipes()
    return {**recipes, "bottleneck": Recipe(epochs=epochs),
            "finetune": replace(recipes["finetune"], epochs=2),
            "scratch": Recipe(epochs=scratch, batch_size=8), **more}  # fmt: skip


def _files(runs, dataset, method):
    return RunsLayout(str(runs)).job(dataset, method)


def _extract(root: Path, cache_dir: str, shards: int) -> str:
    """Extract every dataset under ``root/data`` into ``root/store`` at 64 px, one augmented
    copy per training image, 30% validation; returns the store."""
    store = str(root / "store")
    run_extract(
        ExtractSettings(
            datasets=(DatasetSource(str(root / "data")),),
            store=store,
            shards=shards,
            input_size=64,
            augment=1,
            validation_fraction=0.3,
            cache_dir=cache_dir,
        )
    )
    return store


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, cache_dir, ray_local):
    """Three datasets extracted into one store, one of them then broken: ``(root, store)``."""
    root = tmp_path_factory.mktemp("train")
    make_dataset(root / "data" / "shapes", SHAPES, 30, size=64)
    make_colour_dataset(root / "data" / "pairs", 24, size=64, seed=3)
    make_dataset(root / "data" / "broken", ("circles", "squares"), 8, size=64, seed=5)
    store = _extract(root, cache_dir, shards=2)
    broken = FeatureStore.open(store, "broken", "efficientnet_lite0")
    for path in broken.files("train"):
        os.remove(path)  # a store whose manifest names files that are gone
    return root, store


@pytest.fixture(scope="module")
def trained(extracted):
    """One train-all over every dataset of the store."""
    root, store = extracted
    settings = TrainSettings(store=store, runs=str(root / "runs"), recipes=_recipes(),
                             options=TrainOptions(scratch_image_size=64, seed=1))  # fmt: skip
    results = {f"{r.dataset}/{r.method}": r for r in run_train_all(settings)}
    return root, settings, results


def test_every_method_learns_well_above_chance(trained):
    _, _, results = trained
    # Chance is 1/3 on shapes and 1/2 on pairs; the small convnet from scratch gets the easy one.
    for key, floor in (
        ("shapes/bottleneck", 0.9),
        ("shapes/finetune", 0.9),
        ("pairs/bottleneck", 0.9),
        ("pairs/finetune", 0.9),
        ("pairs/scratch", 0.8),
    ):
        result = results[key]
        assert result.status == "done", result.error
        assert result.accuracy >= floor, (key, result.accuracy)
    assert results["shapes/scratch"].status == "done"


def _wf_json(*args: str) -> object:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "workflows.cli", *args, "--json"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_wf_stores_and_wf_runs_list_what_was_written(trained):
    _, settings, results = trained
    listed = {s["dataset"]: s for s in _wf_json("stores", settings.store)}
    assert set(listed) == {"shapes", "pairs", "broken"}
    for dataset in ("shapes", "pairs"):
        manifest = FeatureStore.open(settings.store, dataset, "efficientnet_lite0").manifest
        shown = listed[dataset]
        assert shown["images"] == {s: sum(manifest.images_per_class(s))
                                   for s in ("train", "validation")}  # fmt: skip
        assert shown["rows"] == sum(r.rows for r in manifest.shards.values())
        assert shown["classes"] == len(manifest.classes) and shown["augment"] == 1
        assert shown["shards"] == f"{len(manifest.shards)}/{len(manifest.shards)}"
    runs = {f"{r['dataset']}/{r['method']}": r for r in _wf_json("runs", settings.runs)}
    done = {key for key, r in results.items() if r.status == "done"}
    assert set(runs) == done  # a failed job has no model to list
    for key in done:
        metrics = _files(settings.runs, *key.split("/")).read_json("metrics.json")
        assert runs[key]["accuracy"] == metrics["accuracy"] and runs[key]["n"] == metrics["n"]
        assert runs[key]["accuracy_interval"] == metrics["accuracy_interval"]
        assert Path(runs[key]["model"]).is_file() and runs[key]["epochs"] == metrics["epochs"]
        assert (runs[key]["cv"] is not None) == ("cv" in metrics)


def test_tensorboard_event_files_hold_every_epoch_of_the_history(trained):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    _, settings, _ = trained
    files = _files(settings.runs, "shapes", "bottleneck")
    history = list(csv.DictReader(io.StringIO(Path(files.path("history.csv")).read_text())))
    for run, prefix in (("train", ""), ("validation", "val_")):
        (events,) = (Path(files.path("tensorboard")) / run).glob("events.out.tfevents.*")
        scalars: dict[str, dict[int, float]] = {}
        for record in tf.data.TFRecordDataset(str(events)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        assert set(scalars) == {"epoch_accuracy", "epoch_loss"}, scalars.keys()
        for name in ("accuracy", "loss"):
            logged = scalars[f"epoch_{name}"]
            assert sorted(logged) == list(range(len(history)))
            np.testing.assert_allclose([logged[e] for e in range(len(history))],
                                       [float(row[prefix + name]) for row in history],
                                       rtol=1e-5)  # fmt: skip


def test_every_stored_image_copy_is_one_row(trained):
    """No duplicate (image_id, copy) rows in a store written by a local run (split by split,
    and across splits: an image lands in one split)."""
    _, settings, _ = trained
    for dataset in ("shapes", "pairs"):
        store = FeatureStore.open(settings.store, dataset, "efficientnet_lite0")
        keys = []
        for split in ("train", "validation"):
            table = store.read_table(split, ["image_id", "copy"])
            keys += list(zip(table["image_id"].to_pylist(), table["copy"].to_pylist(),
                             strict=True))  # fmt: skip
        assert len(keys) == len(set(keys)) == sum(r.rows for r in store.manifest.shards.values())


def test_the_summary_page_shows_every_job_with_its_numbers_and_plots(trained):
    import base64
    import html
    import re

    root, settings, results = trained
    page = (root / "runs" / "summary.html").read_text()
    for key, result in results.items():
        dataset, method = key.split("/")
        assert dataset in page and method in page
        if result.status == "done":
            metrics = _files(settings.runs, dataset, method).read_json("metrics.json")
            low, high = metrics["accuracy_interval"]
            assert f"{metrics['accuracy']:.3f} ({low:.3f}-{high:.3f}, n={metrics['n']})" in page
        else:
            assert html.escape(result.error)[:60] in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 * sum(r.status == "done" for r in results.values())
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert "http://" not in page and "https://" not in page  # one file, nothing fetched


def test_a_failed_job_does_not_stop_the_others(trained):
    root, _, results = trained
    assert results["broken/bottleneck"].status == "failed"
    assert "named by the manifest is missing" in results["broken/bottleneck"].error
    assert results["broken/finetune"].status == "failed"  # its store is refused as well
    assert results["shapes/finetune"].status == "done"
    summary = (root / "runs" / "summary.md").read_text()
    assert (
        "| broken | bottleneck | failed |" in summary and "| shapes | finetune | done |" in summary
    )
    assert (root / "runs" / "summary.html").exists()


def test_artifacts_and_plain_keras_loading(trained):
    import keras

    root, _, _ = trained
    files = _files(root / "runs", "pairs", "bottleneck")
    for name in (
        "model.keras",
        "classes.json",
        "metrics.json",
        "history.csv",
        "settings.json",
        "learning_curves.png",
        "confusion_matrix.png",
        "artifacts.json",
    ):
        assert os.path.exists(files.path(name)), name
    metrics = json.loads(Path(files.path("metrics.json")).read_text())
    assert set(metrics["per_class"]) == {"blue", "red"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["examples"]
    assert metrics["manifest_ids"]["efficientnet_lite0"] and metrics["nodes"]
    with open(files.path("history.csv")) as handle:
        assert len(list(csv.DictReader(handle))) == metrics["epochs"] == 4
    model = keras.saving.load_model(files.model)
    out = model.predict(np.zeros((1, 64, 64, 3), np.float32), verbose=0)
    assert out.shape == (1, 1) and 0 <= float(out[0, 0]) <= 1


def test_train_all_cross_validates_calibrates_and_reports_intervals(trained):
    import keras

    from storage.runs import Artifact
    from tasks.cross_validation import MIN_TEMPERATURE
    from workflows.train.cross_validate import image_folds

    root, settings, results = trained
    for dataset, images in (("shapes", 90), ("pairs", 48)):  # train + validation, by default
        result = results[f"{dataset}/bottleneck"]
        files = _files(root / "runs", dataset, "bottleneck")
        metrics = files.read_json("metrics.json")
        low, high = metrics["accuracy_interval"]
        assert low <= metrics["accuracy"] <= high and metrics["n"] == metrics["examples"] > 0
        cv = metrics["cv"]
        assert cv["folds"] == 5 and cv["n"] == images and len(cv["per_fold"]) == 5
        assert cv["interval"][0] <= cv["accuracy"] <= cv["interval"][1]
        low, high = cv["prediction_interval"]  # for another split the validation's size
        assert low <= cv["interval"][0] and high >= cv["interval"][1] - 1e-9
        assert cv["prediction_n"] == metrics["n"]
        assert cv["accuracy"] >= 0.85 and result.cv == cv
        assert [p["fraction"] for p in cv["learning_curve"]] == [0.1, 0.25, 0.5, 1.0]
        assert cv["learning_curve"][-1]["verdict"]
        assert cv["choice"]["chosen"] == "bottleneck" and cv["choice"]["among"] == ["bottleneck"]
        assert 0 <= metrics["ece"]["before"] <= 1 and 0 <= metrics["ece"]["after"] <= 1
        temperature = metrics["temperature"]
        assert temperature >= MIN_TEMPERATURE
        # The saved model is calibrated inside: its output layer is the trained one over T.
        trained_top = files.read_weights(Artifact.TRAINED_WEIGHTS)["top_output"]
        saved = keras.saving.load_model(files.model).get_layer("top").get_layer("top_output")
        saved = saved.get_weights()
        for kept, written in zip(trained_top, saved, strict=True):
            np.testing.assert_allclose(written, kept / temperature, rtol=1e-5, atol=1e-7)
        assert os.path.exists(files.path("reliability.png"))
        assert os.path.exists(files.path("labels_curve.png"))
        # Every duplicate group the folds were given sits inside one fold.
        planned = image_folds(_context(settings, dataset, "bottleneck"), settings.store, None)
        images_, folds, groups = planned
        assert groups == [] or all(len(set(folds[g])) == 1 for g in groups)
        assert len(set(folds)) == 5 and len(images_.path) == images
    # Every method's saved model gives its embedding beside its probabilities, in one pass.
    from tasks.classifier import load_trained_model

    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    for method in ("finetune", "scratch"):
        classifier = load_trained_model(_files(root / "runs", "shapes", method).model)
        assert classifier.abstention is not None and classifier.embedding is not None
        assert classifier.abstention.chosen_on == "validation"  # no cross-validation for it
        answers = classifier.answer(pixels)
        np.testing.assert_allclose(np.stack([a.probabilities for a in answers]),
                                   classifier.probabilities(pixels), atol=1e-5)  # fmt: skip
    finetune = _files(root / "runs", "shapes", "finetune").read_json("metrics.json")
    assert "cv" not in finetune and finetune["n"] > 0 and finetune["accuracy_interval"]
    summary = (root / "runs" / "summary.md").read_text()
    assert "chosen by 5-fold cross-validation (among bottleneck): bottleneck" in summary
    assert f"n={finetune['n']})" in summary and "learning curve (bottleneck):" in summary
    page = (root / "runs" / "summary.html").read_text()
    assert 'alt="reliability diagram"' in page and "expected calibration error" in page


def test_finetuned_model_on_images_matches_the_finetune_on_stored_taps(trained):
    import keras

    _, settings, _ = trained
    spec_files = _files(settings.runs, "shapes", "finetune")
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    table = store.read_table("validation", ["path", "copy"])
    taps, _ = store.read_numpy("validation", "last_block_input", copies=False)
    context = _context(settings, "shapes", "finetune")
    head = METHODS["finetune"].build_trainable(keras, context)
    set_named_weights(head, spec_files.read_weights("trained_weights.npz"))
    on_taps = head.predict(taps.astype(np.float32), verbose=0)
    model = keras.saving.load_model(spec_files.model)
    images = np.stack(
        [
            decode_image((Path(context.dataset_root) / p).read_bytes(), (64, 64))
            for p in table["path"].to_pylist()
        ]
    ).astype(np.float32)
    on_images = model.predict(images, verbose=0)
    assert (on_taps.argmax(1) == on_images.argmax(1)).all()
    np.testing.assert_allclose(on_images, on_taps, atol=0.02)


def _context(settings, dataset, method):
    return next(j.context for j in plan_jobs(settings) if j.key == f"{dataset}/{method}")


def test_two_workers_train_one_model_in_sync(trained):
    root, settings, _ = trained
    two = replace(
        settings,
        runs=str(root / "runs-2w"),
        datasets=("pairs",),
        methods=("bottleneck",),
        options=replace(settings.options, workers=2, epoch_copies="one"),
        cv=0,  # the subject is the two workers' sync, not the folds
    )
    (result,) = run_train_all(two)
    assert result.status == "done", result.error
    assert result.workers_in_sync is True and result.accuracy >= 0.9
    metrics = _files(two.runs, "pairs", "bottleneck").read_json("metrics.json")
    assert metrics["workers"] == 2 and metrics["workers_in_sync"] is True


def _wf(*args):
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_predict_agrees_with_evaluate(trained, tmp_path):
    _, settings, _ = trained
    model = _files(settings.runs, "shapes", "bottleneck").model
    folder = tmp_path / "unseen"
    make_dataset(folder, SHAPES, 5, size=80, seed=11)
    (folder / "circles" / "bad.jpg").write_text("not an image")
    predicted = _wf("predict", model, str(folder), "--format", "csv")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(predicted.stdout)))
    assert len(rows) == 16 and sum(1 for r in rows if r["error"]) == 1
    scored = [r for r in rows if not r["error"]]
    classes = [c for c in rows[0] if c.startswith("p_")]

    def right(row):
        return Path(row["path"]).parent.name == max(classes, key=lambda c: float(row[c]))[2:]

    accuracy = np.mean([right(r) for r in scored])
    answered = [r for r in scored if r["abstained"] == "false"]
    assert all(r["label"] for r in answered) and not any(r["label"] for r in scored
                                                         if r["abstained"] == "true")  # fmt: skip
    evaluated = _wf("evaluate", model, str(folder), "--output", str(tmp_path / "m.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["examples"] == 15 and len(metrics["rejects"]) == 1
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["answered"]["n"] == len(answered)
    expected = metrics["expected"]  # what the model's cross-validation said 15 images would score
    cv = _files(settings.runs, "shapes", "bottleneck").read_json("metrics.json")["cv"]
    assert expected["n"] == 15 and expected["cv_n"] == cv["n"]
    from tasks.cross_validation import prediction_interval

    assert cv["prediction_from"] == "all"  # shapes' two folders alike: every image carries it
    low, high = prediction_interval(round(cv["accuracy"] * cv["n"]), cv["n"], 15)
    assert expected["interval"] == [low, high] and low < cv["interval"][0]
    assert expected["within"] == (low <= accuracy <= high)
    assert "images like these:" in evaluated.stdout
    assert metrics["answered"]["coverage"] == pytest.approx(len(answered) / 15, abs=1e-6)
    if answered:
        assert metrics["answered"]["accuracy"] == pytest.approx(
            np.mean([Path(r["path"]).parent.name == r["label"] for r in answered]), abs=1e-6
        )


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _names_a_checkpoint(pointer: Path) -> bool:
    """Whether the job's checkpoint pointer (written after the epoch's files) is there yet."""
    try:
        return bool(json.loads(pointer.read_text()).get("folder"))
    except (OSError, ValueError):  # not written yet, or being written
        return False


def test_a_killed_run_resumes_from_its_last_checkpoint(extracted, tmp_path):
    _, store = extracted
    epochs = 40  # sub-second epochs: enough that the kill lands mid-run
    runs = tmp_path / "runs"
    args = [
        "train-all",
        "--store",
        store,
        "--runs",
        str(runs),
        "--datasets",
        "pairs",
        "--methods",
        "bottleneck",
        "--epochs-for",
        f"bottleneck={epochs}",
        "--num-cpus",
        "2",
        "--cv",
        "0",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pointer = runs / "_checkpoints" / "pairs-bottleneck" / "latest.json"
    try:
        deadline = time.time() + 300
        # Kill only once the pointer names a checkpoint: an epoch folder alone is not yet one
        # the rerun restores (the pointer is written after its files).
        while not _names_a_checkpoint(pointer):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.1)
    finally:
        # Everything at once, as a crash would: the command and the Ray cluster it started.
        # Killing the command alone leaves its Ray workers running for a few seconds, enough
        # to finish these sub-second epochs.
        tree = _descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(30)
        deadline = time.time() + 30  # a killed process can take a moment to be gone
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in tree):
            assert time.time() < deadline, "killed processes did not go"
            time.sleep(0.1)
    assert not (runs / "pairs" / "bottleneck" / "metrics.json").exists()
    # The rerun, in this process's Ray cluster: the same settings as the killed command.
    (result,) = run_train_all(
        TrainSettings(
            store=store,
            runs=str(runs),
            datasets=("pairs",),
            methods=("bottleneck",),
            recipes={**default_recipes(), "bottleneck": Recipe(epochs=epochs)},
            cv=0,
        )
    )
    assert result.status == "done", result.error
    metrics = json.loads((runs / "pairs" / "bottleneck" / "metrics.json").read_text())
    assert 1 <= metrics["resumed_from_epoch"] < epochs and metrics["epochs"] == epochs
    # The optimiser's state came back with the weights: its step count runs on from the
    # checkpoint instead of restarting at 0 (RMSprop's moving averages come with it).
    assert metrics["optimizer_steps"] == epochs * metrics["steps_per_epoch"] > 0
    assert not (runs / "_checkpoints" / "pairs-bottleneck").exists()  # gone once it is done
    shutil.rmtree(runs, ignore_errors=True)


def test_early_stopping_keeps_the_best_epoch_and_one_copy_per_epoch(ray_local, tmp_path, cache_dir):
    from PIL import Image

    # Noise images under random labels: the top can only memorise its training rows, so the
    # validation loss rises after the first epochs; the run stops early and its best epoch is
    # clearly better than its last.
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / "noise" / label).mkdir(parents=True)
        for index in range(30):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "noise" / label / f"{index}.png")
    store = _extract(tmp_path, cache_dir, shards=1)
    noisy = TrainSettings(
        store=store,
        runs=str(tmp_path / "runs"),
        methods=("bottleneck",),
        recipes={**default_recipes(), "bottleneck": Recipe(epochs=30)},
        options=TrainOptions(early_stopping_patience=2, keep_best=True, epoch_copies="one", seed=1),
        cv=0,
    )
    (result,) = run_train_all(noisy)
    assert result.status == "done", result.error
    files = _files(noisy.runs, "noise", "bottleneck")
    metrics = files.read_json("metrics.json")
    with open(files.path("history.csv")) as handle:
        val_loss = [float(row["val_loss"]) for row in csv.DictReader(handle)]
    assert metrics["epochs"] == len(val_loss) < 30
    assert metrics["best_epoch"] == metrics["epochs"] - 2
    best = val_loss[metrics["best_epoch"] - 1]
    assert best == min(val_loss) and val_loss[-1] > best + 0.01, val_loss
    # The saved model is the best epoch's: its validation loss is that epoch's, not the last's.
    assert metrics["loss"] == pytest.approx(best, abs=1e-3)
    images = FeatureStore.open(store, "noise", "efficientnet_lite0").read_numpy(
        "train", "bottleneck", copies=False
    )[1]
    assert metrics["rows_per_epoch"] == len(images)  # one copy of each image, not both


def test_a_validation_folder_unlike_the_training_one_carries_what_to_expect(
    ray_local, tmp_path, cache_dir
):
    from PIL import Image

    from tasks.cross_validation import prediction_interval
    from workflows.serve.predict import evaluate_folder

    # Training photos: blue against red, far apart. Validation photos, and a new folder like
    # them: the same classes in colours close to each other, as a folder gathered elsewhere
    # can be. Pooled out of fold the training images hide how much harder these are.
    rng = np.random.default_rng(4)
    easy, hard = (
        {"blue": (40, 60, 200), "red": (200, 50, 40)},
        {"blue": (120, 60, 140), "red": (140, 60, 120)},
    )

    def write(folder: Path, bases: dict, count: int) -> None:
        for label, base in bases.items():
            (folder / label).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(np.array(base) + rng.normal(0, 40, (64, 64, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / label / f"{index:03d}.jpg")

    write(tmp_path / "data" / "shifted" / "train", easy, 40)
    write(tmp_path / "data" / "shifted" / "validation", hard, 30)
    write(tmp_path / "new", hard, 20)
    store = _extract(tmp_path, cache_dir, shards=1)
    settings = TrainSettings(
        store=store, runs=str(tmp_path / "runs"), methods=("prototype",),
        recipes=default_recipes(), options=TrainOptions(seed=0), cv=5,
    )  # fmt: skip
    (result,) = run_train_all(settings)
    assert result.status == "done", result.error
    metrics = _files(settings.runs, "shifted", "prototype").read_json("metrics.json")
    cv = metrics["cv"]
    train, validation = cv["splits"]["by_split"]["train"], cv["splits"]["by_split"]["validation"]
    assert (train["n"], validation["n"]) == (80, 60)
    assert validation["accuracy"] < train["accuracy"] and cv["splits"]["differs"]
    # What to expect on new images rests on the validation images alone.
    assert cv["prediction_from"] == "validation"
    assert cv["prediction_interval"] == list(
        prediction_interval(validation["correct"], 60, cv["prediction_n"])
    )
    assert metrics["abstain"]["chosen_on"] == metrics["ece"]["on"] == "out-of-fold validation"
    assert metrics["abstain"]["n"] == 60
    summary = (Path(settings.runs) / "summary.md").read_text()
    assert "the validation images score lower beyond noise" in summary
    page = (Path(settings.runs) / "summary.html").read_text()
    assert "set in closed form, no epochs" in page and "like the validation ones" in page
    assert 'alt="learning curves"' not in page  # no epochs: no empty history plot
    evaluated = evaluate_folder(result.model_path, str(tmp_path / "new"))
    expected = evaluated["expected"]
    assert expected["from"] == "validation" and expected["cv_n"] == 60 and expected["n"] == 40
    assert expected["interval"] == list(prediction_interval(validation["correct"], 60, 40))


def test_fusion_trains_on_every_backbone_and_predicts_from_images(extracted, tmp_path, cache_dir):
    root, store = extracted
    pairs = (DatasetSource(str(root / "data" / "pairs")),)
    lite1 = ExtractSettings(datasets=pairs, store=store, shards=1, backbone="efficientnet_lite1",
                            input_size=72, augment=1, validation_fraction=0.3,
                            cache_dir=cache_dir)  # fmt: skip
    run_extract(lite1)
    recipes = _recipes(fusion=Recipe(epochs=6, optimizer="adam"))
    settings = TrainSettings(store=store, runs=str(tmp_path / "runs"), datasets=("pairs",),
                             methods=("bottleneck", "fusion"), recipes=recipes,
                             ensemble="always", cv=2)  # fmt: skip
    results = {r.method: r for r in run_train_all(settings)}
    result = results["fusion"]
    assert result.status == "done", result.error
    assert result.accuracy >= 0.9
    files = _files(settings.runs, "pairs", "fusion")
    metrics = files.read_json("metrics.json")
    assert set(metrics["manifest_ids"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    from workflows.serve.predict import evaluate_folder  # what `wf evaluate` runs

    evaluated = evaluate_folder(files.model, str(root / "data" / "pairs"))
    assert evaluated["accuracy"] >= 0.9  # one image in, both backbones inside

    # --ensemble always: the two cross-validated methods averaged into one saved model.
    ensemble = results["ensemble"]
    assert ensemble.status == "done", ensemble.error
    folder = _files(settings.runs, "pairs", "ensemble")
    facts = folder.read_json("metrics.json")
    choice = metrics["cv"]["choice"]["ensemble"]
    assert sorted(facts["members"]) == ["bottleneck", "fusion"] and facts["epochs"] == 0
    assert facts["cv"]["accuracy"] == choice["accuracy"] and facts["n"] == metrics["n"]
    assert facts["cv"]["folds"] == metrics["cv"]["folds"] == 2
    assert facts["abstain"] == choice["abstain"] and facts["abstain"]["max_distance"] is None
    by_split = facts["cv"]["splits"]["by_split"]  # the average's own splits, as a method's
    assert by_split["train"]["n"] + by_split["validation"]["n"] == facts["cv"]["n"]
    assert ensemble.accuracy >= 0.9 and ensemble.cv["n"] == choice["n"]
    import keras

    from tasks.images import load_image

    model = keras.saving.load_model(folder.model)  # plain Keras: one probabilities output
    size = tuple(model.input_shape[1:3])
    photos = sorted((root / "data" / "pairs").rglob("*.jpg"))[:6]
    pixels = np.stack([load_image(pafs.LocalFileSystem(), str(p), size) for p in photos])
    pixels = pixels.astype(np.float32)
    outputs = []
    for method in facts["members"]:
        member = keras.saving.load_model(_files(settings.runs, "pairs", method).model)
        own = tuple(member.input_shape[1:3])
        x = pixels if own == size else keras.layers.Resizing(*own)(pixels)
        outputs.append(np.asarray(member.predict_on_batch(x)))
    np.testing.assert_allclose(model.predict_on_batch(pixels), np.mean(outputs, axis=0),
                               atol=1e-5)  # fmt: skip
    from tasks.classifier import load_trained_model
    from workflows.serve.predict import classify, image_files

    loaded = load_trained_model(folder.model)  # as wf predict, evaluate and serve load it
    assert loaded.abstention is not None and loaded.abstention.max_distance is None
    answers = classify(loaded.with_thresholds(abstain=False), image_files(list(map(str, photos))))
    assert [a.label for a in answers] == [p.parent.name for p in photos]
    assert "| pairs | ensemble | done |" in (tmp_path / "runs" / "summary.md").read_text()
    # Rerun with --ensemble beyond-noise: the jobs are kept, and on these easy images the
    # average cannot beat fusion beyond noise, so it is not built again; the run says why.
    again = replace(settings, ensemble="beyond-noise")
    kept = {r.method: r for r in run_train_all(again)}
    assert kept["fusion"].status == "kept" and kept["ensemble"].status == "skipped"
    assert "not built: within noise of" in kept["ensemble"].error


def test_wf_export_writes_the_trained_model_as_onnx_that_runs_without_wf(trained, tmp_path):
    from tests.workflows.test_export import plain_run
    from workflows.serve.export import export_model

    root, settings, _ = trained
    model = _files(settings.runs, "pairs", "bottleneck").model
    output = tmp_path / "pairs.onnx"
    report = export_model(model, "onnx", str(output), check=str(root / "data" / "pairs"))
    assert report.written and report.agreement >= 0.995 and report.images == 48
    photos = sorted((root / "data" / "pairs").rglob("*.jpg"))[::8]
    from tasks.classifier import load_trained_model
    from tasks.images import load_image

    classifier = load_trained_model(model)
    pixels = np.stack([load_image(pafs.LocalFileSystem(), str(p), (64, 64)) for p in photos])
    expected = classifier.model.predict_on_batch(pixels.astype(np.float32))
    np.testing.assert_allclose(plain_run(output, 64, photos), expected, atol=1e-3)
