"""Fused linear cross-entropy needs far less memory than logits + torch cross_entropy.

Measured on CPU as the peak extra resident memory (VmHWM after a reset) of one forward+backward,
each method in a fresh process, by `tests/benchmarks/bench_kernels.py --cpu-memory` (the same script
records the 8k tokens x 32k vocab numbers in BENCHMARKS.md). Here at a shape that runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent / "benchmarks" / "bench_kernels.py"


def test_fused_cross_entropy_peak_memory_at_least_4x_lower():
    pytest.importorskip("triton")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    cmd = [
        sys.executable,
        str(BENCH),
        "--cpu-memory",
        "--tokens",
        "1024",
        "--vocab",
        "8192",
        "--hidden",
        "64",
        "--methods",
        "torch",
        "chunked",
        "triton",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout)
    results = {r["method"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["results"]}
    torch_peak = results["torch"]["peak_extra_mib"]
    assert torch_peak > 64  # logits, log-softmax and their gradient: 3 x 32 MiB at least
    assert results["triton"]["triton"] and not results["chunked"]["triton"]
    for method in ("chunked", "triton"):
        assert abs(results[method]["loss"] - results["torch"]["loss"]) < 1e-4
        assert torch_peak >= 4 * results[method]["peak_extra_mib"], results
