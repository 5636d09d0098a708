"""What machine a benchmark ran on: CPU model, core count and the SIMD flags that change
TensorFlow's and XNNPACK's speed (AVX2 only, or AVX-512), printed beside every table."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def describe() -> dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    present = [flag for flag in FLAGS if flag in flags]
    kind = (
        "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else "neither AVX2 nor AVX-512"
    )
    return {"cpu": model, "cores": os.cpu_count(), "kind": kind, "flags": present}


def banner() -> str:
    facts = describe()
    flags = " ".join(facts["flags"])  # type: ignore[arg-type]
    return f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['kind']} ({flags})"


if __name__ == "__main__":
    print(banner())
