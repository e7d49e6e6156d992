"""A Ray Tune sweep over LoRA rank and learning rate through the Python API.

    python examples/api_tune.py [--trials 4] [--steps 20] [--output runs/api-tune]

Same as `raysft tune` on the demo config with this search space; prints the results table and
the best trial (its adapter is in the sweep folder). Sweep configs: see examples/sweep_*.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raysft.pipeline import load_config, tune
from raysft.pipeline.demo.task import write_task
from raysft.pipeline.models.fetch import fetch_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", default="runs/api-tune")
    args = ap.parse_args()
    out = Path(args.output).resolve()

    train_file, eval_file = write_task(out / "data", n_train=600, n_eval=32)
    cfg = load_config(
        Path(__file__).with_name("demo.yaml"),
        overrides={
            "model.name_or_path": str(fetch_model("smollm2-135m-instruct")),
            "data.train": str(train_file),
            "data.eval": str(eval_file),
            "train.max_steps": args.steps,
            "train.eval_every": max(1, args.steps // 4),
            "train.save_every": args.steps,
            "scaling.num_workers": 1,  # one worker per trial: trials run side by side
            "run.storage_path": str(out),
            "run.name": "sweep",
            "tune.search_space": {"lora.r": {"choice": [8, 16]}, "train.lr": {"loguniform": [1.0e-4, 2.0e-3]}},
            "tune.num_samples": args.trials,
            "tune.scheduler": "asha",
            "tune.metric": "eval_loss",
            "tune.mode": "min",
        },
    )
    sweep = tune(cfg)
    for row in sweep.table:
        print(row)
    print(sweep.summary_line())


if __name__ == "__main__":
    main()
