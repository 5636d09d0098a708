"""Fine-tuning time per epoch on stored taps against the Keras blog's way, in the same run.

- wf: the `finetune` job of `wf train-all` (one Ray Train worker with 2 CPUs): Lite0's last
  block and the bottleneck top trained on the stored `last_block_input` tap, so the frozen
  layers never run. The store holds 3 copies per training image (original + 2 augmented).
  With `--epoch-copies one` an epoch reads each image once, in its next copy: the same data per
  epoch as the blog's way. With `all` it reads all 3 copies (3x the rows).
- blog: the same network, initial top and optimiser (SGD 1e-4, momentum 0.9, batch 16) in one
  Keras 3 process with 2 threads (intra- and inter-op, oneDNN on: wf's settings), fed the
  2000 training images with real-time augmentation
  (the same policy), running the whole network forward every epoch.

Both start from the bottleneck top that `benchmarks/train_accuracy.py` trained, and report
validation accuracy on the same 800 images after the same number of epochs.
Usage: python benchmarks/finetune_speed.py [--work DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets" / "cats_vs_dogs"


def run_wf(work: str, epochs: int, epoch_copies: str) -> dict:
    from tasks.methods import TrainOptions
    from workflows.settings import ClusterSettings
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings, recipes_from_options

    runs = os.path.join(work, "speed-runs")
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(
        os.path.join(work, "runs", "cats_vs_dogs", "bottleneck"),
        os.path.join(runs, "cats_vs_dogs", "bottleneck"),
    )
    settings = TrainSettings(
        store=os.path.join(work, "store"),
        runs=runs,
        datasets=("cats_vs_dogs",),
        methods=("finetune",),
        options=TrainOptions(threads=2, epoch_copies=epoch_copies),
        cluster=ClusterSettings(num_cpus=2),
        recipes=recipes_from_options(None, None, {"finetune": epochs}, {}),
    )
    (result,) = run_train_all(settings)
    metrics = json.loads(Path(runs, "cats_vs_dogs", "finetune", "metrics.json").read_text())
    import csv

    with open(os.path.join(runs, "cats_vs_dogs", "finetune", "history.csv")) as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return {
        "status": result.status,
        "accuracy": metrics["accuracy"],
        "epoch_seconds": seconds,
        "rows_per_epoch": metrics["rows_per_epoch"],
    }


def run_blog(work: str, epochs: int) -> dict:
    import keras
    import tensorflow as tf

    from storage.runs import RunsLayout
    from tasks.augment import AugmentPolicy, augment_image
    from tasks.backbones import get_backbone
    from tasks.heads import build_top
    from tasks.images import decode_image
    from tasks.methods import METHODS
    from tasks.training.weights import set_named_weights

    blog = METHODS["finetune"].recipe

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    backbone = get_backbone("efficientnet_lite0")
    base = backbone.build((224, 224), backbone.resolve_weights("imagenet"))
    for layer in base.layers:
        tail = layer.name.startswith(("block15_", "head_"))
        layer.trainable = tail and not isinstance(layer, keras.layers.BatchNormalization)
    top = build_top(keras, (1280,), 2)
    runs = RunsLayout(os.path.join(work, "runs"))
    set_named_weights(
        top, runs.job("cats_vs_dogs", "bottleneck").read_weights("trained_weights.npz")
    )
    model = keras.Model(base.input, top(base.output["bottleneck"]))
    model.compile(
        keras.optimizers.SGD(blog.learning_rate, momentum=blog.momentum),
        "binary_crossentropy",
        metrics=["accuracy"],
    )

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for index, name in enumerate(("cats", "dogs")):
            for path in sorted((SHARED / split / name).iterdir()):
                images.append(decode_image(path.read_bytes(), (224, 224)))
                labels.append(index)
        return np.stack(images), np.array(labels, np.float32)

    x_train, y_train = load("train")
    x_val, y_val = load("validation")
    rng = np.random.default_rng(0)
    policy = AugmentPolicy()

    def augment(batch: np.ndarray) -> np.ndarray:
        return np.stack([augment_image(i, policy, int(rng.integers(2**62))) for i in batch])

    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=0)
        .batch(blog.batch_size)
        .map(
            lambda x, y: (
                tf.ensure_shape(
                    tf.cast(tf.numpy_function(augment, [x], tf.uint8), tf.float32),
                    [None, 224, 224, 3],
                ),
                y,
            )
        )
        .prefetch(2)
    )
    seconds = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    model.fit(
        train,
        epochs=epochs,
        validation_data=(x_val.astype(np.float32), y_val),
        batch_size=blog.batch_size,
        callbacks=[Timer()],
        verbose=0,
    )
    predictions = model.predict(x_val.astype(np.float32), batch_size=32, verbose=0).reshape(-1)
    accuracy = float(((predictions > 0.5) == (y_val > 0.5)).mean())
    return {"accuracy": accuracy, "epoch_seconds": seconds, "rows_per_epoch": len(x_train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "results" / "train"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from workflows.settings import tensorflow_env

    os.environ.update(tensorflow_env())  # the blog's way gets wf's TensorFlow settings too
    print("TensorFlow environment, both ways:", tensorflow_env())
    if not Path(args.work, "runs", "cats_vs_dogs", "bottleneck", "trained_weights.npz").exists():
        raise SystemExit("run benchmarks/train_accuracy.py first (it trains the bottleneck top)")
    results = {
        "wf, one copy per epoch": run_wf(args.work, args.epochs, "one"),
        "wf, all copies per epoch": run_wf(args.work, args.epochs, "all"),
        "blog's way": run_blog(args.work, args.epochs),
    }
    from machine import banner

    print(banner())
    blog = np.mean(results["blog's way"]["epoch_seconds"])
    print(f"\n{'method':<26} {'rows/epoch':>10} {'s/epoch':>8} {'vs blog':>8} {'val acc':>8}")
    for name, r in results.items():
        per_epoch = np.mean(r["epoch_seconds"])
        r["speedup"] = float(blog / per_epoch)
        print(
            f"{name:<26} {r['rows_per_epoch']:>10} {per_epoch:>8.1f} {r['speedup']:>7.1f}x "
            f"{r['accuracy']:>8.4f}"
        )
    print(
        "\nSame data per epoch (every training image once, augmented): "
        f"wf is {results['wf, one copy per epoch']['speedup']:.1f}x faster per epoch "
        "(target >= 10x at equal or better accuracy)"
    )
    with open(os.path.join(args.work, "finetune_speed.json"), "w") as handle:
        json.dump({"results": results, "epochs": args.epochs}, handle, indent=2)


if __name__ == "__main__":
    main()
