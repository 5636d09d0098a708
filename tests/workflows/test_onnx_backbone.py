"""A user's own ONNX model as the backbone, end to end on a real local Ray cluster: extraction
(sharded, resumable, its sidecar in the fingerprint), the methods that train on its stored tap,
the ones that refuse it, and the saved ``model.onnx`` that predict, evaluate and plain
onnxruntime run."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from storage.errors import SettingsError
from storage.feature_store import FeatureStore, tap_to_numpy
from storage.hashing import sha256_stream
from storage.runs import Artifact, RunsLayout
from tasks.images import load_image
from tests.conftest import make_colour_dataset
from tests.onnx_models import conv_model, token_model
from workflows.extract.run import run_extract
from workflows.extract.settings import DatasetSource, ExtractSettings
from workflows.train.run import run_train_all
from workflows.train.settings import TrainSettings, default_recipes

pytestmark = pytest.mark.slow


def _reference(model: Path, images: np.ndarray) -> np.ndarray:
    """The conv model's features as its sidecar defines them, computed here without wf's graph:
    (x / 255 - 0.5) / 0.25, NCHW, the model, the spatial mean."""
    import onnxruntime as ort

    x = ((images.astype(np.float32) / 255 - 0.5) / 0.25).transpose(0, 3, 1, 2)
    out = ort.InferenceSession(str(model)).run(["features"], {"pixels": x.astype(np.float32)})
    return out[0].mean(axis=(2, 3))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, cache_dir, ray_local):
    root = tmp_path_factory.mktemp("onnx")
    data = make_colour_dataset(root / "data" / "pairs", 20, size=48, seed=4)
    make_colour_dataset(data / "unlabelled", 3, size=48, seed=5)  # for wf suggest
    model = conv_model(root / "models" / "tinyconv.onnx")
    settings = ExtractSettings(datasets=(DatasetSource(str(data)),), store=str(root / "store"),
                               shards=2, backbone=f"onnx:{model}", augment=1,
                               validation_fraction=0.3, cache_dir=cache_dir)  # fmt: skip
    (report,) = run_extract(settings)
    return root, data, model, settings, report


def test_extract_stores_the_models_features_under_its_sidecar_name(extracted):
    root, data, model, _settings, report = extracted
    assert report.backbone == "tinyconv" and report.images == 46 and not report.shards_failed
    store = FeatureStore.open(str(root / "store"), "pairs", "tinyconv")
    manifest = store.manifest
    assert manifest.weights_source == f"onnx:{model}" and manifest.runtime == "onnxruntime"
    assert manifest.weights_sha256 == sha256_stream([model.read_bytes()])
    assert manifest.input_size == (32, 32) and manifest.taps["bottleneck"].shape == (8,)
    table = store.read_table("validation", ["path", "copy", "tap_bottleneck"])
    assert set(table["copy"].to_pylist()) == {0} and len(store.files("train")) == 2  # sharded
    features = tap_to_numpy(table["tap_bottleneck"], (8,)).astype(np.float32)
    paths = table["path"].to_pylist()
    images = np.stack([load_image(pafs.LocalFileSystem(), str(data / p), (32, 32)) for p in paths])
    np.testing.assert_allclose(features, _reference(model, images), rtol=1e-2, atol=1e-2)


def test_a_second_extract_reuses_every_shard_and_a_changed_sidecar_recomputes(extracted, tmp_path):
    _root, _, model, settings, report = extracted
    (again,) = run_extract(settings)
    assert (again.shards_done, again.shards_skipped) == (0, report.shards_done)
    # The same weights under other preprocessing are other features: a copy with a new mean.
    copy = tmp_path / "tinyconv.onnx"
    copy.write_bytes(model.read_bytes())
    sidecar = json.loads(Path(f"{model}.json").read_text())
    Path(f"{copy}.json").write_text(json.dumps({**sidecar, "mean": [0.4, 0.5, 0.6]}))
    moved = replace(settings, backbone=f"onnx:{copy}", store=str(tmp_path / "store"))
    first = FeatureStore.open(settings.store, "pairs", "tinyconv").manifest.feature_fingerprint
    run_extract(moved)
    second = FeatureStore.open(moved.store, "pairs", "tinyconv").manifest.feature_fingerprint
    assert first != second


def test_bottleneck_and_prototype_save_one_onnx_model_that_predict_and_plain_onnxruntime_run(
    extracted,
):
    root, data, _model, settings, _ = extracted
    # A built-in backbone beside it, for fusion: the same images and splits, at 32 px.
    run_extract(replace(settings, backbone="efficientnet_lite0", input_size=32, runtime="litert"))
    runs = root / "runs"
    train = TrainSettings(store=settings.store, runs=str(runs), backbone="tinyconv",
                          methods=("bottleneck", "prototype", "finetune", "fusion"),
                          recipes={**default_recipes(), "bottleneck": replace(
                              default_recipes()["bottleneck"], epochs=8)}, cv=2)  # fmt: skip
    results = {r.method: r for r in run_train_all(train)}
    assert results["finetune"].status == "failed"
    assert "finetune cannot train on tinyconv, an ONNX model: no last block" in (
        results["finetune"].error
    )
    from tasks.classifier import load_trained_model
    from workflows.serve.predict import classify, evaluate_folder, image_files

    fusion = (
        RunsLayout(str(runs)).job("pairs", "fusion").metrics()
    )  # the ONNX and Lite0 side by side
    assert set(fusion.manifest_ids) == {"tinyconv", "efficientnet_lite0"}
    for method in ("bottleneck", "prototype", "fusion"):
        result = results[method]
        assert result.status == "done", result.error
        files = RunsLayout(str(runs)).job("pairs", method)
        index = files.index()
        assert Artifact.ONNX_MODEL in index and Artifact.MODEL not in index
        assert files.model.endswith("model.onnx") and result.accuracy >= 0.9
        evaluated = evaluate_folder(files.model, str(data))  # what `wf evaluate` runs
        assert evaluated["accuracy"] >= 0.9
        loaded = load_trained_model(files.model)
        assert loaded.abstention is not None and loaded.embedding is not None  # from the graph
    # The saved graph's answers are the stored-features top's: the validation accuracy the job
    # measured on stored rows is what the image model gets on those images.
    files = RunsLayout(str(runs)).job("pairs", "bottleneck")
    metrics = files.metrics()
    photos = sorted(data.rglob("*.jpg"))[:5]
    answers = classify(load_trained_model(files.model).with_thresholds(abstain=False),
                       image_files(list(map(str, photos))))  # fmt: skip
    assert [a.label for a in answers] == [p.parent.name for p in photos]
    assert metrics.input_size == [32, 32] and metrics.cv and metrics.cv["folds"] == 2
    # wf audit and wf suggest read the store by its name, as for a built-in backbone.
    from workflows.audit.run import run_audit
    from workflows.audit.settings import AuditSettings
    from workflows.label.settings import SuggestSettings
    from workflows.label.suggest import run_suggest

    audited = run_audit(AuditSettings(store=settings.store, output=str(root / "audit"),
                                      backbone="tinyconv", folds=2))  # fmt: skip
    assert audited["pairs"]["images"] == 40
    suggested = run_suggest(SuggestSettings(store=settings.store, runs=str(runs),
                                            output=str(root / "next"), budget=3,
                                            backbone="tinyconv"))  # fmt: skip
    # (the pool's six plain-colour images are near duplicates of each other: fewer than 3)
    assert 1 <= suggested["pairs"]["suggested"] <= 3
    rows = (root / "next" / "pairs" / "suggestions.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[1].startswith('"unlabelled/') for row in rows)
    # model.onnx runs with nothing of wf or TensorFlow imported: image in, probabilities out.
    script = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        "from PIL import Image\n"
        "s = ort.InferenceSession(sys.argv[1])\n"
        "x = np.stack([np.asarray(Image.open(p).convert('RGB').resize((32, 32), "
        "Image.BILINEAR), np.float32) for p in sys.argv[2:]])\n"
        "p = s.run(['probabilities'], {'image': x})[0]\n"
        "assert 'tensorflow' not in sys.modules and not any(m.split('.')[0] in "
        "('workflows', 'tasks', 'storage', 'keras') for m in sys.modules)\n"
        "print(json.dumps(p.reshape(-1).tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, files.model, *map(str, photos)],
                          capture_output=True, text=True, cwd="/", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    plain = np.array(json.loads(done.stdout))
    positive = np.array([a.probabilities["red"] for a in answers])  # two classes: one sigmoid
    np.testing.assert_allclose(plain, positive, atol=2e-3)


def test_a_token_model_pools_cls_and_mean_and_a_bad_sidecar_is_one_line(tmp_path, cache_dir):
    from tasks.backbones import get_backbone

    model = token_model(tmp_path / "vit.onnx", pool="cls+mean")
    backbone = get_backbone(f"onnx:{model}")
    assert backbone.name == "tinyvit" and backbone.features == 32  # 16 for CLS, 16 for the mean
    data = make_colour_dataset(tmp_path / "data", 2, size=32)
    settings = ExtractSettings(datasets=(DatasetSource(str(data)),), store=str(tmp_path / "s"),
                               backbone=f"onnx:{model}", cache_dir=cache_dir)  # fmt: skip
    assert settings.image_size == (32, 32) and settings.backbone_name == "tinyvit"
    with pytest.raises(SettingsError, match="takes 32x32"):
        replace(settings, input_size=64)
    with pytest.raises(SettingsError, match="runs in onnxruntime, not litert-int8"):
        replace(settings, runtime="litert-int8")
    Path(f"{model}.json").write_text('{"name": "tinyvit", "input_size": [32, 32], "pol": "cls"}')
    with pytest.raises(SettingsError, match="unknown field pol"):  # read again: it changed
        get_backbone(f"onnx:{model}")


def test_a_model_over_the_size_cap_or_with_external_weights_is_refused(tmp_path):
    import onnx

    from tasks.backbones.onnx_backbone import load_onnx_backbone

    model = conv_model(tmp_path / "conv.onnx")
    with pytest.raises(SettingsError, match=r"is 1,\d{3} bytes, over the cap of 1,000"):
        load_onnx_backbone(f"onnx:{model}", max_bytes=1000)
    split = tmp_path / "split.onnx"
    onnx.save_model(onnx.load_model(str(model)), str(split), save_as_external_data=True,
                    size_threshold=0, location="split.onnx.data")  # fmt: skip
    Path(f"{split}.json").write_text(Path(f"{model}.json").read_text())
    with pytest.raises(SettingsError, match="keeps its weights in an external file"):
        load_onnx_backbone(f"onnx:{split}")


def test_a_model_with_wfs_own_names_and_a_batch_fixed_inside_runs_one_image_at_a_time(tmp_path):
    from tasks.backbones import get_backbone
    from tasks.backbones.runtime import FeatureExtractor, prepare_backbone
    from tests.onnx_models import clashing_model

    backbone = get_backbone(f"onnx:{clashing_model(tmp_path / 'clash.onnx')}")
    assert backbone.batch_one and backbone.features == 12  # found by running two images
    prepared = prepare_backbone(backbone, backbone.resolve_weights("imagenet"), (32, 32),
                                ("bottleneck",), "litert", str(tmp_path))  # fmt: skip
    assert prepared.runtime == "onnxruntime"
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    found = FeatureExtractor(prepared)(images)["bottleneck"]
    means = images.astype(np.float32).mean(axis=(1, 2))  # its features: the channel means x4
    np.testing.assert_allclose(found, np.tile(means, 4), rtol=1e-5)
