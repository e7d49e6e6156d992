"""The suite's one Ray Tune grid sweep of the tiny model (conftest's `shared_sweep`, run once per session).

Every sweep costs a Tune controller and, per trial, a trial actor, a TrainController and a worker group (about a
minute each on 2 cores), so the sweep tests of test_tune, test_tracking and test_generate_eval check the outputs of
this single sweep, each in its own test: 2 LoRA ranks x 2 learning rates (alpha_rule 2r), 4 steps with an eval at
steps 2 and 4, MLflow tracking on (a parent run with a child per trial), and a generation eval at step 4 scored by a
user metric from a .py file, which is the sweep's tune.metric (mode max)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiny import addition_rows

NAME = "grid"
PROJECT = "raysft-sweeps"
RANKS = [4, 8]
LRS = [0.03, 0.003]
STEPS = 4
METRIC = "gen_char_code"

CHAR_CODE_METRIC = '''
def char_code(replies, references):
    """A number that depends on every character of every reply (so two trials almost surely differ)."""
    return (sum(ord(c) for r in replies for c in r) % 1009) / 1009.0
'''


def char_code(replies: list[str]) -> float:
    """What CHAR_CODE_METRIC computes, for the tests to check the logged values against."""
    return (sum(ord(c) for r in replies for c in r) % 1009) / 1009.0


@dataclass
class SharedSweep:
    result: object  # raysft.pipeline.sweep.report.SweepResult
    storage: Path  # its run.storage_path (the sweep folder is storage / NAME)
    cache_dir: Path  # its data.cache_dir

    @property
    def sweep_dir(self) -> Path:
        return Path(self.result.sweep_dir)


def tiny_sweep_base(root: Path, model_dir: Path) -> dict:
    """Config (as a dict) for 4-step trials of the tiny model on 1 worker, sharing one data cache under `root`
    (its train.jsonl is written there): the base of the shared sweep and of test_tune's own sweeps."""
    rows = addition_rows(60, answer=lambda a, b: f"{a} plus {b} equals {a + b}")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": {
            "name_or_path": str(model_dir),
            "quantization": "none",
            "dtype": "float32",
            "gradient_checkpointing": False,
        },
        "lora": {"r": 4, "dropout": 0.0},
        "data": {
            "train": str(root / "train.jsonl"),
            "eval_split": 0.2,
            "max_seq_len": 128,
            "cache_dir": str(root / "cache"),
            "num_tokenizer_actors": 1,
        },
        "train": {"max_steps": STEPS, "eval_every": 2, "save_every": 2, "logging": {"tensorboard": False}},
        "scaling": {"num_workers": 1},
        "run": {"storage_path": str(root / "runs"), "max_failures": 0},
    }


def run_shared_sweep(root: Path, storage: Path, model_dir: Path, mlflow_uri: str) -> SharedSweep:
    from raysft.pipeline import tune
    from raysft.pipeline.config import load_config

    base = tiny_sweep_base(root, model_dir)
    (root / "held.jsonl").write_text(
        "".join(line + "\n" for line in (root / "train.jsonl").read_text().splitlines()[:4])
    )
    (root / "metric.py").write_text(CHAR_CODE_METRIC)
    train = base["train"]
    train["logging"].update(mlflow=True, mlflow_tracking_uri=mlflow_uri, project=PROJECT)
    train["eval_generate"] = {
        "prompts": str(root / "held.jsonl"),
        "every": STEPS,  # once, at the last step
        "max_new_tokens": 8,
        "metric": f"{root / 'metric.py'}:char_code",
    }
    base["run"] = {"storage_path": str(storage), "name": NAME, "max_failures": 0}
    base["tune"] = {
        "search_space": {"lora.r": RANKS, "train.lr": LRS},
        "search_alg": "grid",
        "scheduler": "none",
        "alpha_rule": "2r",
        "metric": METRIC,
        "mode": "max",
    }
    cfg = load_config(overrides=base)
    return SharedSweep(tune(cfg), storage, root / "cache")
