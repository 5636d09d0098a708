"""Honest numbers, checked against a test set that cross-validation never sees.

For each real dataset of ``../shared/datasets`` (cats_vs_dogs, flowers) and each of ``--seeds``
seeds: half of the validation folder, drawn with that seed, becomes a test split; train + the
other half of validation are what `wf train-all --cv 5` cross-validates (the test split is never
read by it). Each seed draws its own test half (so coverage counts independent test sets, not
one set scored five times) and changes the folds, initial weights and shuffling. Each method
of ``--methods`` is trained with cross-validation, and its saved model (calibrated, with its
abstention thresholds) is run on the test split through `wf predict`'s code:

- coverage: how often the test accuracy falls inside the CV interval (Wilson, 95%, for the
  method's accuracy: ``cv.interval``), and inside wf's prediction interval for another split of
  the validation's size (``cv.prediction_interval``: the CV estimate's and the new set's
  binomial noise together), which is the test's size here;
- ECE (15 bins) on the test split, of the saved (calibrated) model and of the same model with
  the temperature taken out, beside the ECE a perfectly calibrated model would show on as many
  images (``calibration_noise_floor``) and the lowest any one temperature reaches on the test;
  and the same over every seed's test images pooled (five times the images, a fifth of the
  variance of ECE's own noise);
- abstention: the share of in-distribution test images declined, the share of out-of-
  distribution images declined (the other dataset's test photos, and generated noise, flat
  colours and text), and the AUROC of the out-of-distribution score (distance to the nearest
  labelled image) between the two.

Settings: what wf gives itself (oneDNN on, one thread per worker), EfficientNet-Lite0, the
blog's bottleneck recipe (50 epochs, batch 16), and ``--augment 0``: the blog's method 2
computes its bottleneck features once, without augmentation.

Usage: python benchmarks/honest_numbers.py [--seeds 5] [--methods bottleneck,prototype]
       [--work /tmp/wf-honest]
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--methods", default="bottleneck,prototype")
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
    methods = tuple(args.methods.split(","))
    strange = sorted(write_out_of_distribution(work / "generated", per_kind=40, size=160).iterdir())
    rows: list[dict] = []
    pooled: dict[tuple[str, str], dict[str, list]] = {}
    for seed in range(args.seeds):
        data = work / f"data-{seed}"  # this seed's own test half
        for name in names:
            split_folders(Path(args.shared) / name, data / name, seed)
        started = time.perf_counter()
        sources = tuple(DatasetSource(str(data / n)) for n in names)
        run_extract(ExtractSettings(datasets=sources, store=str(work / "store"), augment=0))
        print(f"seed {seed}: extracted in {time.perf_counter() - started:.0f} s", flush=True)
        tests = {n: sorted((data / n / "test").rglob("*.jpg")) for n in names}
        settings = TrainSettings(
            store=str(work / "store"), runs=str(work / f"runs-{seed}"), methods=methods,
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
            metrics = json.loads(Path(result.model_path).with_name("metrics.json").read_text())
            raw = apply_temperature(probs, 1 / metrics["temperature"])  # the temperature undone
            low, high = cv["prediction_interval"]
            mine = pooled.setdefault((name, result.method), {"labels": [], "probs": [],
                                                               "abstained": []})  # fmt: skip
            mine["labels"].append(labels)
            mine["probs"].append(probs)
            mine["abstained"].append(abstained)
            rows.append({
                "dataset": name, "method": result.method, "seed": seed, "cv": cv["accuracy"],
                "cv_interval": cv["interval"], "prediction_interval": cv["prediction_interval"],
                "prediction_n": cv["prediction_n"], "prediction_from": cv["prediction_from"],
                "splits": cv.get("splits"), "test": round(accuracy, 4),
                "n_test": len(labels),
                "test_interval": [round(v, 4) for v in accuracy_interval(int(right.sum()),
                                                                           len(labels))],
                "in_cv_interval": cv["interval"][0] <= accuracy <= cv["interval"][1],
                "in_prediction_interval": low <= accuracy <= high,
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
        "| dataset | method | seed | cv accuracy (95%) | prediction interval (from) | test "
        "accuracy | in CV interval | in prediction interval | ECE test (raw -> calibrated) | "
        "ECE floor / best T | abstained: in-dist / other photos / generated | OOD AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['method']} | {r['seed']} | {r['cv']:.3f} "
            f"({r['cv_interval'][0]:.3f}-{r['cv_interval'][1]:.3f}) | "
            f"{r['prediction_interval'][0]:.3f}-{r['prediction_interval'][1]:.3f} "
            f"({r['prediction_from']}) | "
            f"{r['test']:.3f} (n={r['n_test']}) | "
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
        f" ({len(rows)} dataset x method x seed runs, each seed its own test half)"
    )
    print()
    print("| dataset | method | coverage: CV / prediction interval | ECE test, mean of runs "
          "(floor) | ECE test, seeds pooled (floor, n) | abstained in-dist: mean / pooled / "
          "highest run | out of distribution | AUROC |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (name, method), mine in pooled.items():
        runs = [r for r in rows if r["dataset"] == name and r["method"] == method]
        labels, probs = np.concatenate(mine["labels"]), np.concatenate(mine["probs"])
        abstained = np.concatenate(mine["abstained"])

        def mean(key: str, runs: list[dict] = runs) -> float:
            return float(np.mean([r[key] for r in runs]))

        print(
            f"| {name} | {method} | {mean('in_cv_interval'):.2f} / "
            f"{mean('in_prediction_interval'):.2f} | {mean('ece_test'):.3f} "
            f"({mean('ece_test_floor'):.3f}) | {expected_calibration_error(labels, probs):.3f} "
            f"({calibration_noise_floor(probs):.3f}, n={len(labels)}) | "
            f"{mean('abstained_in'):.3f} / {abstained.mean():.3f} / "
            f"{max(r['abstained_in'] for r in runs):.3f} | {mean('abstained_out'):.3f} | "
            f"{mean('auroc'):.3f} |"
        )


if __name__ == "__main__":
    main()
