"""What a worker trains on: its share of a split's rows, read straight from the feature store's
Parquet files (a shared path or an object store), and the tf.data pipelines over them.

Each worker reads the committed part files itself and keeps every ``world``-th row from its
rank on, so workers hold equal shares (within one row) with no coordinator and nothing staged in
Ray's object store. A method that reads several stores (fusion) gets their rows matched by
image path and copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from storage.feature_store import read_parts
from tasks.augment import augment_image
from tasks.methods.base import JobContext, Method


@dataclass(frozen=True)
class Rows:
    x: np.ndarray
    y: np.ndarray
    copies: np.ndarray
    paths: tuple[str, ...] = ()  # each row's image, relative to the dataset

    def __len__(self) -> int:
        return len(self.y)


def _aligned(tables: list[pa.Table]) -> list[pa.Table]:
    """Every table cut to the rows (path, copy) that all have, in the first table's order."""
    if len(tables) == 1:
        return tables

    def keys(table: pa.Table) -> list[tuple[str, int]]:
        return list(zip(table["path"].to_pylist(), table["copy"].to_pylist(), strict=True))

    common = set(keys(tables[0])).intersection(*(set(keys(t)) for t in tables[1:]))
    order = [k for k in keys(tables[0]) if k in common]
    out = []
    for table in tables:
        position = {k: i for i, k in enumerate(keys(table))}
        out.append(table.take(pa.array([position[k] for k in order], pa.int64())))
    return out


def read_rows(
    context: JobContext, method: Method, split: str, rank: int = 0, world: int = 1,
    first_copy_only: bool = False,
) -> Rows:  # fmt: skip
    """This worker's rows of ``split``: the method's inputs, labels and copy indices."""
    stores = context.stores if method.all_backbones else context.stores[:1]
    columns = list(dict.fromkeys(["path", "label_index", "copy", *method.columns()]))
    tables = []
    for store in stores:
        first = first_copy_only or method.augments_live
        tables.append(read_parts(context.store_filesystem, store.files[split], columns, first))
    tables = _aligned(tables)
    if world > 1:
        mine = pa.array(np.arange(rank, tables[0].num_rows, world), pa.int64())
        tables = [table.take(mine) for table in tables]
    if tables[0].num_rows == 0:
        raise RuntimeError(f"worker {rank} of {context.key} got no {split} rows")
    return Rows(
        method.features(context, tables),
        tables[0]["label_index"].to_numpy().astype(np.int64),
        tables[0]["copy"].to_numpy().astype(np.int64),
        tuple(tables[0]["path"].to_pylist()),
    )


def one_copy_per_epoch(rows: Rows, first_epoch: int, rows_per_epoch: int, seed: int) -> Any:
    """Rows for ``epoch_copies="one"``, one epoch after another from ``first_epoch`` on: epoch
    ``e`` reads ``rows_per_epoch`` rows of copy ``e mod n`` (n stored copies per image), freshly
    shuffled, so each epoch shows each image once, as the blog's real-time augmentation does.
    All in tf.data: no Python per batch."""
    import tensorflow as tf

    kinds = np.unique(rows.copies)
    streams = [
        tf.data.Dataset.from_tensor_slices((rows.x[rows.copies == c], rows.y[rows.copies == c]))
        .shuffle(int((rows.copies == c).sum()), seed=seed + int(c), reshuffle_each_iteration=True)
        .repeat()
        for c in kinds
    ]
    choice = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        lambda epoch: tf.data.Dataset.from_tensors(epoch % len(kinds)).repeat(rows_per_epoch)
    )
    return tf.data.Dataset.choose_from_datasets(streams, choice, stop_on_empty_dataset=False)


@dataclass(frozen=True)
class EpochPlan:
    steps: int  # steps per epoch, the same on every worker
    rows: int  # rows one worker reads per epoch


def plan_epoch(context: JobContext, method: Method, world: int) -> EpochPlan:
    """Steps per epoch from the whole training split's size, so every worker runs as many."""
    store = context.store
    total = store.images["train"] if method.augments_live else store.rows["train"]
    per_worker = -(-total // world)
    if context.options.epoch_copies == "one" and not method.augments_live:
        per_worker = -(-per_worker // context.store.copies)
    return EpochPlan(max(1, -(-per_worker // context.recipe.batch_size)), per_worker)


def training_dataset(
    context: JobContext, method: Method, rows: Rows, plan: EpochPlan, world: int, rank: int,
    first_epoch: int,
) -> Any:  # fmt: skip
    import tensorflow as tf

    batch, seed = context.recipe.batch_size, context.options.seed + rank
    if context.options.epoch_copies == "one" and not method.augments_live:
        dataset = one_copy_per_epoch(rows, first_epoch, plan.steps * batch * world, seed)
    else:
        dataset = (
            tf.data.Dataset.from_tensor_slices((rows.x, rows.y))
            .shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
            .repeat()
        )
        if method.augments_live:
            rng = np.random.default_rng([context.options.seed, rank, first_epoch])
            policy = context.options.policy

            def augment(images: np.ndarray) -> np.ndarray:
                seeds = rng.integers(0, 2**63 - 1, size=len(images))
                return np.stack(
                    [augment_image(i, policy, int(s)) for i, s in zip(images, seeds, strict=True)]
                )

            dataset = (
                dataset.batch(batch)
                .map(lambda x, y: (tf.numpy_function(augment, [x], tf.uint8), y))
                .unbatch()
            )
    return dataset.batch(batch * world).with_options(_no_autoshard()).prefetch(2)


def validation_dataset(rows: Rows, batch: int, world: int) -> tuple[Any, int | None]:
    """The validation rows and, with several workers, the steps each runs (wrapping around,
    since every worker must run as many)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((rows.x, rows.y))
    steps = None
    if world > 1:
        steps = max(1, -(-len(rows) // batch))
        dataset = dataset.repeat()
    return dataset.batch(batch * world).with_options(_no_autoshard()), steps


def _no_autoshard() -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options
