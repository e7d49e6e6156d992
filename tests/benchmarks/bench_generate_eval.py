"""Does generation eval stall training? Step wall time with `train.eval_generate` on vs off, same run settings.

One Ray Train worker (1 CPU) trains a small random Llama (tests/tiny.py's tokenizer, --hidden/--layers) on
packed rows of --seq-len tokens; a checkpoint is saved every --every steps in BOTH runs, and with the eval
on, each of those checkpoints also gets a generation eval (greedy, --prompts prompts x --new-tokens tokens)
as a Ray task holding the machine's other CPU (`ray.init(num_cpus=2)`). The runs go off, on, off, on, ...
(--repeats pairs), each in a fresh local Ray instance.

Step wall time is measured where the worker writes it: a thread in this driver polls the run's
metrics.jsonl every 5 ms and stamps each new step line, so the interval between lines k-1 and k is
everything the loop did for step k: the optimizer step, the report and, at checkpoint steps, the
checkpoint (and with the eval on, handing it to the eval). Reported: the median interval over all steps
after --warmup, the median over checkpoint steps only (where a blocking eval would show), and
"blocked" = (checkpoint-step median - step median) with the eval on, minus the same with it off: the
extra time of an eval step beyond the slowdown all steps share (CPU contention with the eval).

    python tests/benchmarks/bench_generate_eval.py [--steps 40] [--every 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def write_model(directory: Path, hidden: int, layers: int) -> Path:
    import torch
    from tiny import build_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer("chatml")
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def write_data(root: Path, seq_len: int, n_rows: int, n_prompts: int) -> tuple[object, Path]:
    """Packed rows of exactly seq_len tokens (2 samples each), and a prompts file of chat rows."""
    from train_fixtures import IGNORE, Prepared, write_rows

    rng = random.Random(0)
    rows = []
    for i in range(n_rows):
        half = seq_len // 2
        ids = [rng.randrange(10, 500) for _ in range(seq_len)]
        labels = [IGNORE] * 8 + ids[8:half] + [IGNORE] * 8 + ids[half + 8 :]
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": list(range(half)) * 2,
                "seq_lengths": [half, half],
                "source_ids": [2 * i, 2 * i + 1],
            }
        )
    train = write_rows(root / "train", rows)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"what is {a} plus {a + 1}?", "completion": str(2 * a + 1)}) + "\n"
            for a in range(n_prompts)
        )
    )
    return Prepared(train, None, {}), prompts


class LineClock(threading.Thread):
    """Stamps each new metrics.jsonl step line (time.monotonic()) as it appears."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stamps, self.stop = path, {}, threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.stop.is_set():
            if self.path.is_file():
                lines = self.path.read_text().splitlines()
                now = time.monotonic()
                for line in lines[seen:]:
                    if not line.endswith("}"):
                        break
                    m = json.loads(line)
                    if "loss" in m:
                        self.stamps.setdefault(int(m["step"]), now)
                    seen += 1
            time.sleep(0.005)


def one_run(args, model_dir: Path, prepared, prompts: Path, out: Path, eval_on: bool) -> dict:
    import ray

    from raysft.pipeline import ray_runtime
    from raysft.pipeline.config import load_config
    from raysft.pipeline.trainer import build_trainer, finish_run, preflight

    over = {
        "model.name_or_path": str(model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.r": 8,
        "lora.dropout": 0.0,
        "train.max_steps": args.steps,
        "train.save_every": args.every,
        "train.eval_every": 10**6,
        "train.logging.tensorboard": False,
        "train.warmup_steps": 0,
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 1,
        "run.storage_path": str(out),
        "run.name": "on" if eval_on else "off",
        "run.max_failures": 0,
    }
    if eval_on:
        over["train.eval_generate"] = {
            "prompts": str(prompts),
            "every": args.every,
            "max_new_tokens": args.new_tokens,
            "batch_size": 4,
            "num_cpus": 1,
        }
    cfg = preflight(load_config(overrides=over))
    ray_runtime.start(
        "local",
        ray_runtime.Needs(dashboard=True, log_to_driver=False),
        num_cpus=2,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    clock = LineClock(out / over["run.name"] / "metrics.jsonl")
    clock.start()
    try:
        t0 = time.monotonic()
        result = finish_run(cfg, build_trainer(cfg, prepared).fit())
        wall = time.monotonic() - t0
    finally:
        clock.stop.set()
        clock.join()
        ray_runtime.stop()
    assert not ray.is_initialized()
    steps = sorted(clock.stamps)
    intervals = {s: clock.stamps[s] - clock.stamps[s - 1] for s in steps if s - 1 in clock.stamps and s > args.warmup}
    # Step s's interval holds the report (and checkpoint) of step s-1: checkpoint steps are those after one.
    ckpt = [v for s, v in intervals.items() if (s - 1) % args.every == 0]
    gen = [json.loads(x) for x in (result.run_dir / "gen_samples.jsonl").read_text().splitlines()] if eval_on else []
    return {
        "eval": eval_on,
        "median_step_s": statistics.median(intervals.values()),
        "median_ckpt_step_s": statistics.median(ckpt),
        "steps_measured": len(intervals),
        "wall_s": wall,
        "evals": len(gen),
        "median_eval_s": statistics.median(g["seconds"] for g in gen) if gen else None,
        "load_avg": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5, help="checkpoint (and, with the eval on, generate) every N steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="off/on pairs")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    root = Path(tempfile.mkdtemp(prefix="bench-geneval-"))
    model_dir = write_model(root / "model", args.hidden, args.layers)
    prepared, prompts = write_data(root, args.seq_len, n_rows=args.steps, n_prompts=args.prompts)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    results = []
    for i in range(args.repeats):
        for on in (False, True):
            r = one_run(args, model_dir, prepared, prompts, root / f"r{i}", on)
            results.append(r)
            print(json.dumps(r), flush=True)
    off = [r for r in results if not r["eval"]]
    on = [r for r in results if r["eval"]]
    med = statistics.median
    step_off, step_on = med(r["median_step_s"] for r in off), med(r["median_step_s"] for r in on)
    ck_off, ck_on = med(r["median_ckpt_step_s"] for r in off), med(r["median_ckpt_step_s"] for r in on)
    # A checkpoint step costs more than a plain one in both runs (the checkpoint); what the eval adds on top of
    # that, beyond the slowdown every step shows (CPU contention), is the time the loop waited for it.
    blocked = (ck_on - step_on) - (ck_off - step_off)
    print(
        f"median step: off {step_off:.3f} s, on {step_on:.3f} s ({100 * (step_on / step_off - 1):+.1f}%); "
        f"checkpoint steps: off {ck_off:.3f} s, on {ck_on:.3f} s; blocked on the eval per eval step "
        f"{blocked:+.3f} s; one eval took {med(r['median_eval_s'] for r in on):.1f} s"
    )


if __name__ == "__main__":
    main()
