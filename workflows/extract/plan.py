"""Planning an extraction: which shards of which dataset need computing, and a clean store to
compute them into.

Shards are planned by a stable hash of each image's relative path, so adding images never moves
an existing one. A shard whose input fingerprint (its images' paths, sizes and times, their
labels and every feature setting) matches its committed record, and whose file is still there
at its recorded size, is skipped. A change of any setting that alters features, of the shard
count or of the classes starts the store afresh. Planning runs under the store's lease, so it
may delete what no manifest names: parts of killed or superseded runs, stale commit records and
temporary files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from storage.filesystem import (
    list_files,
)
from storage.hashing import fingerprint, fingerprint_fields, fingerprint_with_rows
from storage.layout import StoreLayout, new_attempt
from storage.manifest import (
    FORMAT_VERSION,
    Manifest,
    TapRecord,
    now_iso,
    read_manifest,
    remove_unreferenced,
    shard_key,
    write_manifest,
)
from tasks.backbones.runtime import PreparedBackbone
from tasks.extract_shard import Images, ShardJob
from workflows import __version__
from workflows.datasets import DatasetSpec, shard_numbers
from workflows.extract.settings import NOT_FEATURE_SETTINGS, ExtractSettings
from workflows.planned import PlannedImages


@dataclass
class DatasetPlan:
    """What a dataset's run computes. It keeps the spec's warnings and its planned shards on the
    driver's disk (``planned``), which the jobs' items refer to until each is submitted: no
    image list is held in memory, and at millions of images each was gigabytes."""

    warnings: tuple[str, ...]
    manifest: Manifest
    jobs: list[ShardJob]
    fingerprints: dict[str, str]
    skipped: int
    reset: bool
    planned: PlannedImages | None = None


def plan_shards(items: Images, num_shards: int) -> list[Images]:
    """Split ``items`` into ``num_shards`` by a stable hash of each relative path: adding
    images never moves an existing one to another shard. Each keeps the order of ``items``.
    Planning cuts the shards as it lists (:func:`workflows.datasets.discover_dataset`); this is
    the same cut of a list in memory."""
    buckets = shard_numbers(items.relative_paths(), len(items), num_shards)
    order = np.argsort(buckets, kind="stable")
    bounds = np.cumsum(np.bincount(buckets, minlength=num_shards))
    return [
        items.take(order[start:end]) for start, end in zip([0, *bounds[:-1]], bounds, strict=True)
    ]


def release_freed_memory() -> None:
    """Give the OS back what Arrow's allocator keeps of the listing and the image lists once
    the shards are cut: mimalloc holds freed pages for later use, and the driver holds the plan
    for the whole run (200,000 images: 68 MiB held after planning without this, 26 MiB with
    it; ``benchmarks/planning_memory.py``)."""
    pa.default_memory_pool().release_unused()


def feature_fingerprint(settings: ExtractSettings, prepared: PreparedBackbone) -> str:
    """Every setting that changes the numbers in a store: all the settings' fields but those
    named in :data:`NOT_FEATURE_SETTINGS`, and the backbone as resolved."""
    return fingerprint(
        [
            FORMAT_VERSION,
            fingerprint_fields(settings, NOT_FEATURE_SETTINGS),
            prepared.weights.sha256,
            list(prepared.input_size),
            sorted(prepared.taps),
            prepared.calibration,
            # An ONNX backbone's sidecar (preprocessing, pooling) changes its features too.
            *([prepared.preprocessing] if prepared.preprocessing else []),
        ]
    )


def _fresh_manifest(
    spec: DatasetSpec, settings: ExtractSettings, prepared: PreparedBackbone, features: str,
    dataset_fingerprint: str,
) -> Manifest:  # fmt: skip
    return Manifest(
        dataset=spec.name,
        dataset_root=spec.root,
        dataset_fingerprint=dataset_fingerprint,
        classes=spec.classes,
        backbone=prepared.backbone,
        weights_source=prepared.weights.source,
        weights_sha256=prepared.weights.sha256,
        input_size=prepared.input_size,
        runtime=prepared.runtime,
        calibration=prepared.calibration,
        preprocessing=prepared.preprocessing,
        augment_copies=settings.augment,
        augment_policy=settings.policy.to_dict(),
        seed=settings.seed,
        taps={tap: TapRecord(shape, settings.dtype) for tap, shape in prepared.taps.items()},
        feature_fingerprint=features,
        num_shards=settings.shards,
        split_sizes={split: spec.split_size(split) for split in spec.splits},
        wf_version=__version__,
        created_at=now_iso(),
        updated_at=now_iso(),
    )


def plan_dataset(
    spec: DatasetSpec, settings: ExtractSettings, prepared: PreparedBackbone, layout: StoreLayout
) -> DatasetPlan:
    """Decide the shards to compute and write the run's starting manifest (hold the lease).
    The spec's images were planned into ``settings.shards`` shards on the driver's disk; each
    is read here for its fingerprint, and again when its job is submitted."""
    if spec.planned.shards != settings.shards:
        raise ValueError(f"{spec.name} was planned into {spec.planned.shards} shards, not "
                         f"{settings.shards}")  # fmt: skip
    features = feature_fingerprint(settings, prepared)
    existing = read_manifest(layout, spec.name, prepared.backbone)
    identity = (features, settings.shards, spec.classes)
    reset = existing is None or (
        (existing.feature_fingerprint, existing.num_shards, existing.classes) != identity
    )
    kept = {} if reset or existing is None else existing.shards
    folder = layout.backbone_dir(spec.name, prepared.backbone)
    sizes = {info.path: info.size for info in list_files(layout.filesystem, folder)}
    jobs, fingerprints, skipped = [], {}, 0
    for split in spec.splits:
        for index in range(settings.shards):
            key = shard_key(split, index)
            shard_items = spec.shard(split, index)
            fingerprints[key] = fingerprint_with_rows(
                [features, list(spec.classes), settings.max_pixels],
                shard_items.load().signature_rows(),
            )
            record = kept.get(key)
            if (
                record is not None
                and record.input_fingerprint == fingerprints[key]
                and sizes.get(layout.absolute(record.file)) == record.size_bytes
            ):
                skipped += 1
                continue
            jobs.append(
                ShardJob(
                    dataset=spec.name, split=split, shard=index, num_shards=settings.shards,
                    items=shard_items, source=spec.source, layout=layout,
                    output_path=layout.part_path(spec.name, prepared.backbone, split, index,
                                                 settings.shards, new_attempt()),
                    classes=spec.classes, augment_copies=settings.augment, policy=settings.policy,
                    seed=settings.seed, dtype=settings.dtype, batch_size=settings.batch_size,
                    max_pixels=settings.max_pixels, threads=settings.threads_per_task,
                )
            )  # fmt: skip
    fresh = _fresh_manifest(spec, settings, prepared, features, spec.fingerprint)
    if existing is not None and not reset:
        fresh = replace(fresh, created_at=existing.created_at)
    redo = {shard_key(job.split, job.shard) for job in jobs}
    manifest = replace(
        fresh, shards={k: r for k, r in kept.items() if k in fingerprints and k not in redo}
    )
    write_manifest(layout, manifest)  # from here on, only this run's commits count
    remove_unreferenced(layout, manifest)
    return DatasetPlan(spec.warnings, manifest, jobs, fingerprints, skipped, reset, spec.planned)
