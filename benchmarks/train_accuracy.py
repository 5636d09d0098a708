"""Validation accuracy of the three methods on real photos, beside the Keras blog's numbers.

Extracts ../shared/datasets/cats_vs_dogs (the blog's exact 2000/800 split) and
../shared/datasets/flowers (5 classes) with the default offline backbone (EfficientNet-Lite0,
ImageNet weights; --backbone picks another) and --augment 2, then trains both datasets in one
`train-all` run. With `fusion` among --methods it also extracts --fusion-backbones into the same
store (one store per backbone, as `wf extract --backbone ...` does) and reports `fusion` beside
`bottleneck`.
The blog's cats-vs-dogs references: scratch 0.80, bottleneck 0.90, finetune 0.94 (VGG16).
Targets here: bottleneck and finetune >= 0.98 on cats_vs_dogs; finetune >= 0.92 on flowers.

Usage: python benchmarks/train_accuracy.py [--work DIR] [--bottleneck-epochs N] ...
Re-running reuses the stores (unchanged shards are skipped); --force retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"


def main() -> None:
    from workflows.train.settings import EPOCH_COPIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "results" / "train"))
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers")
    parser.add_argument("--methods", default="bottleneck,finetune,scratch")
    parser.add_argument("--fusion-backbones", default="efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--fusion-epochs", type=int, default=30)
    parser.add_argument("--bottleneck-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="SGD, momentum 0.9")
    parser.add_argument(
        "--epoch-copies", choices=EPOCH_COPIES, default="all", help="see wf train-all --help"
    )
    parser.add_argument("--scratch-epochs", type=int, default=20)
    parser.add_argument("--augment", type=int, default=2)
    parser.add_argument(
        "--backbone", default=None, help="see `wf backbones` [default: efficientnet_lite0]"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="backbone input size [default: its own]"
    )
    parser.add_argument(
        "--runtime", default=None, help="backbone runtime for extraction (see wf extract --help)"
    )
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--keep-best", action="store_true", help="keep each job's best epoch")
    args = parser.parse_args()

    from tasks.methods import TrainOptions
    from workflows.cluster import ray_cluster
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings, recipes_from_options
    from workflows.train.summary import BLOG_REFERENCE

    names = args.datasets.split(",")
    for name in names:
        if not (SHARED / name).is_dir():
            raise SystemExit(f"{SHARED / name} is missing")
    cluster = ClusterSettings(num_cpus=2)
    recipes = recipes_from_options(
        None,
        None,
        {"bottleneck": args.bottleneck_epochs, "finetune": args.finetune_epochs,
         "scratch": args.scratch_epochs, "fusion": args.fusion_epochs},
        {"finetune": args.finetune_lr},
    )  # fmt: skip
    methods = tuple(args.methods.split(","))
    backbones = [args.backbone or "efficientnet_lite0"]
    if "fusion" in methods:
        backbones += [b for b in args.fusion_backbones.split(",") if b and b not in backbones]
    store = os.path.join(args.work, "store")
    timings = {}
    with ray_cluster(cluster):
        started = time.perf_counter()
        reports = []
        for backbone in backbones:
            reports += run_extract(
                ExtractSettings(
                    datasets=tuple(DatasetSource(str(SHARED / n)) for n in names),
                    store=store,
                    shards=8,
                    augment=args.augment,
                    input_size=args.image_size if backbone == backbones[0] else None,
                    backbone=backbone,
                    cluster=cluster,
                    **({"runtime": args.runtime} if args.runtime else {}),
                )
            )
        timings["extract_seconds"] = round(time.perf_counter() - started, 1)
        for report in reports:
            print(
                f"extracted {report.dataset}/{report.backbone}: {report.images} images, "
                f"{report.rows} rows, "
                f"{report.rejects} rejects, {report.shards_skipped} shards skipped"
            )
        started = time.perf_counter()
        results = run_train_all(
            TrainSettings(
                store=store,
                runs=os.path.join(args.work, "runs"),
                datasets=tuple(names),
                methods=methods,
                recipes=recipes,
                force=args.force,
                options=TrainOptions(keep_best=args.keep_best, epoch_copies=args.epoch_copies),
                backbone=backbones[0],
                cluster=cluster,
            )
        )
        timings["train_seconds"] = round(time.perf_counter() - started, 1)
    from machine import banner

    print(banner())
    header = ("dataset", "method", "val acc", "blog", "epochs", "s/epoch")
    print("\n{:<14} {:<11} {:>8} {:>6} {:>7} {:>8}  status".format(*header))
    rows = []
    for r in results:
        blog = BLOG_REFERENCE.get(r.method) if r.dataset == "cats_vs_dogs" else None
        accuracy = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        per_epoch = f"{r.seconds_per_epoch:.2f}" if r.seconds_per_epoch else "-"
        print(
            f"{r.dataset:<14} {r.method:<11} {accuracy:>8} {blog or '':>6} {r.epochs:>7} "
            f"{per_epoch:>8}  {r.status} {r.error}"
        )
        rows.append({**r.__dict__, "blog": blog})
    from machine import describe

    print(f"\nextract {timings['extract_seconds']} s, train-all {timings['train_seconds']} s")
    with open(os.path.join(args.work, "train_accuracy.json"), "w") as handle:
        json.dump(
            {"results": rows, "timings": timings, "args": vars(args), "machine": describe()},
            handle,
            indent=2,
        )


if __name__ == "__main__":
    main()
