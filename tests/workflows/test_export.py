"""``wf export``: a saved Keras model as ONNX, TFLite and int8 TFLite, written only when it gives
the Keras model's answers, and run where neither wf nor TensorFlow is installed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.errors import SettingsError
from tests.conftest import make_colour_dataset
from workflows.serve.export import ExportRefused, export_model

# Loads an exported file with only its runtime, numpy and Pillow, and prints its outputs.
PLAIN = r"""
import json, sys
import numpy as np
from PIL import Image
path, size, images = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR),
                         np.float32) for p in images])
if path.endswith(".onnx"):
    import onnxruntime as ort
    out = ort.InferenceSession(path).run(["probabilities"], {"image": x})[0]
else:
    from ai_edge_litert.interpreter import Interpreter
    run = Interpreter(model_path=path).get_signature_runner()
    out = np.concatenate([run(image=x[i:i + 1])["probabilities"] for i in range(len(x))])
ours = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "workflows", "tasks",
                                                       "storage")]
assert not ours, ours
print(json.dumps(np.asarray(out).tolist()))
"""


def plain_run(path: Path, size: int, images: list[Path]) -> np.ndarray:
    done = subprocess.run([sys.executable, "-c", PLAIN, str(path), str(size), *map(str, images)],
                          capture_output=True, text=True, cwd="/", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return np.array(json.loads(done.stdout))


def _colour_model(folder: Path, fragile: bool = False) -> Path:
    """A small Keras model that tells red from blue by the mean colour; ``fragile``: the
    deciding activation sits beside a channel 10,000 times larger, so int8 activations (one
    scale per tensor) cannot hold it and the quantised model answers one class."""
    import keras

    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1.0)(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    first = keras.layers.Dense(2, name="mix")
    x = first(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="decide")(x)
    model = keras.Model(image, out)
    # unit 1: (R - B) / 100, about +-1.6; unit 0: a constant (10,000 when fragile).
    first.set_weights([np.array([[0, 0.01], [0, 0], [0, -0.01]], np.float32),
                       np.array([1e4 if fragile else 0.0, 0], np.float32)])  # fmt: skip
    model.get_layer("decide").set_weights(
        [np.array([[0], [10]], np.float32), np.zeros(1, np.float32)]
    )
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    (folder / "classes.json").write_text('["blue", "red"]')
    return folder / "model.keras"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_colour_dataset(root / "data" / "train", 10, size=40, seed=1)
    make_colour_dataset(root / "data" / "validation", 20, size=40, seed=2)
    return root


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "tflite-int8"])
def test_an_export_gives_the_keras_models_answers_without_wf(colours, tmp_path, fmt):
    model = _colour_model(tmp_path / "run")
    output = tmp_path / f"colours.{fmt}"
    report = export_model(str(model), fmt, str(output), check=str(colours / "data" / "validation"),
                          calibration=str(colours / "data" / "train"))  # fmt: skip
    assert report.written and output.stat().st_size == report.bytes and report.images == 40
    assert report.agreement == 1.0 and report.keras_accuracy == report.exported_accuracy == 1.0
    photos = sorted((colours / "data" / "validation").rglob("*.jpg"))[::5]
    import keras

    expected = keras.saving.load_model(model).predict_on_batch(
        np.stack([np.asarray(_resized(p), np.float32) for p in photos]))  # fmt: skip
    found = plain_run(output, 32, photos)
    np.testing.assert_allclose(found, expected, atol=0.05 if fmt == "tflite-int8" else 1e-4)


def _resized(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)


def test_an_int8_model_that_collapses_to_one_class_is_refused_and_not_written(colours, tmp_path):
    model = _colour_model(tmp_path / "run", fragile=True)
    output = tmp_path / "fragile.tflite"
    with pytest.raises(ExportRefused) as refused:
        export_model(str(model), "tflite-int8", str(output),
                     check=str(colours / "data" / "validation"),
                     calibration=str(colours / "data" / "train"))  # fmt: skip
    report = refused.value.report
    assert not output.exists() and not report.written
    assert report.keras_accuracy == 1.0 and report.exported_accuracy <= 0.6
    assert "int8 accuracy" in report.reason
    # The same model in float32 is exact: the gate is about int8, not the model.
    assert export_model(str(model), "tflite", str(tmp_path / "float.tflite"),
                        check=str(colours / "data" / "validation")).written  # fmt: skip


def test_a_check_folder_is_needed_when_the_dataset_has_none(colours, tmp_path):
    model = _colour_model(tmp_path / "run")
    with pytest.raises(SettingsError, match="no validation/ folder: name one with --check"):
        export_model(str(model), "onnx", str(tmp_path / "x.onnx"))
    with pytest.raises(SettingsError, match="--format must be one of"):
        export_model(str(model), "coreml", str(tmp_path / "x.mlmodel"))
