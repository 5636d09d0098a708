"""Why int8 is (or is not) faster than float32 on this CPU: the backbone runtime alone, each way
of quantising it, and the kernels that take its time.

The backbone is wf's EfficientNet-Lite0 feature model at 224 with its two taps (bottleneck and
last_block_input), as `wf extract` runs it: one thread, one image at a time. Ways:

- litert float32 and litert-int8: exactly what `wf extract --runtime litert|litert-int8` runs
  (`tasks.backbones.runtime.prepare_backbone`, int8 calibrated on 100 training photos; XNNPACK);
- int8 per-tensor: the same full integer quantisation with per-channel weights turned off;
- int8 without XNNPACK: the int8 model on TFLite's built-in kernels (ruy, optimized_ops);
- dynamic range: int8 weights, float activations (quantised on the fly by XNNPACK's qd8 path);
- onnxruntime float32 and int8: the same Keras model exported to ONNX (tf2onnx) and quantised
  statically by onnxruntime (QDQ, per-channel int8 weights, uint8 activations; MLAS kernels).

Each model runs `--rounds` times over 40 decoded photos, the ways interleaved, so that a noisy
neighbour slows every way alike; the table gives the median milliseconds per image, the ratio
to litert float32, and the cosine of each image's bottleneck to float32's (1.0 = the same
features). Where `perf` can sample this process's children, each LiteRT way is then profiled
alone for a few seconds and its hottest XNNPACK/TFLite kernels are printed with their share.

Usage: python benchmarks/int8_kernels.py [--images DIR] [--rounds 5] [--work /tmp/wf-int8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "datasets" / "cats_vs_dogs" / "train"
SIZE = (224, 224)
TAPS = ("bottleneck", "last_block_input")
PROFILE_LOOP = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
data = open(sys.argv[1], "rb").read()
kind = getattr(OpResolverType, sys.argv[2])
it = Interpreter(model_content=data, num_threads=1, experimental_op_resolver_type=kind)
run = it.get_signature_runner()
(name,) = it.get_signature_list()["serving_default"]["inputs"]
x = np.load(sys.argv[3])
for i in range(int(sys.argv[4])):
    run(**{name: x[i % len(x)][None]})
"""


def _keras_model():
    from tasks.backbones import feature_model, get_backbone

    backbone = get_backbone("efficientnet_lite0")
    return feature_model(backbone.build(SIZE, backbone.resolve_weights("imagenet")), TAPS)


def _tflite(calibration: np.ndarray, per_channel: bool, full: bool) -> bytes:
    import contextlib
    import io

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(_keras_model())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if full:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: (
            [image[None].astype(np.float32)] for image in calibration
        )
    converter._experimental_disable_per_channel = not per_channel
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def litert_runner(data: bytes, resolver: str = "AUTO"):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = getattr(OpResolverType, resolver)
    interpreter = Interpreter(model_content=data, num_threads=1, experimental_op_resolver_type=kind)
    run = interpreter.get_signature_runner()
    (name,) = interpreter.get_signature_list()["serving_default"]["inputs"]
    return lambda x: run(**{name: x})["bottleneck"]


def onnx_models(calibration: np.ndarray, work: Path) -> tuple[bytes, bytes]:
    """float32 ONNX of the feature model, and onnxruntime's static int8 of it."""
    import keras
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tasks.converters import to_onnx

    model = _keras_model()
    image = keras.Input(model.input_shape[1:])
    out = model(image)
    data = to_onnx(keras.Model(image, [out[tap] for tap in TAPS]), TAPS)
    (work / "f32.onnx").write_bytes(data)
    quant_pre_process(str(work / "f32.onnx"), str(work / "f32_pre.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(calibration.astype(np.float32))

        def get_next(self) -> dict | None:
            image = next(self.images, None)
            return None if image is None else {"image": image[None]}

    quantize_static(str(work / "f32_pre.onnx"), str(work / "int8.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return data, (work / "int8.onnx").read_bytes()


def onnx_runner(data: bytes):
    from tasks.backbones.onnx_backbone import session

    runner = session(data, threads=1)
    return lambda x: runner.run(["bottleneck"], {"image": x})[0]


def profile(data: bytes, resolver: str, pixels: np.ndarray, work: Path, runs: float):
    """The hottest symbols of ``perf record`` over ``runs`` runs (at least 20) of this model
    alone: [(share, name)]."""
    model, images, script = work / "profiled.tflite", work / "images.npy", work / "loop.py"
    model.write_bytes(data)
    np.save(images, pixels.astype(np.float32))
    script.write_text(PROFILE_LOOP)
    out = work / "perf.data"
    count = str(max(20, int(runs)))
    recorded = subprocess.run(["perf", "record", "-q", "-o", str(out), sys.executable,
                               str(script), str(model), resolver, str(images), count],
                              capture_output=True, text=True)  # fmt: skip
    if recorded.returncode != 0:
        return None
    report = subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort",
                             "sym", "--stdio"], capture_output=True, text=True)  # fmt: skip
    rows = []
    for line in report.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1] == "[.]":
            rows.append((float(parts[0][:-1]), parts[2]))
    return rows[:5]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default="/tmp/wf-int8")
    parser.add_argument("--no-onnx", action="store_true", help="leave onnxruntime out")
    args = parser.parse_args()
    if not os.path.isdir(args.images):
        sys.exit(f"no images at {args.images}: pass --images DIR (one folder per class)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as wf runs its workers
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from machine import banner

    from tasks.backbones import get_backbone
    from tasks.backbones.runtime import prepare_backbone
    from tasks.images import decode_image

    paths = sorted(Path(args.images).rglob("*.jpg"))
    step = max(1, len(paths) // 140)
    pixels = np.stack([decode_image(p.read_bytes(), SIZE) for p in paths[::step][:140]])
    calibration, test = pixels[:100], pixels[100:140].astype(np.float32)
    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.resolve_weights("imagenet")
    print("converting ...", file=sys.stderr, flush=True)

    def wf_model(runtime: str) -> bytes:
        images = calibration if runtime == "litert-int8" else None
        cache = str(work / "cache")
        return prepare_backbone(backbone, weights, SIZE, TAPS, runtime, cache, images).model_bytes

    litert = {
        "litert float32 (wf)": (wf_model("litert"), "AUTO"),
        "litert-int8 (wf; per-channel)": (wf_model("litert-int8"), "AUTO"),
        "int8 per-tensor": (_tflite(calibration, per_channel=False, full=True), "AUTO"),
        "int8 without XNNPACK": (wf_model("litert-int8"), "BUILTIN_WITHOUT_DEFAULT_DELEGATES"),
        "dynamic range (int8 weights)": (
            _tflite(calibration, per_channel=True, full=False),
            "AUTO",
        ),
    }
    ways = {name: litert_runner(data, resolver) for name, (data, resolver) in litert.items()}
    if not args.no_onnx:
        f32, int8 = onnx_models(calibration, work)
        ways["onnxruntime float32"] = onnx_runner(f32)
        ways["onnxruntime int8 (QDQ, MLAS)"] = onnx_runner(int8)
    times: dict[str, list[float]] = {name: [] for name in ways}
    features = {}
    for name, run in ways.items():  # warm up, and each way's features
        features[name] = np.concatenate([run(test[i : i + 1]) for i in range(len(test))])
    for _ in range(args.rounds):
        for name, run in ways.items():
            started = time.perf_counter()
            for i in range(len(test)):
                run(test[i : i + 1])
            times[name].append((time.perf_counter() - started) * 1000 / len(test))
    print(banner())
    print(f"runtime alone, one thread, one image at a time; median of {args.rounds} rounds of "
          f"{len(test)} photos, the ways interleaved\n")  # fmt: skip
    reference = statistics.median(times["litert float32 (wf)"])
    print("| way | ms per image | vs litert float32 | rounds (ms) | bottleneck cosine to float32 |")
    print("|---|---|---|---|---|")
    for name, each in times.items():
        median = statistics.median(each)
        spread = f"{min(each):.1f}-{max(each):.1f}"
        similar = cosine(features[name], features["litert float32 (wf)"])
        print(f"| {name} | {median:.2f} | {reference / median:.2f}x | {spread} | {similar:.4f} |")
    if shutil.which("perf") is None:
        print("\nperf is not installed: no kernel profile")
        return
    print("\nhottest kernels (perf record of each LiteRT way alone; share of its samples):")
    for name, (data, resolver) in litert.items():
        rows = profile(
            data, resolver, test, work, runs=3000 / statistics.median(times[name])
        )  # ~3 s
        if rows is None:
            print(f"- {name}: perf could not record (perf_event_paranoid?)")
            continue
        print(f"- {name}: " + "; ".join(f"{share:.1f}% {symbol}" for share, symbol in rows))


if __name__ == "__main__":
    main()
