"""Export time and size per format for the demo model (SmolLM2-135M-Instruct) with a LoRA adapter of the demo's
shape (demo.yaml's lora section, random non-zero weights): `raysft export --format ...` one format at a time,
and the demo's own step (merged bf16 + GGUF F16 from one merge).

    python tests/benchmarks/bench_export.py [--repeats 3]

Needs the demo model fetched (`raysft models fetch smollm2-135m-instruct`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [
    ("peft", None, None),
    ("merged", "bf16", None),
    ("merged", "f32", None),
    ("gguf", "f16", None),
    ("gguf", "f32", None),
    ("gguf", None, "q8_0"),
]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    from test_export import make_run

    from raysft.pipeline.demo.run import DEMO_MODEL
    from raysft.pipeline.models.export import export_many, export_run
    from raysft.pipeline.models.fetch import default_model_dir, is_fetched

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    base = default_model_dir(DEMO_MODEL)
    if not is_fetched(base):
        sys.exit(f"fetch the demo model first: raysft models fetch {DEMO_MODEL}")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run = make_run(base, Path(tmp) / "run", std=0.01, **{"lora.r": 16, "lora.alpha": 32})
        rows = []
        for fmt, dtype, quant in CASES:
            times, size = [], 0
            for _ in range(args.repeats):
                out = Path(tmp) / "out"
                t = time.perf_counter()
                export_run(run, format=fmt, dtype=dtype, quant=quant, output=out)
                times.append(time.perf_counter() - t)
                size = _size(out)
                shutil.rmtree(out)
            rows.append((f"{fmt} {quant or dtype or ''}".strip(), statistics.median(times), size))
        times, size = [], 0
        for _ in range(args.repeats):
            outs = [Path(tmp) / "m", Path(tmp) / "g"]
            t = time.perf_counter()
            export_many(run, [("merged", None, None, outs[0]), ("gguf", None, None, outs[1])])
            times.append(time.perf_counter() - t)
            size = sum(_size(o) for o in outs)
            for o in outs:
                shutil.rmtree(o)
        rows.append(("demo step: merged bf16 + gguf f16, one merge", statistics.median(times), size))
    print(f"| format | seconds (median of {args.repeats}) | size MB |")
    print("| --- | --- | --- |")
    for name, sec, size in rows:
        print(f"| {name} | {sec:.1f} | {size / 1e6:.1f} |")


if __name__ == "__main__":
    main()
