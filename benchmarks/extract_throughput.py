"""Images per second of `wf extract` against two baselines, measured in the same run.

Same images (../shared/datasets/cats_vs_dogs/train, 2000 photos), backbone (EfficientNet-Lite0,
ImageNet weights), input size (224) and taps (bottleneck + last_block_input) for all three:

- keras: the single-process Keras way, `keras.utils.image_dataset_from_directory` +
  `model.predict`, outputs kept in memory (no writing), timed from after the model is built;
- ray_data: Ray Data's documented batch-inference pattern, `ray.data.read_images` ->
  `map_batches` with a callable class on an actor pool of one (a pool of two takes both CPUs
  and starves the read tasks on a 2-core machine) -> `write_parquet`;
- wf: `run_extract` with --shards 8 --augment 0 into a new store, end to end (discovery and
  content hashing, Ray start-up, extraction, manifest), after one warm-up run that fills the
  converted-backbone cache. "extract only" counts from the first task submitted.

Each method runs in a fresh subprocess, so peak memory (max RSS) is its own, and each with
``TF_ENABLE_ONEDNN_OPTS=1``, as wf runs its own workers: no baseline is handicapped. Keras runs
``--keras-runs`` times (default 3) and its fastest run is the baseline: on a Zen 4 machine it
took either 41 s or 27 s, run to run.
Usage: python benchmarks/extract_throughput.py [--images DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "datasets" / "cats_vs_dogs" / "train"
SIZE = (224, 224)
TAPS = ("bottleneck", "last_block_input")


def _model():
    from tasks.backbones import feature_model, get_backbone

    backbone = get_backbone("efficientnet_lite0")
    return feature_model(backbone.build(SIZE, backbone.resolve_weights("imagenet")), TAPS)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_keras(images: str, _work: str) -> dict:
    import keras

    model = _model()  # built before the timer: wf's own cache of converted backbones is warm
    started = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        images, labels="inferred", image_size=SIZE, batch_size=32, shuffle=False, verbose=False
    )
    count = 0
    for batch, _ in dataset:
        out = model.predict_on_batch(batch)
        count += len(out["bottleneck"])
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "peak_rss_mib": _rss_mib()}


def run_ray_data(images: str, work: str) -> dict:
    import numpy as np
    import ray

    class Extract:
        def __init__(self) -> None:
            self.model = _model()

        def __call__(self, batch: dict) -> dict:
            out = self.model.predict_on_batch(batch["image"].astype("float32"))
            return {
                "bottleneck": list(np.asarray(out["bottleneck"], np.float16)),
                "last_block_input": list(
                    np.asarray(out["last_block_input"], np.float16).reshape(len(batch["image"]), -1)
                ),
                "rss": [_rss_mib()] * len(batch["image"]),
            }

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    dataset = ray.data.read_images(images, size=SIZE, mode="RGB", include_paths=False)
    dataset = dataset.map_batches(
        Extract, batch_size=32, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )  # fmt: skip
    dataset.write_parquet(os.path.join(work, "ray_data"))
    seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(work, "ray_data"), columns=["rss"])
    ray.shutdown()
    return {
        "images": table.num_rows,
        "seconds": seconds,
        "peak_rss_mib": max(table["rss"].to_pylist()),
    }


def run_wf(images: str, work: str, runtime: str = "litert") -> dict:
    """`wf extract` as a user runs it (the CLI, in its own process, --json), after a warm-up
    run in this process has filled the converted-backbone cache. Timed from just before the
    command starts; its report says when the first shard task began and where the workers'
    seconds went."""
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings

    cache = os.path.join(work, "cache")
    run_extract(ExtractSettings(
        datasets=(DatasetSource(images, name="warmup"),), store=os.path.join(work, "warmup"),
        shards=1, augment=0, runtime=runtime, cache_dir=cache, cluster=ClusterSettings(num_cpus=2),
    ))  # fmt: skip
    command = [sys.executable, "-m", "workflows.cli", "extract", images, "--store",
               os.path.join(work, "store"), "--shards", "8", "--augment", "0", "--runtime",
               runtime, "--cache-dir", cache, "--num-cpus", "2", "--json"]  # fmt: skip
    started_at = time.time()
    # In this checkout's folder: `python -m` puts the working folder first on sys.path, so a
    # benchmark of another checkout (`git worktree`) run from here would time this one's wf.
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=HERE.parent)
    seconds = time.time() - started_at
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    (report,) = json.loads(done.stdout)
    return {
        "images": report["images"],
        "seconds": seconds,
        "extract_seconds": report["seconds"],
        "peak_rss_mib": report["peak_worker_rss_mib"],
        "rejects": report["rejects"],
        "stages": report["stages"],
        "task_seconds": report["task_seconds"],
        "commit_seconds": report["commit_seconds"],
        "start_up": report["first_shard_at"] - started_at,
        "extract_started": report["extract_started_at"] - started_at,
    }


def run_wf_int8(images: str, work: str) -> dict:
    return run_wf(images, work, "litert-int8")


def runtime_alone(images: str, work: str) -> dict:
    """Milliseconds per image of the backbone runtime alone (float32 and int8 LiteRT), one
    thread, one image at a time (as the workers run it), on 200 decoded photos: the compute
    limit of a worker, measured in the same run."""
    import numpy as np

    from tasks.backbones import get_backbone
    from tasks.backbones.runtime import FeatureExtractor, prepare_backbone
    from tasks.images import decode_image

    paths = sorted(Path(images).rglob("*.jpg"))[:300]
    pixels = np.stack([decode_image(p.read_bytes(), SIZE) for p in paths])
    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.resolve_weights("imagenet")
    out = {}
    for runtime in ("litert", "litert-int8"):
        calibration = pixels[:100] if runtime == "litert-int8" else None
        prepared = prepare_backbone(backbone, weights, SIZE, TAPS, runtime,
                                    os.path.join(work, "cache"), calibration)  # fmt: skip
        extract = FeatureExtractor(prepared, threads=1)
        extract(pixels[:8])  # warm up
        started = time.perf_counter()
        extract(pixels[100:])
        out[f"{runtime}_ms"] = (time.perf_counter() - started) * 1000 / len(pixels[100:])
    started = time.perf_counter()
    for path in paths[:200]:
        decode_image(path.read_bytes(), SIZE)
    out["decode_ms"] = (time.perf_counter() - started) * 1000 / 200
    return {**out, "images": 200, "seconds": 1.0, "peak_rss_mib": _rss_mib()}


METHODS = {"keras": run_keras, "ray_data": run_ray_data, "wf": run_wf, "wf_int8": run_wf_int8,
           "runtime_alone": runtime_alone}  # fmt: skip


def _ratio(rate: float, base_rate: float) -> str:
    """``rate`` against Keras's, or "-" where Keras was not among the methods run."""
    return "-" if math.isnan(base_rate) else f"{rate / base_rate:.2f}x"


def print_table(results: dict) -> None:
    baseline = results.get("keras", {})
    base_rate = baseline["images"] / baseline["seconds"] if "seconds" in baseline else float("nan")
    header = ("method", "images", "seconds", "img/s", "vs keras", "peak RSS/worker")
    print("\n{:<16} {:>7} {:>8} {:>7} {:>9} {:>16}".format(*header))
    for method, r in results.items():
        if method in ("machine", "runtime_alone"):
            continue
        if "error" in r:
            print(f"{method:<16} failed: {r['error']}")
            continue
        rate = r["images"] / r["seconds"]
        print(
            f"{method:<16} {r['images']:>7} {r['seconds']:>8.1f} {rate:>7.1f} "
            f"{_ratio(rate, base_rate):>9} {r['peak_rss_mib']:>12.0f} MiB"
        )
        if "extract_seconds" in r:
            rate = r["images"] / r["extract_seconds"]
            print(
                f"{'  extract only':<16} {r['images']:>7} {r['extract_seconds']:>8.1f} "
                f"{rate:>7.1f} {_ratio(rate, base_rate):>9}"
            )


def print_breakdown(method: str, r: dict, runtime_ms: float, slots: int = 2) -> None:
    """Where ``slots`` x the command's wall time went, and the gap to the compute limit."""
    wall, phase = r["seconds"], r["extract_seconds"]
    first = r["start_up"]
    # The extraction phase: from the cluster being up (tasks submitted) to the last commit.
    end = r["extract_started"] + phase
    idle_in_phase = slots * (end - first) - r["task_seconds"]
    parts = [("start-up: command start to first shard running (x slots)", slots * first)]
    parts += [(f"shard stage: {stage}", seconds) for stage, seconds in r["stages"].items()]
    in_tasks = r["task_seconds"] - sum(r["stages"].values())
    parts += [("shard tasks, outside the stages above", in_tasks),
              ("workers idle while shards ran (tail, scheduling)", idle_in_phase),
              ("after the last shard: compaction, exit (x slots)", slots * (wall - end)),
              ]  # fmt: skip
    total = slots * wall
    print(f"\n{method}: where {slots} slots x {wall:.1f} s = {total:.1f} slot-seconds went")
    print(f"{'':<56} {'seconds':>8} {'share':>6}")
    for name, seconds in parts:
        print(f"{name:<56} {seconds:>8.2f} {seconds / total:>6.1%}")
    print(f"{'(driver, beside the slots) committing shards':<56} {r['commit_seconds']:>8.2f}")
    limit = slots * 1000 / runtime_ms
    steady = r["images"] / (end - first)
    print(
        f"compute limit ({slots} slots at {runtime_ms:.2f} ms an image, the runtime alone): "
        f"{limit:.1f} img/s; steady state (first shard to last commit) {steady:.1f} img/s "
        f"({steady / limit:.0%}, target 85%); end to end {r['images'] / wall:.1f} img/s "
        f"({r['images'] / wall / limit:.0%}, target 70%); start-up {first:.1f} s (target 5 s); "
        f"unexplained (task time outside every stage) {in_tasks / total:.1%} (target < 5%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--methods", default="keras,ray_data,wf,wf_int8,runtime_alone")
    parser.add_argument("--out", default=str(HERE / "results" / "extract_throughput.json"))
    parser.add_argument(
        "--keras-runs",
        type=int,
        default=3,
        help="runs of the Keras way; its fastest is the baseline (it has two "
        "speeds on some machines, docs/benchmarks.md 2026-12-04 (b))",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(METHODS[args.one](args.images, work)))
        return
    if not os.path.isdir(args.images):
        sys.exit(f"no images at {args.images}: pass --images DIR (one folder per class)")
    # Every method gets what wf gives itself: oneDNN on (TensorFlow leaves it off on these AMD
    # CPUs unless asked), TensorFlow's default threads (all cores) for the single-process ones.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(HERE.parent),
           "TF_ENABLE_ONEDNN_OPTS": "1"}  # fmt: skip
    results = {}
    for method in args.methods.split(","):
        runs = []
        for _ in range(max(1, args.keras_runs) if method == "keras" else 1):
            print(f"running {method} ...", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, __file__, "--one", method, "--images", args.images],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                runs = [{"error": done.stderr.strip().splitlines()[-1]}]
                break
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        # The fastest run is the baseline: a ratio against a slow run of Keras is no result.
        results[method] = min(runs, key=lambda r: r.get("seconds", math.inf))
        if len(runs) > 1:
            results[method]["runs_seconds"] = [round(r["seconds"], 2) for r in runs]
    from machine import banner, describe

    print(banner())
    print_table(results)
    if "runs_seconds" in results.get("keras", {}):
        seconds = ", ".join(f"{t:.1f}" for t in results["keras"]["runs_seconds"])
        print(
            f"keras: {len(results['keras']['runs_seconds'])} runs ({seconds} s); the fastest "
            "is the baseline"
        )
    alone = results.get("runtime_alone", {})
    if "litert_ms" in alone:
        print(f"\nruntime alone, one thread, batch 1: float32 {alone['litert_ms']:.2f} ms, "
              f"int8 {alone['litert-int8_ms']:.2f} ms per image; "
              f"decoding {alone['decode_ms']:.2f} ms")  # fmt: skip
        for method, runtime in (("wf", "litert"), ("wf_int8", "litert-int8")):
            if "seconds" in results.get(method, {}):
                limit = 2 * 1000 / alone[f"{runtime}_ms"]  # two one-thread workers
                rate = results[method]["images"] / results[method]["seconds"]
                only = results[method]["images"] / results[method]["extract_seconds"]
                print(
                    f"{method}: compute limit {limit:.1f} img/s; end to end {rate:.1f} "
                    f"({rate / limit:.0%}), extraction only {only:.1f} ({only / limit:.0%})"
                )
        for method, runtime in (("wf", "litert"), ("wf_int8", "litert-int8")):
            if "stages" in results.get(method, {}):
                print_breakdown(method, results[method], alone[f"{runtime}_ms"])
        if "seconds" in results.get("wf_int8", {}) and "seconds" in results.get("wf", {}):
            speedup = results["wf"]["seconds"] / results["wf_int8"]["seconds"]
            print(f"litert-int8 end to end: {speedup:.2f}x float32 (target >= 1.8x)")
    results["machine"] = describe()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwritten to {args.out}; target: wf >= 2x keras")


if __name__ == "__main__":
    main()
