"""wf's own output only: the start-up chatter of TensorFlow's C++ core (absl's pre-init
warning, CUDA probing on a machine without a GPU, CPU feature notes, the XNNPACK banner) is
dropped from this process's stderr.

Those lines are written by native code straight to file descriptor 2, past Python's logging
and past ``TF_CPP_MIN_LOG_LEVEL`` (tensorflow/tensorflow#100442). So fd 2 becomes a pipe read by
a thread that forwards every line except the known noise; Python's own ``sys.stderr`` keeps
writing to the real stream, so rich still sees a terminal. ``--verbose`` leaves all of it alone.
Ray's workers write to their own log files, not here.
"""

from __future__ import annotations

import os
import re
import sys
import threading

NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "  # absl's native log lines
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] "  # TF's older native format
    r"|INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|fully_quantize: \d+, inference_type: \d+"  # the TFLite quantiser's note
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)


def is_noise(line: str) -> bool:
    return bool(NOISE.match(line))


_installed = False


def filter_native_stderr() -> None:
    """Route fd 2 through the noise filter for the rest of this process (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(os.dup(real), "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115

    def forward() -> None:
        with open(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not is_noise(line.decode("utf-8", "replace")):
                        os.write(real, line + b"\n")
            if pending and not is_noise(pending.decode("utf-8", "replace")):
                os.write(real, pending)

    threading.Thread(target=forward, daemon=True, name="wf-stderr-filter").start()
