"""The GPU acceptance script's plumbing on CPU: `gpu_acceptance.sh --dry-run --no-wheels` runs the Ray-free
loop stages (torchrun entry, NF4 + ZeRO-2, kernels off and on, eval, checkpoint and resume) on gloo with
`ray` made unimportable, and writes its one report. The wheel download of the full dry run needs PyPI
and is not part of the tests (README: GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_the_loop_without_ray_and_writes_one_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)  # the script maps raysft.* to this checkout itself
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "tests/benchmarks/gpu_acceptance.sh"), "--dry-run", "--no-wheels", "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=800,
    )
    report = (out / "gpu_acceptance.md").read_text() if (out / "gpu_acceptance.md").is_file() else proc.stdout
    assert proc.returncode == 0, report[-6000:] + proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["gpu_acceptance.md"]
    for stage in (
        "torchrun loop, NF4 + ZeRO-2, kernels-off, gloo | pass",
        "kernels-on, gloo | pass",
        "checkpoint + resume (lost last checkpoint) | pass",
        "kernels on vs off (final eval loss) | pass",
    ):
        assert stage in report, report
