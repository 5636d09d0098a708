"""The method registry and each method's models, on a real store extracted without Ray."""

from dataclasses import replace

import numpy as np
import pytest

from storage.errors import SettingsError
from storage.feature_store import FeatureStore
from storage.layout import StoreLayout
from storage.manifest import ShardRecord, commit_shard, compact
from storage.runs import RunsLayout
from tasks.backbones import get_backbone
from tasks.backbones.runtime import prepare_backbone
from tasks.extract_shard import extract_shard
from tasks.methods import METHODS, JobContext, Recipe, TrainOptions, get_method, in_dependency_order
from tasks.training.inputs import read_rows
from tasks.training.weights import named_weights
from tests.conftest import make_dataset
from workflows.datasets import discover_dataset
from workflows.extract.plan import plan_dataset
from workflows.extract.settings import DatasetSource, ExtractSettings


def test_registry_and_dependency_order():
    assert set(METHODS) == {"bottleneck", "finetune", "scratch", "fusion", "prototype"}
    assert [m.name for m in in_dependency_order(("finetune", "scratch", "bottleneck"))] == [
        "scratch", "bottleneck", "finetune"]  # fmt: skip
    with pytest.raises(SettingsError, match="unknown method 'bottlenek'"):
        get_method("bottlenek")
    with pytest.raises(SettingsError, match="optimizer"):
        Recipe(optimizer="adagrad")


def extract_without_ray(root, cache, backbones=("efficientnet_lite0",), size=40) -> str:
    """Extract ``root/shapes`` into ``root/store`` by calling the shard function directly."""
    make_dataset(root / "shapes", ("circles", "squares"), 6, size=size)
    store = str(root / "store")
    for name in backbones:
        settings = ExtractSettings(datasets=(DatasetSource(str(root / "shapes")),), store=store,
                                   shards=1, backbone=name, weights="none", input_size=size,
                                   augment=1, validation_fraction=0.3, cache_dir=cache)  # fmt: skip
        spec = discover_dataset(str(root / "shapes"), 0.3)
        backbone = get_backbone(name)
        weights = backbone.resolve_weights("none")
        prepared = prepare_backbone(
            backbone, weights, (size, size), backbone.default_taps, "litert", settings.cache_dir
        )
        layout = StoreLayout.at(store)
        plan = plan_dataset(spec, settings, prepared, layout)
        manifest = plan.manifest
        for job in plan.jobs:
            result = extract_shard(job, prepared)
            key = f"{job.split}/{job.shard:05d}"
            record = ShardRecord(
                job.split, job.shard, 1, layout.relative(result.path), plan.fingerprints[key],
                result.images, result.rows, result.rejects, result.sha256, result.size_bytes,
                result.seconds, result.class_images)  # fmt: skip
            commit_shard(layout, manifest, record)
            manifest = manifest.with_shard(record)
        compact(layout, manifest)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory, cache_dir):
    return extract_without_ray(
        tmp_path_factory.mktemp("methods"), cache_dir, ("efficientnet_lite0", "efficientnet_lite1")
    )


def context_for(store: str, method: str, runs) -> JobContext:
    from workflows.train.run import store_snapshot

    layout = StoreLayout.at(store)
    stores = [
        FeatureStore.open(layout, "shapes", b) for b in ("efficientnet_lite0", "efficientnet_lite1")
    ]
    for s in stores:
        s.verify_parts()
    if not METHODS[method].all_backbones:
        stores = stores[:1]
    manifest = stores[0].manifest
    facts = tuple(store_snapshot(s) for s in stores)
    return JobContext("shapes", method, manifest.classes, manifest.dataset_root, facts,
                      layout.filesystem, RunsLayout(str(runs)), METHODS[method].recipe,
                      TrainOptions(scratch_image_size=32))  # fmt: skip


def test_extract_shard_runs_without_ray(store):
    manifest = FeatureStore.open(store, "shapes", "efficientnet_lite0").manifest
    assert manifest.is_complete() and manifest.images_per_class("train")[0] > 0
    assert (
        sum(r.rows for r in manifest.shards.values())
        == 2 * manifest.split_sizes["train"] + (manifest.split_sizes["validation"])
    )  # one augmented copy of each training image


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_reads_rows_and_builds_both_models(store, tmp_path, name):
    import keras
    import tf_keras

    method = METHODS[name]
    context = context_for(store, name, tmp_path)
    rows = read_rows(context, method, "train")
    trainable = method.build_trainable(tf_keras, context)
    assert trainable.input_shape[1:] == rows.x.shape[1:]
    out = trainable.predict(rows.x[:3].astype("float32"), verbose=0)
    assert out.shape == (3, 1)  # two classes: one sigmoid
    weights = named_weights(method.build_trainable(keras, context))
    if method.depends_on:  # it starts from its dependency's trained weights
        runs = RunsLayout(str(tmp_path))
        top = named_weights(
            METHODS[method.depends_on].build_trainable(
                keras, replace(context, method=method.depends_on)
            )
        )
        runs.job("shapes", method.depends_on).write_weights("trained_weights.npz", top)
    backbones = {
        s.backbone: get_backbone(s.backbone).resolve_weights("none") for s in context.stores
    }
    if method.initial_weights(context, backbones) is not None:
        assert set(method.initial_weights(context, backbones)) == set(weights)
    model = method.complete_model(context, weights, backbones)
    side = model.input_shape[1]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype("float32")
    probabilities = model.predict(pixels, verbose=0)
    assert probabilities.shape == (2, 1) and np.isfinite(probabilities).all()


def test_fusion_concatenates_every_backbone_row_by_row(store, tmp_path):
    context = context_for(store, "fusion", tmp_path)
    rows = read_rows(context, METHODS["fusion"], "train")
    alone = read_rows(context_for(store, "bottleneck", tmp_path), METHODS["bottleneck"], "train")
    assert rows.x.shape == (len(alone), 2560)
    np.testing.assert_array_equal(rows.x[:, :1280], alone.x)  # the first backbone's own rows
    np.testing.assert_array_equal(rows.y, alone.y)


def test_workers_read_equal_disjoint_shares(store, tmp_path):
    context = context_for(store, "bottleneck", tmp_path)
    whole = read_rows(context, METHODS["bottleneck"], "train")
    shares = [read_rows(context, METHODS["bottleneck"], "train", rank, 2) for rank in (0, 1)]
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    assert sum(map(len, shares)) == len(whole)
    np.testing.assert_array_equal(
        np.concatenate([shares[0].x, shares[1].x])[
            np.argsort(np.r_[0 : len(whole) : 2, 1 : len(whole) : 2])
        ],
        whole.x,
    )


@pytest.mark.parametrize("classes", [2, 4])
def test_prototype_is_the_nearest_class_mean_and_its_keras_head_agrees(classes):
    import tf_keras

    from tasks.heads import probabilities
    from tasks.methods.prototype import fit_prototypes

    rng = np.random.default_rng(classes)
    centres = rng.normal(size=(classes, 32)) * 3
    y = np.repeat(np.arange(classes), 8)
    x = (centres[y] + rng.normal(size=(len(y), 32))).astype(np.float32)
    prototypes, scale = fit_prototypes(x, y, classes)
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert (np.sum(prototypes * unit, axis=1) > 0.9).all() and 1 < scale < 200
    method = get_method("prototype")
    weights = method.fit_closed_form(x, y, classes)
    found = probabilities(method.predict_closed_form(weights, x), classes)
    head = method.build_on_rows(tf_keras, (32,), classes)
    head.get_layer("top_output").set_weights(weights["top_output"])
    np.testing.assert_allclose(probabilities(head(x).numpy(), classes), found, atol=1e-5)
    assert (found.argmax(axis=1) == y).mean() > 0.95  # well-separated clusters
    # The nearest prototype by cosine is the predicted class.
    cosine = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ prototypes.T
    np.testing.assert_array_equal(found.argmax(axis=1), cosine.argmax(axis=1))
    # Leave-one-out: the scale fitted on the training rows is about as good on new images of
    # the same classes as the best scale for them (an in-sample fit would be far too sure).
    from tasks.methods.prototype import SCALES, _log_loss, _unit

    noisy = (centres[y] + 3 * rng.normal(size=(len(y), 32))).astype(np.float32)
    prototypes, scale = fit_prototypes(noisy, y, classes)
    fresh_y = np.repeat(np.arange(classes), 200)
    fresh = centres[fresh_y] + 3 * rng.normal(size=(len(fresh_y), 32))
    cosines = _unit(fresh) @ prototypes.T
    best = min(_log_loss(cosines, fresh_y, s) for s in SCALES)
    assert _log_loss(cosines, fresh_y, scale) < best + 0.05
    with pytest.raises(ValueError, match="a class has no training rows"):
        fit_prototypes(x[y != 0], y[y != 0], classes)
