"""`wf serve` for real: the command in its own process on a local Ray cluster, called over HTTP
on 127.0.0.1 by a real client; answers equal `wf predict`'s; bad input refused in one line of
JSON with its status while the server keeps serving; overload answered with 503."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from tasks.images import decode_image
from tests.conftest import make_dataset
from tests.corpus import write_out_of_distribution
from tests.s3 import free_port
from workflows.extract.run import run_extract
from workflows.extract.settings import DatasetSource, ExtractSettings
from workflows.train.run import run_train_all
from workflows.train.settings import TrainSettings, recipes_from_options

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def multipart(files: dict[str, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = "wf-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"'
        f"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files.items()
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, ray_local):
    root = tmp_path_factory.mktemp("serve")
    make_dataset(root / "data" / "shapes", ("circles", "squares"), 12, size=64)
    store = str(root / "store")
    run_extract(ExtractSettings(datasets=(DatasetSource(str(root / "data" / "shapes")),),
                                store=store, shards=2, input_size=64, augment=0,
                                validation_fraction=0.25, cache_dir=cache_dir))  # fmt: skip
    settings = TrainSettings(store=store, runs=str(root / "runs"), methods=("bottleneck",),
                             recipes=recipes_from_options(3, None, {}, {}))  # fmt: skip
    assert all(r.status == "done" for r in run_train_all(settings))
    return root


@pytest.fixture(scope="module")
def server(runs):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--runs", str(runs / "runs"), "--port",
         str(port), "--num-cpus", "2", "--max-queued", "4", "--max-body-mb", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "wf serve did not come up"
        try:
            if http(f"{url}/v2/health/ready") == (200, {"ready": True}):
                break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(1)
    yield url, process
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: it shuts down by itself
    process.wait(60)


def test_it_says_where_it_listens_and_lists_its_models(server):
    url, _ = server
    status, models = http(f"{url}/v1/models")
    assert status == 200 and [m["name"] for m in models] == ["shapes-bottleneck"]
    assert models[0]["classes"] == ["circles", "squares"] and models[0]["metrics"]["accuracy"] >= 0
    assert http(f"{url}/v2/health/live") == (200, {"live": True})
    status, meta = http(f"{url}/v2/models/shapes-bottleneck")
    assert status == 200 and meta["inputs"][1]["shape"] == [-1, 64, 64, 3]


def test_http_answers_equal_wf_predict(server, runs):
    url, _ = server
    files = sorted((runs / "data" / "shapes").rglob("*.jpg"))[:6]
    predicted = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "predict",
         str(runs / "runs" / "shapes" / "bottleneck" / "model.keras"), *map(str, files),
         "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    expected = {Path(p["path"]).name: p["probabilities"] for p in json.loads(predicted.stdout)}
    for path in files:
        status, answer = http(f"{url}/v1/models/shapes/bottleneck:predict", path.read_bytes())
        assert status == 200 and answer["model"]["method"] == "bottleneck"
        for name, p in answer["probabilities"].items():
            assert abs(p - expected[path.name][name]) <= 1e-6
    # several images in one multipart form; and the Open Inference Protocol, both input kinds
    body, headers = multipart({f"f{i}": p.read_bytes() for i, p in enumerate(files[:3])})
    status, answers = http(f"{url}/v1/models/shapes/bottleneck:predict", body, headers)
    assert status == 200 and [a["label"] for a in answers] == [
        max(expected[p.name], key=expected[p.name].get) for p in files[:3]]  # fmt: skip
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in files[:2]]
    images = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": encoded}]}
    pixels = np.stack([decode_image(p.read_bytes(), (64, 64)) for p in files[:2]])
    tensor = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 64, 64, 3],
                          "data": pixels.reshape(-1).tolist()}]}  # fmt: skip
    for payload in (images, tensor):
        status, out = http(f"{url}/v2/models/shapes-bottleneck/infer", json.dumps(payload).encode())
        assert status == 200 and out["outputs"][0]["shape"] == [2, 2]
        first = dict(zip(out["parameters"]["classes"], out["outputs"][0]["data"][:2], strict=True))
        assert all(abs(first[c] - expected[files[0].name][c]) <= 1e-6 for c in first)


def test_the_standard_kserve_v2_client_speaks_to_it_for_every_input_kind(server, runs):
    """Triton's own HTTP client (tritonclient), with its defaults: binary tensors both ways."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    url, _ = server
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    name = "shapes-bottleneck"
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert not client.is_model_ready("shapes-nomethod")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.get_model_metadata(name)["inputs"][1]["datatype"] == "UINT8"
    files = sorted((runs / "data" / "shapes").rglob("*.jpg"))[:3]
    expected = []
    for path in files:
        _, answer = http(f"{url}/v1/models/shapes/bottleneck:predict", path.read_bytes())
        expected.append([answer["probabilities"][c] for c in ("circles", "squares")])
    encoded = np.array([p.read_bytes() for p in files], dtype=np.object_)
    pixels = np.stack([decode_image(p.read_bytes(), (64, 64)) for p in files])
    for binary_in in (True, False):
        for kind, data in (("BYTES", encoded), ("UINT8", pixels)):
            if kind == "BYTES" and not binary_in:  # JSON BYTES are strings: base64 of the file
                data = np.array([base64.b64encode(p.read_bytes()) for p in files], np.object_)
            tensor = triton.InferInput(
                "images" if kind == "BYTES" else "pixels", list(data.shape), kind
            )
            tensor.set_data_from_numpy(data, binary_data=binary_in)
            for outputs in (
                None,
                [
                    triton.InferRequestedOutput("probabilities", binary_data=False),
                    triton.InferRequestedOutput("reason", binary_data=True),
                ],
            ):
                result = client.infer(name, [tensor], outputs=outputs)
                np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
                assert list(result.as_numpy("reason")) == [b""] * 3
                if outputs is None:  # every output, binary by the client's default
                    assert list(result.as_numpy("abstained")) == [False] * 3
                else:
                    assert result.as_numpy("abstained") is None
    broken = triton.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    broken.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="UINT8 input must have shape"):
        client.infer(name, [broken])


def test_bad_input_is_one_line_of_json_and_the_server_keeps_serving(server, runs):
    import io

    from PIL import Image

    url, _ = server
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    cases = [
        ("/v1/models/shapes/bottleneck:predict", b"not an image at all", 400, "not_an_image"),
        ("/v1/models/shapes/bottleneck:predict", b"", 400, "empty body"),
        ("/v1/models/shapes/bottleneck:predict", b"\0" * (2 * 1024 * 1024), 413, "limit"),
        ("/v1/models/shapes/bottleneck:predict", bomb.getvalue(), 413, "too_large"),
        ("/v1/models/shapes/nothing:predict", b"x", 404, "no model 'shapes-nothing'"),
        ("/v2/models/shapes-bottleneck/infer", b"{not json", 400, "expected"),
    ]
    for path, body, code, text in cases:
        status, answer = http(url + path, body)
        assert status == code and text in answer["error"] and "\n" not in answer["error"], answer
    good = next((runs / "data" / "shapes" / "circles").glob("*.jpg")).read_bytes()
    assert http(f"{url}/v1/models/shapes/bottleneck:predict", good)[0] == 200


def test_overload_is_refused_with_503_not_queued_without_end(server, runs):
    url, _ = server
    good = next((runs / "data" / "shapes" / "squares").glob("*.jpg")).read_bytes()
    with ThreadPoolExecutor(120) as pool:  # far past 32 in flight + 4 queued
        call = lambda _: http(f"{url}/v1/models/shapes/bottleneck:predict", good)[0]  # noqa: E731
        statuses = list(pool.map(call, range(240)))
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
    assert http(f"{url}/v1/models/shapes/bottleneck:predict", good)[0] == 200


def test_it_declines_images_unlike_any_it_learned_and_answers_its_own(server, runs, tmp_path):
    url, _ = server
    model = runs / "runs" / "shapes" / "bottleneck" / "model.keras"
    metrics = json.loads((model.parent / "metrics.json").read_text())
    abstain = metrics["abstain"]  # chosen on the out-of-fold images, for 5% of them
    assert abstain["chosen_on"] == "out-of-fold" and abstain["rate"] == 0.05
    assert abstain["max_distance"] > 0 and (model.parent / "embeddings.npy").exists()
    strange = sorted(write_out_of_distribution(tmp_path / "strange").iterdir())
    own = sorted((runs / "data" / "shapes").rglob("*.jpg"))
    predicted = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "predict", str(model), str(tmp_path / "strange"),
         *map(str, own), "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    answers = {Path(p["path"]).name: p for p in json.loads(predicted.stdout)}
    declined = [answers[p.name] for p in strange if answers[p.name]["abstained"]]
    assert len(declined) >= 0.9 * len(strange), [a["path"] for a in answers.values()]
    assert all(a["label"] == "" and a["reason"] in ("out_of_distribution", "low_confidence")
               and a["probabilities"] for a in declined)  # fmt: skip
    answered = [answers[p.name] for p in own if not answers[p.name]["abstained"]]
    assert len(answered) >= 0.9 * len(own) and all(a["label"] for a in answered)
    # --no-abstain: every image gets a label again
    plain = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "predict", str(model), str(strange[0]),
         "--no-abstain", "--format", "csv"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    header, row = plain.stdout.strip().splitlines()
    assert header.split(",")[-3:] == ["abstained", "reason", "error"]
    assert row.split(",")[1] in ("circles", "squares") and row.split(",")[-3] == "false"
    # wf serve answers the same: no label, the reason, the probabilities still there
    for path in strange[:6]:
        status, answer = http(f"{url}/v1/models/shapes/bottleneck:predict", path.read_bytes())
        expected = answers[path.name]
        assert status == 200 and answer["abstained"] == expected["abstained"]
        assert answer["reason"] == expected["reason"]
        assert (answer["label"] is None) == expected["abstained"]
        assert set(answer["probabilities"]) == {"circles", "squares"}
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in strange[:2]]
    payload = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": encoded}]}
    status, out = http(f"{url}/v2/models/shapes-bottleneck/infer", json.dumps(payload).encode())
    named = {o["name"]: o for o in out["outputs"]}
    assert status == 200 and named["abstained"]["data"] == [
        answers[p.name]["abstained"] for p in strange[:2]]  # fmt: skip
    # A model copied without its embeddings.npy: --max-distance is a one-line error, and the
    # confidence threshold alone still works.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.keras", "classes.json", "metrics.json"):
        (bare / name).write_bytes((model.parent / name).read_bytes())
    from storage.errors import SettingsError
    from workflows.serve.predict import Thresholds, predict_paths

    with pytest.raises(SettingsError, match=r"--max-distance needs the run's embeddings\.npy"):
        predict_paths(str(bare / "model.keras"), [str(strange[0])], Thresholds(max_distance=0.5))
    (answer,) = predict_paths(str(bare / "model.keras"), [str(strange[0])],
                              Thresholds(min_confidence=1.0))  # fmt: skip
    assert answer.abstained and answer.reason == "low_confidence" and answer.label == ""


def test_replicas_run_the_model_exported_to_onnx_with_keras_answers(runs, tmp_path):
    from tasks.classifier import load_trained_model
    from tasks.images import load_image

    keras_one = load_trained_model(str(runs / "runs" / "shapes" / "bottleneck" / "model.keras"))
    onnx_one, kept = keras_one.on_onnxruntime()  # what each replica does by default
    assert kept == "" and onnx_one.runtime == "onnxruntime" and keras_one.runtime == "keras"
    assert onnx_one.embedding is not None  # the distance to the labelled images comes along
    photos = [*sorted((runs / "data" / "shapes").rglob("*.jpg"))[:6],
              *sorted(write_out_of_distribution(tmp_path / "strange").iterdir())[:4]]  # fmt: skip
    pixels = np.stack([load_image(pafs.LocalFileSystem(), str(p), keras_one.input_size)
                       for p in photos])  # fmt: skip
    for ours, theirs in zip(onnx_one.answer(pixels), keras_one.answer(pixels), strict=True):
        np.testing.assert_allclose(ours.probabilities, theirs.probabilities, atol=1e-4)
        assert (ours.abstained, ours.reason) == (theirs.abstained, theirs.reason)
    assert any(a.abstained for a in keras_one.answer(pixels))  # the strange ones are declined
