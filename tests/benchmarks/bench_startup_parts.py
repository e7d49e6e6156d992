"""CPU seconds of the fixed start costs raysft controls, each in a fresh interpreter (no Ray started).

    python tests/benchmarks/bench_startup_parts.py --python PYTHON --config tiny.yaml [--repeat 5]

PYTHON is the interpreter of the raysft checkout to measure (run it once with main's venv and once with this
branch's for a before/after). Parts:
- hook: importing and running the worker_process_setup_hook (`raysft.pipeline.import_guard.install`), which every
  Ray worker process raysft starts runs first;
- preflight: `trainer.preflight` + `data.plan.resolve_inputs` on the driver, after the imports `raysft train` makes
  anyway (the tokenizer spec cached by an earlier run);
- lora_none: `models.load.build_model` with `model.quantization: none`, after torch + transformers + peft are
  imported (what a worker pays on top of them).
Prints one JSON line per part: the median and every run's CPU seconds of the part alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

HOOK = """
import resource
from raysft.pipeline import import_guard
import_guard.install()
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime)
"""

PREFLIGHT = """
import resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
from raysft.pipeline.config import load_config
from raysft.pipeline import trainer
from raysft.pipeline.data.plan import resolve_inputs
cfg = load_config(sys.argv[1])
c = cpu()
resolve_inputs(trainer.preflight(cfg))
print(cpu() - c)
"""

LORA_NONE = """
import resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
import torch, transformers, peft
from transformers import AutoModelForCausalLM
from raysft.pipeline.config import load_config
from raysft.pipeline.models.load import build_model
cfg = load_config(sys.argv[1], overrides=["model.quantization=none", "model.dtype=float32"])
c = cpu()
build_model(cfg, device="cpu")
print(cpu() - c)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--parts", default="hook,preflight,lora_none")
    args = ap.parse_args()
    codes = {"hook": HOOK, "preflight": PREFLIGHT, "lora_none": LORA_NONE}
    for part in args.parts.split(","):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [args.python, "-c", codes[part], args.config], capture_output=True, text=True, check=True
            ).stdout
            runs.append(round(float(out.split()[-1]), 2))
        print(json.dumps({"part": part, "python": args.python, "median_cpu_s": statistics.median(runs), "runs": runs}))


if __name__ == "__main__":
    main()
