"""The real ``wf`` command: its one-line errors and exit codes, its help, the demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_dataset
from tests.onnx_models import conv_model, custom_op_model, rank3_input_model
from tests.tasks.test_pth_reader import crafted

ROOT = Path(__file__).resolve().parents[2]
WF = [sys.executable, "-m", "workflows.cli"]


def wf(*args: str, timeout: int = 600, columns: int = 200, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": str(columns), "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([*WF, *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=ROOT)  # fmt: skip


def _safe_mode_refused_model(folder: Path) -> Path:
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(folder / "model.keras")
    (folder / "classes.json").write_text('["a", "b"]')
    return folder / "model.keras"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_dataset(root / "d", ("a", "b"), 2, size=16)
    (root / "afile").write_text("x")
    (root / "evil.pth").write_bytes(crafted({"w": (0, (2, 4), (4, 1))}))
    (root / "m").mkdir()
    _safe_mode_refused_model(root / "m")
    (root / "s" / "d" / "bb").mkdir(parents=True)
    (root / "s" / "d" / "bb" / "manifest.json").write_text("[1, 2, 3]")
    conv_model(root / "onnx" / "good.onnx")
    conv_model(root / "onnx" / "noout.onnx", sidecar={"name": "x", "input_size": [32, 32],
                                                      "output": "logits"})  # fmt: skip
    custom_op_model(root / "onnx" / "custom.onnx")
    rank3_input_model(root / "onnx" / "rank3.onnx")
    (root / "onnx" / "junk.onnx").write_bytes(b"not a model at all")
    (root / "onnx" / "junk.onnx.json").write_text('{"name": "junk", "input_size": [32, 32]}')
    return root


ERRORS = [
    # (arguments, exit code, text in the message)
    (["extract", "/no/such/folder"], 2, "is not a folder"),
    (["extract", "{root}/d", "--backbone", "resnet9000"], 2, "unknown backbone"),
    (["extract", "{root}/d", "--shards", "0"], 2, "--shards must be"),
    (["extract", "{root}/d", "--weights", "/no/weights.h5"], 2, "existing file"),
    (["extract"], 2, "no dataset given"),
    (["extract", "{root}/d", "--store", "{root}/afile"], 2, "cannot write to"),
    (["extract", "{root}/d", "--store", "{root}/afile/store"], 2, "cannot write to"),
    (["extract", "{root}/d", "--store", "/proc/wf-store"], 2, "cannot write to"),
    (
        ["extract", "{root}/d", "--weights", "{root}/evil.pth", "--store", "{root}/w"],
        2,
        "reach past its storage",
    ),
    (["extract", "{root}/d", "--shardz", "3"], 2, "No such option"),
    # A bad ONNX backbone is refused in one line before any shard runs.
    (
        ["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/junk.onnx"],
        2,
        "is not an ONNX model",
    ),
    (["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/custom.onnx"], 2, "uses custom ops"),
    (["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/rank3.onnx"], 2, "has rank 3, not 4"),
    (["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/noout.onnx"], 2, "no output 'logits'"),
    (["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/none.onnx"], 2, "does not exist"),
    (
        ["extract", "{root}/d", "--backbone", "onnx:{root}/onnx/good.onnx", "--runtime", "keras"],
        2,
        "runs in onnxruntime, not keras",
    ),
    (["extract", "{root}/d", "--runtime", "onnxruntime"], 2, "runs ONNX models"),
    (["train-all", "--store", "{root}/nothing"], 2, "no feature store"),
    (["train-all", "--store", "{root}/s", "--methods", "bottlenek"], 2, "unknown method"),
    (["train-all", "--store", "{root}/s", "--epochs-for", "finetune"], 2, "METHOD=VALUE"),
    (["train-all", "--store", "{root}/s", "--runs", "{root}/r"], 1, "expected a JSON object"),
    (["train-all", "--store", "{root}/s", "--cv", "1"], 2, "--cv takes 0 (off) or at least 2"),
    (["train-all", "--store", "{root}/s", "--abstain-rate", "1.5"], 2, "--abstain-rate must be"),
    (["train-all", "--store", "{root}/s", "--ensemble", "sometimes"], 2, "--ensemble takes off"),
    (
        ["train-all", "--store", "{root}/s", "--methods", "scratch", "--scratch-image-size", "8"],
        2,
        "--scratch-image-size must be at least 32 (scratch), not 8",
    ),
    (["suggest", "--store", "{root}/s", "--budget", "0"], 2, "--budget must be at least 1"),
    (["suggest", "--store", "{root}/s", "--method", "finetune"], 2, "use bottleneck or prototype"),
    (["suggest", "--store", "{root}/nostore"], 2, "no efficientnet_lite0 feature store"),
    (["label", "{root}/d", "{root}/no.csv"], 2, "no.csv: cannot read it"),
    (["predict", "{root}/m/model.keras", "{root}/d"], 2, "cannot load model"),
    (["predict", "{root}/nomodel.keras", "{root}/d"], 2, "does not exist"),
    (
        ["predict", "{root}/m/model.keras", "{root}/d", "--min-confidence", "1.5"],
        2,
        "Input should be less than or equal to 1",
    ),
    (["evaluate", "{root}/m/model.keras", "/no/folder"], 2, "is not a folder"),
    (["verify"], 2, "name a STORE"),
    (["audit", "--store", "{root}/nothing"], 2, "no efficientnet_lite0 feature store"),
    (["audit", "--store", "{root}/s", "--fail-on", "leaks"], 2, "--fail-on takes"),
    (["serve", "--runs", "{root}/r", "--max-queued", "0"], 2, "--max-queued must be >= 1"),
    (["serve", "--runs", "{root}/r", "--runtime", "tf"], 2, "--runtime must be onnx or keras"),
]


# Runs each case's argv through ``workflows.cli.main.main`` in a fork of one process that has
# imported wf once: each case is still a process of its own (its exit code, its stdout and
# stderr file descriptors, native stderr filtered), without a Python start-up per case.
_FORKED = r"""
import json, os, sys
import workflows.cli.main
import keras, pyarrow.parquet, ray, tensorflow  # what most commands import; no thread runs yet
cases, folder = json.loads(sys.stdin.read())
codes = []
for index, argv in enumerate(cases):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{folder}/{index}.{name}", os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = ["python -m workflows.cli", *argv]
        code = 0
        try:
            workflows.cli.main.main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def wf_forked(cases: list[list[str]], folder: Path, columns: int = 200) -> list:
    """``wf`` with each argv of ``cases``, each in a fork of one process (:data:`_FORKED`)."""
    environment = {**os.environ, "COLUMNS": str(columns), "TF_CPP_MIN_LOG_LEVEL": "3"}
    environment.pop("RAY_ADDRESS", None)
    given = json.dumps([cases, str(folder)])
    done = subprocess.run([sys.executable, "-c", _FORKED], input=given, capture_output=True,
                          text=True, timeout=900, env=environment, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess(cases[i], code, (folder / f"{i}.out").read_text(),
                                        (folder / f"{i}.err").read_text())
            for i, code in enumerate(codes)]  # fmt: skip


@pytest.fixture(scope="module")
def errors_run(inputs, tmp_path_factory):
    """Every case of :data:`ERRORS`, run once, in order."""
    cases = [[a.format(root=inputs) for a in args] for args, _, _ in ERRORS]
    return wf_forked(cases, tmp_path_factory.mktemp("errors"))


@pytest.mark.parametrize(
    ("index", "code", "message"), [(i, c, m) for i, (_, c, m) in enumerate(ERRORS)],
    ids=[" ".join(a[:3]) for a, _, _ in ERRORS],
)  # fmt: skip
def test_every_error_is_one_line_with_its_exit_code(errors_run, index, code, message):
    result = errors_run[index]
    assert result.returncode == code, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or code == 1, result.stderr  # a failed run names each failure
    assert lines[-1].startswith("error") or "Usage" in result.stderr


def test_debug_shows_the_traceback(inputs):
    result = wf("--debug", "extract", str(inputs / "d"), "--store", str(inputs / "afile"))
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_help_documents_every_option_with_its_default_and_an_example(tmp_path):
    commands = ("extract", "train-all", "predict", "evaluate", "verify", "backbones", "methods",
                "demo", "suggest", "label", "audit", "serve")  # fmt: skip
    result, *others = wf_forked([[c, "--help"] for c in commands], tmp_path)
    assert result.returncode == 0
    for option in ("--shards", "--augment", "--backbone", "--weights", "--store", "--address",
                   "--config", "--taps", "--dtype", "--runtime", "--wait", "Example:"):  # fmt: skip
        assert option in result.stdout
    assert "(default: 8)" in " ".join(result.stdout.split())  # generated from the settings
    assert "TOML file of [[datasets]]" in result.stdout and "<bool>" not in result.stdout
    for command, shown in zip(commands[1:], others, strict=True):
        assert shown.returncode == 0 and "Example:" in shown.stdout, command


def test_methods_and_backbones_list_the_registries_whole_at_80_columns():
    listed = wf("methods", columns=80).stdout
    assert "…" not in listed and max(map(len, listed.splitlines())) <= 80
    for name in ("bottleneck", "finetune", "scratch", "fusion"):
        assert name in listed
    assert "efficientnet_lite2" in wf("backbones").stdout


NOISE = ("absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers",
         "cuInit", "Token authentication is enabled", "PYTHON worker processes have been started",
         "XNNPACK delegate", "cpu_feature_guard",
         "This TensorFlow binary is optimized")  # fmt: skip


@pytest.mark.slow
def test_demo_runs_on_a_fresh_machine_quietly_in_80_columns(tmp_path, cache_dir):
    # The README's main job, end to end in its own process, with fewer epochs and shards, its
    # output piped (as in a CI log) into 80 columns: wf's own lines only, no cell cut short.
    result = wf("demo", "--dir", str(tmp_path / "demo"), "--images-per-class", "8",
                "--epochs", "2", "--shards", "2", "--num-cpus", "2", "--cache-dir", cache_dir,
                columns=80)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in printed] == []
    assert "…" not in result.stdout
    # Every line fits 80 columns but the commands to copy, which are never wrapped.
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 or line.startswith(("  wf ", "  curl ")) for line in lines)
    curl = [line for line in lines if line.startswith("  curl ")]
    assert len(curl) == 1 and curl[0].endswith("/v1/models/shapes/finetune:predict")
    assert any(line.strip().startswith("dataset") and "method" in line for line in lines)  # a table
    for word in ("bottleneck", "finetune", "scratch", "val accuracy", "summary.html", "wf predict"):
        assert word in result.stdout, word
    assert (
        tmp_path / "demo" / "store" / "shapes" / "efficientnet_lite0" / "manifest.json"
    ).exists()
    summary = (tmp_path / "demo" / "runs" / "summary.md").read_text()
    for method in ("bottleneck", "finetune", "scratch"):
        assert f"| shapes | {method} | done |" in summary, summary


@pytest.mark.slow
def test_extract_json_and_the_store_verified_by_wf_verify(tmp_path, cache_dir):
    data = make_dataset(tmp_path / "toys", ("balls", "blocks"), 6, size=40)
    (data / "blocks" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    store = tmp_path / "store"
    result = wf("extract", str(data), "--shards", "2", "--store", str(store), "--image-size", "48",
                "--cache-dir", cache_dir, "--num-cpus", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = json.loads(result.stdout)
    assert report["rejects"] == 1 and report["images"] == 12 and report["shards_done"] == 4
    checked = wf("verify", str(store))
    assert checked.returncode == 0 and "no problems" in checked.stdout
    part = next((store / "toys" / "efficientnet_lite0" / "train").glob("part-*.parquet"))
    data_bytes = bytearray(part.read_bytes())
    data_bytes[100] ^= 0xFF
    part.write_bytes(bytes(data_bytes))
    broken = wf("verify", str(store))
    assert broken.returncode == 1 and part.name in broken.stderr and "SHA-256" in broken.stderr
