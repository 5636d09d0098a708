"""Extraction at scale: memory flat in the image count, commits flat in the shard count.

1. `wf extract` of 2,000 and of 20,000 generated images (three classes of shapes, 96 px JPEG,
   --augment 0, Lite0 at 96 px, --shards 8 and 80), each in a fresh process on a local cluster
   of 2 CPUs, after a warm-up run has converted the backbone into the cache: peak memory of the
   driver and of each worker process, and the peak of Ray's object store (sampled every
   second), at both sizes.
2. The cost of committing a shard: 2,000 images with --shards 10 and with --shards 1000 (two
   splits, so 20 and 2,000 commits): seconds and bytes per commit. Beside it, what the old
   design (rewriting the whole manifest after every shard) would have written, computed from
   the final manifest's size.

Usage: python benchmarks/extract_scale.py [--work DIR] [--sizes 2000,20000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(root: Path, images: int) -> Path:
    from workflows.cli.demo import SHAPES, generate_shapes_dataset

    folder, done = root / f"shapes-{images}", root / f"shapes-{images}.done"
    if not done.exists():
        generate_shapes_dataset(str(folder), -(-images // len(SHAPES)), size=96, seed=images)
        done.write_text("")
    return folder


def run_one(data: str, store: str, shards: int, cache: str) -> dict:
    """One extraction in this process (called with --one): the report and memory facts."""
    from workflows.cluster import ray_cluster
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.settings import ClusterSettings

    cluster = ClusterSettings(num_cpus=2)
    settings = ExtractSettings(
        datasets=(DatasetSource(data, name="shapes"),), store=store, shards=shards, augment=0,
        input_size=96, validation_fraction=0.1, cache_dir=cache, cluster=cluster,
    )  # fmt: skip
    peak_store = [0.0]
    stop = threading.Event()

    def sample() -> None:
        from ray._private.internal_api import memory_summary

        while not stop.wait(1.0):
            try:
                text = memory_summary(stats_only=True)
            except Exception:
                continue
            match = re.search(r"Plasma memory usage (\d+) MiB", text)
            if match:
                peak_store[0] = max(peak_store[0], float(match.group(1)))

    with ray_cluster(cluster):
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        started = time.perf_counter()
        (report,) = run_extract(settings)
        seconds = time.perf_counter() - started
        stop.set()
        thread.join()
    manifest = json.loads(Path(store, "shapes", "efficientnet_lite0", "manifest.json").read_text())
    workers: dict[str, float] = {}
    for record in manifest["shards"].values():
        workers[record["worker"]] = max(workers.get(record["worker"], 0.0), record["peak_rss_mib"])
    return {
        "images": report.images,
        "shards": len(manifest["shards"]),
        "seconds": round(seconds, 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mib": sorted(workers.values()),
        "object_store_peak_mib": peak_store[0],
        "commits": report.commits,
        "commit_seconds": report.commit_seconds,
        "commit_bytes": report.commit_bytes,
        "manifest_bytes": Path(store, "shapes", "efficientnet_lite0", "manifest.json")
        .stat()
        .st_size,
    }


def old_design_bytes(commits: int, manifest_bytes: int) -> int:
    """Bytes the old design wrote: after shard k, the whole manifest with k records."""
    header = 2_000  # the manifest without shard records (measured: about 2 KB)
    per_record = (manifest_bytes - header) / max(commits, 1)
    return int(commits * header + per_record * commits * (commits + 1) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "results" / "scale"))
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        data, store, shards, cache = args.one
        print(json.dumps(run_one(data, store, int(shards), cache)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def extract(images: int, shards: int, name: str) -> dict:
        data = generate(work, images)
        store = work / name
        subprocess.run(["rm", "-rf", str(store)], check=True)
        command = [sys.executable, __file__, "--one", str(data), str(store), str(shards),
                   str(work / "cache")]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    from machine import banner, describe

    results: dict[str, dict] = {}
    extract(60, 1, "store-warmup")  # converts the backbone once: later drivers only load it
    for size in map(int, args.sizes.split(",")):
        results[f"memory-{size}"] = extract(size, max(8, size // 250), f"store-{size}")
    results["commits-10"] = extract(2000, 10, "store-shards-10")
    results["commits-1000"] = extract(2000, 1000, "store-shards-1000")
    print(banner())
    print(f"\n{'images':>7} {'shards':>6} {'seconds':>8} {'driver MiB':>10} "
          f"{'worker MiB (each)':>22} {'object store MiB':>16}")  # fmt: skip
    for name, r in results.items():
        if name.startswith("memory"):
            workers = ", ".join(f"{w:.0f}" for w in r["worker_peak_rss_mib"])
            print(f"{r['images']:>7} {r['shards']:>6} {r['seconds']:>8} "
                  f"{r['driver_peak_rss_mib']:>10} {workers:>22} "
                  f"{r['object_store_peak_mib']:>16}")  # fmt: skip
    print(f"\n{'shards':>6} {'commits':>7} {'s/commit':>9} {'bytes/commit':>12} {'manifest':>9} "
          f"{'old design, bytes written':>26}")  # fmt: skip
    for name, r in results.items():
        if name.startswith("commits"):
            per = r["commit_seconds"] / max(r["commits"], 1)
            size = r["commit_bytes"] / max(r["commits"], 1)
            old = old_design_bytes(r["commits"], r["manifest_bytes"])
            print(f"{r['shards']:>6} {r['commits']:>7} {per:>9.4f} {size:>12.0f} "
                  f"{r['manifest_bytes']:>9} {old:>26,}")  # fmt: skip
    results["machine"] = describe()
    (work / "extract_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
