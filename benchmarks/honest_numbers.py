"""Honest numbers, checked against a test set that cross-validation never sees.

For each real dataset of ``../shared/datasets`` (cats_vs_dogs, flowers): half of its
validation folder, drawn with a fixed seed, becomes a test split; train + the other half of
validation are what `wf train-all --cv 5` cross-validates (the test split is never read by it).
Then, for each of ``--seeds`` seeds (folds, initial weights and shuffling change; the data do
not), the bottleneck job is trained with cross-validation, and its saved model (calibrated,
with its abstention thresholds) is run on the test split through `wf predict`'s code:

- coverage: how often the test accuracy falls inside the CV interval (Wilson, 95%, for the
  method's accuracy), and inside the prediction interval for a test set of the test's size
  (the CV estimate's and the test's binomial noise together);
- ECE (15 bins) on the test split, of the saved (calibrated) model and of the same model with
  the temperature taken out, beside the ECE a perfectly calibrated model would show on as many
  images (``calibration_noise_floor``) and the lowest any one temperature reaches on the test;
- abstention: the share of in-distribution test images declined, the share of out-of-
  distribution images declined (the other dataset's test photos, and generated noise, flat
  colours and text), and the AUROC of the out-of-distribution score (distance to the nearest
  labelled image) between the two.

Settings: what wf gives itself (oneDNN on, one thread per worker), EfficientNet-Lite0, the
blog's bottleneck recipe (50 epochs, batch 16), and ``--augment 0``: the blog's method 2
computes its bottleneck features once, without augmentation.

Usage: python benchmarks/honest_numbers.py [--seeds 5] [--work /tmp/wf-honest]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATASETS = ("cats_vs_dogs", "flowers")


def split_folders(source: Path, target: Path, seed: int = 0) -> None:
    """``target/{train,validation,test}`` as symlinks: half of each validation class, drawn
    with ``seed``, as the test split."""
    if target.exists():
        return
    rng = random.Random(seed)
    for kind in ("train", "validation"):
        for folder in sorted(p for p in (source / kind).iterdir() if p.is_dir()):
            files = sorted(folder.iterdir())
            if kind == "validation":
                rng.shuffle(files)
                halves = {"validation": files[: len(files) // 2], "test": files[len(files) // 2 :]}
            else:
                halves = {"train": files}
            for split, chosen in halves.items():
                out = target / split / folder.name
                out.mkdir(parents=True, exist_ok=True)
                for file in chosen:
                    (out / file.name).symlink_to(file)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an out-of-distribution score > an in-distribution one), ties halved (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.concatenate([inside, outside])))


def answers(classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Probabilities, distances and abstentions of images through the classifier."""
    from storage.filesystem import Location
    from tasks.abstention import nearest_distance
    from tasks.audit import normalise
    from tasks.heads import probabilities
    from tasks.images import load_image

    location = Location.at("/")
    probs, distance, decided = [], [], []
    for start in range(0, len(paths), 32):
        pixels = np.stack([load_image(location.filesystem, str(p), classifier.input_size)
                           for p in paths[start : start + 32]])  # fmt: skip
        outputs, embedded = classifier.embedding.predict_on_batch(pixels.astype(np.float32))
        found = probabilities(outputs, len(classifier.classes))
        far = nearest_distance(normalise(np.asarray(embedded)), classifier.bank)
        probs.append(found)
        distance.append(far)
        decided += classifier.abstention.decide(found, far)
    return np.concatenate(probs), np.concatenate(distance), np.array([d[0] for d in decided]), \
        decided  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", default="/tmp/wf-honest")
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "datasets"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from benchmarks.machine import banner
    from tasks.classifier import load_trained_model
    from tasks.cross_validation import apply_temperature
    from tasks.evaluation import (
        accuracy_interval,
        calibration_noise_floor,
        expected_calibration_error,
    )
    from tasks.methods import TrainOptions
    from tests.corpus import write_out_of_distribution
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings, default_recipes

    print(banner())
    work = Path(args.work)
    names = args.datasets.split(",")
    for name in names:
        split_folders(Path(args.shared) / name, work / "data" / name)
    strange = sorted(write_out_of_distribution(work / "generated", per_kind=40, size=160).iterdir())
    started = time.perf_counter()
    sources = tuple(DatasetSource(str(work / "data" / n)) for n in names)
    run_extract(ExtractSettings(datasets=sources, store=str(work / "store"), augment=0))
    print(f"extracted in {time.perf_counter() - started:.0f} s (kept stores are reused)")
    tests = {n: sorted((work / "data" / n / "test").rglob("*.jpg")) for n in names}
    rows = []
    for seed in range(args.seeds):
        settings = TrainSettings(
            store=str(work / "store"), runs=str(work / f"runs-{seed}"), methods=("bottleneck",),
            recipes=default_recipes(), options=TrainOptions(seed=seed), cv=5, force=True,
            cluster=ClusterSettings(),
        )  # fmt: skip
        began = time.perf_counter()
        results = run_train_all(settings)
        seconds = time.perf_counter() - began
        for result in results:
            assert result.status == "done", result.error
            name = result.dataset
            classifier = load_trained_model(result.model_path)
            classes = classifier.classes
            labels = np.array([classes.index(p.parent.name) for p in tests[name]])
            probs, distance, abstained, _ = answers(classifier, tests[name])
            others = [p for n in names if n != name for p in tests[n]] + strange
            _, far, declined, _ = answers(classifier, others)
            right = probs.argmax(1) == labels
            accuracy = float(right.mean())
            cv = result.cv
            n_cv, n_test = cv["n"], len(labels)
            half = 1.96 * math.sqrt(cv["accuracy"] * (1 - cv["accuracy"]) * (1 / n_cv + 1 / n_test))
            metrics = json.loads(Path(result.model_path).with_name("metrics.json").read_text())
            raw = apply_temperature(probs, 1 / metrics["temperature"])  # the temperature undone
            rows.append({
                "dataset": name, "seed": seed, "cv": cv["accuracy"],
                "cv_interval": cv["interval"], "test": round(accuracy, 4), "n_test": n_test,
                "test_interval": [round(v, 4) for v in accuracy_interval(int(right.sum()),
                                                                           n_test)],
                "in_cv_interval": cv["interval"][0] <= accuracy <= cv["interval"][1],
                "in_prediction_interval": abs(accuracy - cv["accuracy"]) <= half,
                "temperature": metrics["temperature"],
                "ece_test_uncalibrated": round(expected_calibration_error(labels, raw), 4),
                "ece_test": round(expected_calibration_error(labels, probs), 4),
                # ECE's own noise on this many images, and the best any one temperature gets
                # on the test itself (an oracle: a ceiling for temperature scaling here).
                "ece_test_floor": round(calibration_noise_floor(probs), 4),
                "ece_test_best_temperature": round(min(
                    expected_calibration_error(labels, apply_temperature(raw, t))
                    for t in np.geomspace(0.5, 10, 121)), 4),
                "ece_oof": [metrics["ece"]["before"], metrics["ece"]["after"]],
                "abstained_in": round(float(abstained.mean()), 4),
                "abstained_out": round(float(declined.mean()), 4),
                "abstained_out_other_photos": round(float(declined[: len(others) - len(strange)]
                                                          .mean()), 4),
                "abstained_out_generated": round(float(declined[len(others) - len(strange):]
                                                       .mean()), 4),
                "auroc": round(auroc(distance, far), 4),
                "answered_accuracy": round(float(right[~abstained].mean()), 4),
                "thresholds": metrics["abstain"], "train_all_seconds": round(seconds, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| dataset | seed | cv accuracy (95%) | test accuracy | in CV interval | in prediction "
        "interval | ECE test (raw -> calibrated) | ECE floor / best T | abstained: in-dist / "
        "other photos / generated | OOD AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['seed']} | {r['cv']:.3f} ({r['cv_interval'][0]:.3f}-"
            f"{r['cv_interval'][1]:.3f}) | {r['test']:.3f} (n={r['n_test']}) | "
            f"{'yes' if r['in_cv_interval'] else 'no'} | "
            f"{'yes' if r['in_prediction_interval'] else 'no'} | "
            f"{r['ece_test_uncalibrated']:.3f} -> {r['ece_test']:.3f} | "
            f"{r['ece_test_floor']:.3f} / {r['ece_test_best_temperature']:.3f} | "
            f"{r['abstained_in']:.3f} / {r['abstained_out_other_photos']:.3f} / "
            f"{r['abstained_out_generated']:.3f} | {r['auroc']:.3f} |"
        )
    print()
    print(
        f"coverage of the CV interval: {np.mean([r['in_cv_interval'] for r in rows]):.2f}; "
        f"of the prediction interval: {np.mean([r['in_prediction_interval'] for r in rows]):.2f}"
        f" ({len(rows)} dataset x seed runs)"
    )
    for name in names:
        mine = [r for r in rows if r["dataset"] == name]
        print(
            f"{name}: ECE on test {np.mean([r['ece_test'] for r in mine]):.3f} calibrated "
            f"(uncalibrated {np.mean([r['ece_test_uncalibrated'] for r in mine]):.3f}; a "
            f"perfectly calibrated model {np.mean([r['ece_test_floor'] for r in mine]):.3f}, the "
            f"best single temperature {np.mean([r['ece_test_best_temperature'] for r in mine]):.3f}"
            "); "
            f"abstained in-distribution {np.mean([r['abstained_in'] for r in mine]):.3f}, "
            f"out {np.mean([r['abstained_out'] for r in mine]):.3f}; AUROC "
            f"{np.mean([r['auroc'] for r in mine]):.3f}"
        )


if __name__ == "__main__":
    main()
