"""The extraction pipeline: datasets in, one Parquet feature store per dataset out.

discover -> plan shards (stable by hash of the relative path) -> one Ray task per shard
(decode, augment, backbone) -> record each finished shard in the manifest.

A shard whose input fingerprint (its images, their labels and every feature setting) matches
the manifest's record, and whose file is still there, is skipped. A change of any setting that
alters features starts a new store at the same place: the manifest is reset first, so old and
new rows never mix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from storage.errors import DatasetError
from storage.hashing import fingerprint, stable_bucket
from storage.layout import StoreLayout, write_atomically, write_bytes_atomically
from storage.manifest import (
    FORMAT_VERSION,
    Manifest,
    ShardRecord,
    TapRecord,
    now_iso,
    read_manifest,
    shard_key,
    write_manifest,
)
from tasks.backbones import get_backbone, resolve_weights
from tasks.backbones.runtime import PreparedBackbone, prepare_backbone
from tasks.extract_shard import (
    ImageItem,
    ProgressCounter,
    ShardJob,
    ShardResult,
    extract_shard_task,
)
from workflows import __version__
from workflows.cluster import ray_cluster
from workflows.datasets import DatasetSpec, discover_dataset, expand_dataset_paths
from workflows.settings import DatasetSource, ExtractSettings

_SHARD_SALT = "wf-shard"


@dataclass(frozen=True)
class DatasetReport:
    """What one extraction run did to one dataset's store."""

    dataset: str
    backbone: str
    images: int
    rejects: int
    rows: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    seconds: float
    store_bytes: int
    peak_worker_rss_mib: float
    manifest_path: str
    warnings: tuple[str, ...]
    failures: tuple[str, ...]

    @property
    def images_per_second(self) -> float:
        """Source images (not augmented rows) extracted per second of this run."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _DatasetPlan:
    spec: DatasetSpec
    manifest: Manifest
    jobs: list[ShardJob]
    fingerprints: dict[str, str]
    skipped: int
    reset: bool


def plan_shards(items: tuple[ImageItem, ...], num_shards: int) -> list[tuple[ImageItem, ...]]:
    """Split ``items`` into ``num_shards`` by a stable hash of each relative path: adding
    images never moves an existing one to another shard."""
    shards: list[list[ImageItem]] = [[] for _ in range(num_shards)]
    for item in items:
        shards[stable_bucket(item.relative_path, num_shards, _SHARD_SALT)].append(item)
    return [tuple(shard) for shard in shards]


def feature_fingerprint(settings: ExtractSettings, prepared: PreparedBackbone) -> str:
    """Every setting that changes the numbers in a store."""
    return fingerprint(
        [
            FORMAT_VERSION,
            prepared.backbone,
            prepared.weights.sha256,
            list(prepared.input_size),
            sorted(prepared.taps),
            prepared.runtime,
            settings.dtype,
            settings.augment,
            settings.policy.to_dict(),
            settings.seed,
        ]
    )


def discover_all(settings: ExtractSettings) -> list[DatasetSpec]:
    sources: list[DatasetSource] = []
    for source in settings.datasets:
        paths = expand_dataset_paths([source.path])
        if source.name and len(paths) > 1:
            raise DatasetError(f"{source.path} holds several datasets; a name fits only one")
        sources.extend(DatasetSource(p, source.name, source.validation_fraction) for p in paths)
    specs = [
        discover_dataset(
            s.path,
            settings.validation_fraction
            if s.validation_fraction is None
            else s.validation_fraction,
            s.name,
        )
        for s in sources
    ]
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"several datasets are named {', '.join(duplicates)}; name them apart")
    return specs


def _plan_dataset(
    spec: DatasetSpec, settings: ExtractSettings, prepared: PreparedBackbone, layout: StoreLayout
) -> _DatasetPlan:
    features = feature_fingerprint(settings, prepared)
    manifest_path = layout.manifest_path(spec.name, prepared.backbone)
    existing = read_manifest(layout.filesystem, manifest_path)
    fresh = Manifest(
        dataset=spec.name,
        dataset_root=spec.root,
        dataset_fingerprint=spec.fingerprint,
        classes=spec.classes,
        backbone=prepared.backbone,
        weights_source=prepared.weights.source,
        weights_sha256=prepared.weights.sha256,
        input_size=prepared.input_size,
        runtime=prepared.runtime,
        augment_copies=settings.augment,
        augment_policy=settings.policy.to_dict(),
        seed=settings.seed,
        taps={tap: TapRecord(shape, settings.dtype) for tap, shape in prepared.taps.items()},
        feature_fingerprint=features,
        num_shards=settings.shards,
        split_sizes={split: len(items) for split, items in spec.images.items()},
        wf_version=__version__,
        created_at=now_iso(),
        updated_at=now_iso(),
    )
    reset = existing is None or (
        existing.feature_fingerprint != features
        or existing.num_shards != settings.shards
        or existing.classes != spec.classes
    )
    if reset:
        manifest = fresh
        write_manifest(layout.filesystem, manifest_path, manifest)  # old shards stop counting
        for path in layout.part_files(spec.name, prepared.backbone):
            layout.delete(path)
    else:
        assert existing is not None
        manifest = replace(
            fresh,
            created_at=existing.created_at,
            shards={k: r for k, r in existing.shards.items() if r.split in spec.images},
        )
    jobs, fingerprints, skipped = [], {}, 0
    for split, items in spec.images.items():
        for index, shard_items in enumerate(plan_shards(items, settings.shards)):
            key = shard_key(split, index)
            shard_fingerprint = fingerprint(
                [
                    features,
                    list(spec.classes),
                    settings.max_pixels,
                    [[i.relative_path, i.image_id, i.label] for i in shard_items],
                ]
            )
            fingerprints[key] = shard_fingerprint
            record = manifest.shards.get(key)
            if (
                record is not None
                and record.input_fingerprint == shard_fingerprint
                and layout.size(layout.absolute(record.file)) == record.size_bytes
            ):
                skipped += 1
                continue
            jobs.append(
                ShardJob(
                    dataset=spec.name,
                    split=split,
                    shard=index,
                    num_shards=settings.shards,
                    items=shard_items,
                    store=settings.store,
                    output_path=layout.part_path(
                        spec.name, prepared.backbone, split, index, settings.shards
                    ),
                    classes=spec.classes,
                    augment_copies=settings.augment,
                    policy=settings.policy,
                    seed=settings.seed,
                    dtype=settings.dtype,
                    batch_size=settings.batch_size,
                    max_pixels=settings.max_pixels,
                    threads=settings.threads_per_task,
                )
            )
    # Shards about to be redone, and shards that no longer exist, stop counting before any
    # file is replaced, so a reader never pairs a record with another run's file.
    redo = {shard_key(job.split, job.shard) for job in jobs}
    manifest = replace(
        manifest,
        shards={k: r for k, r in manifest.shards.items() if k in fingerprints and k not in redo},
    )
    write_manifest(layout.filesystem, manifest_path, manifest)
    return _DatasetPlan(spec, manifest, jobs, fingerprints, skipped, reset)


ProgressHook = Callable[[dict[str, tuple[int, int, int]]], None]


def run_extract(
    settings: ExtractSettings, on_progress: ProgressHook | None = None
) -> list[DatasetReport]:
    """Extract every dataset of ``settings`` into its feature store; returns one report each.

    ``on_progress`` is called about twice a second with ``{dataset: (images done, images
    planned, rejects)}``. A shard task that fails is reported in its dataset's report, and the
    other shards go on.
    """
    specs = discover_all(settings)
    backbone = get_backbone(settings.backbone)
    weights = resolve_weights(backbone, settings.weights)
    prepared = prepare_backbone(
        backbone, weights, settings.image_size, settings.selected_taps, settings.runtime,
        settings.cache_dir,
    )  # fmt: skip
    layout = StoreLayout.at(settings.store)
    plans = {spec.name: _plan_dataset(spec, settings, prepared, layout) for spec in specs}
    planned = {n: sum(len(j.items) for j in p.jobs) for n, p in plans.items()}
    started = time.perf_counter()  # reset once the cluster is up: rates count extraction only
    done_counts = {name: 0 for name in plans}
    done_images = {name: 0 for name in plans}
    peak_rss = {name: 0.0 for name in plans}
    failures: dict[str, list[str]] = {name: [] for name in plans}
    finished_at: dict[str, float] = {}

    if any(plan.jobs for plan in plans.values()):
        with ray_cluster(settings.cluster):
            started = time.perf_counter()
            prepared_ref = ray.put(prepared)
            counter = ProgressCounter.remote()
            pending = {}
            for plan in plans.values():
                for job in plan.jobs:
                    ref = extract_shard_task.options(num_cpus=settings.threads_per_task).remote(
                        job, prepared_ref, counter
                    )
                    pending[ref] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    job = pending.pop(ref)
                    plan = plans[job.dataset]
                    try:
                        result: ShardResult = ray.get(ref)
                    except Exception as error:
                        reason = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                        failures[job.dataset].append(
                            f"{job.split} shard {job.shard}: {type(error).__name__}: {reason}"
                        )
                        continue
                    _record_shard(layout, plan, result)
                    done_counts[job.dataset] += 1
                    done_images[job.dataset] += result.images
                    peak_rss[job.dataset] = max(peak_rss[job.dataset], result.peak_rss_mib)
                    if not any(j.dataset == job.dataset for j in pending.values()):
                        finished_at[job.dataset] = time.perf_counter()
                if on_progress is not None:
                    totals = ray.get(counter.totals.remote())
                    on_progress(
                        {
                            n: (totals.get(n, [0, 0])[0], planned[n], totals.get(n, [0, 0])[1])
                            for n in plans
                        }
                    )
    reports = []
    for name, plan in plans.items():
        seconds = finished_at.get(name, time.perf_counter()) - started
        manifest = replace(
            plan.manifest, timings={"seconds": round(seconds, 3)}, updated_at=now_iso()
        )
        write_manifest(layout.filesystem, layout.manifest_path(name, prepared.backbone), manifest)
        _write_rejects(layout, manifest)
        records = manifest.shards.values()
        reports.append(
            DatasetReport(
                dataset=name,
                backbone=prepared.backbone,
                images=done_images[name],
                rejects=len(manifest.rejects),
                rows=sum(r.rows for r in records),
                shards_done=done_counts[name],
                shards_skipped=plan.skipped,
                shards_failed=len(failures[name]),
                seconds=seconds,
                store_bytes=sum(r.size_bytes for r in records),
                peak_worker_rss_mib=round(peak_rss[name], 1),
                manifest_path=layout.manifest_path(name, prepared.backbone),
                warnings=plan.spec.warnings,
                failures=tuple(failures[name]),
            )
        )
    _write_run_log(layout, settings, reports)
    return reports


def _record_shard(layout: StoreLayout, plan: _DatasetPlan, result: ShardResult) -> None:
    """Make a finished shard count: add it to the manifest and write the manifest atomically."""
    key = shard_key(result.split, result.shard)
    record = ShardRecord(
        split=result.split,
        shard=result.shard,
        num_shards=plan.manifest.num_shards,
        file=layout.relative(result.path),
        input_fingerprint=plan.fingerprints[key],
        images=result.images,
        rows=result.rows,
        rejects=result.rejects,
        sha256=result.sha256,
        size_bytes=result.size_bytes,
        seconds=round(result.seconds, 3),
        worker=result.worker,
    )
    plan.manifest = replace(
        plan.manifest, shards={**plan.manifest.shards, key: record}, updated_at=now_iso()
    )
    write_manifest(
        layout.filesystem,
        layout.manifest_path(plan.manifest.dataset, plan.manifest.backbone),
        plan.manifest,
    )


REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def _write_rejects(layout: StoreLayout, manifest: Manifest) -> None:
    rejects = manifest.rejects
    table = pa.Table.from_pylist(
        [
            {"path": r.path, "split": r.split, "reason": r.reason, "detail": r.detail}
            for r in rejects
        ],
        schema=REJECTS_SCHEMA,
    )
    write_atomically(
        layout.filesystem,
        layout.rejects_path(manifest.dataset, manifest.backbone),
        lambda stream: pq.write_table(table, stream),
    )


def _write_run_log(
    layout: StoreLayout, settings: ExtractSettings, reports: list[DatasetReport]
) -> None:
    """One JSON-lines log per run under ``<store>/_logs/`` (Parquet readers skip ``_`` names)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    lines = [
        json.dumps({"event": "extract", "at": now_iso(), "backbone": settings.backbone,
                    "shards": settings.shards, "augment": settings.augment,
                    "runtime": settings.runtime, "datasets": len(reports)})
    ] + [json.dumps({"event": "dataset", **report.__dict__, "warnings": list(report.warnings),
                     "failures": list(report.failures)}) for report in reports]  # fmt: skip
    path = layout.absolute(f"_logs/extract-{stamp}-{time.time_ns() % 10**6:06d}.jsonl")
    write_bytes_atomically(layout.filesystem, path, ("\n".join(lines) + "\n").encode())
