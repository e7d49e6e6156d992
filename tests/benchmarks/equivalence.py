"""Outputs unchanged by a refactor: the same prepared shards (byte for byte) and the same adapter (within 1e-6)
from two checkouts of raysft, on the demo data, with the demo model's tokenizer and one real tokenizer from
/work/shared/tokenizers.

    git worktree add /tmp/raysft-base a3add22          # the checkout to compare against
    python tests/benchmarks/equivalence.py --base /tmp/raysft-base --out /tmp/raysft-equivalence

Each side runs in its own process from a scratch working directory, with `raysft.pipeline` / `raysft.kernels`
imported from its checkout (a PYTHONPATH folder whose raysft/ links to that checkout's pipeline/ and kernels/, found
before the editable install); both use this virtualenv's packages and start their own local Ray instance. The data
is generated once (demo/task.py, seeded) and read by both. Per side:
  - `prepare` of the demo data with the demo model's tokenizer (SmolLM2-135M-Instruct, ~/.cache/raysft/models, as
    `raysft models fetch smollm2-135m-instruct` leaves it) and with qwen2.5-instruct (a real 151,665-token
    byte-level BPE, tokenizer only);
  - `train` of the demo model (NF4, float32 compute: the config states every dtype, so `auto` does not decide)
    for a few steps with 1 worker.
Compared: every file of each prepared output (train/, eval/ shards and _index.json) byte for byte, stats.json
without its wall-clock `seconds`; every tensor of the two adapters (max |a - b| <= 1e-6).
Exit 0 when everything matches; the report is printed and written to OUT/equivalence.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DEMO_MODEL = Path("~/.cache/raysft/models/smollm2-135m-instruct").expanduser()
REAL_TOKENIZER = Path("/work/shared/tokenizers/qwen2.5-instruct")
STEPS = 4
TOLERANCE = 1e-6


def side_config(side_out: Path, data: Path, tokenizer: Path | None, name: str):
    from raysft.pipeline.config import load_config

    over = {
        "model.name_or_path": str(DEMO_MODEL),
        "model.quantization": "nf4",
        "model.dtype": "float32",
        "model.compute_dtype": "float32",
        "model.gradient_checkpointing": True,
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "data.train": str(data / "train.jsonl"),
        "data.eval": str(data / "eval.jsonl"),
        "data.format": "messages",
        "data.max_seq_len": 512,
        "data.system_prompt": "Rewrite dates.",
        "data.num_tokenizer_actors": 1,
        "data.cache_dir": str(side_out / "cache"),
        "train.max_steps": STEPS,
        "train.lr": 5.0e-4,
        "train.warmup_steps": 1,
        "train.eval_every": STEPS,
        "train.save_every": STEPS,
        "train.keep_checkpoints": 1,
        "train.logging.tensorboard": False,
        "train.deepspeed.stage": 2,
        "scaling.num_workers": 1,
        "run.name": name,
        "run.storage_path": str(side_out / "runs"),
        "run.max_failures": 0,
    }
    if tokenizer is not None:
        over["model.tokenizer"] = str(tokenizer)
    return load_config(None, overrides=over)


def run_side(side_out: Path, data: Path) -> None:
    """In the side's own process: prepare twice and train once with the checkout on PYTHONPATH."""
    import raysft.pipeline
    from raysft.pipeline import prepare, train

    print(f"[side] raysft.pipeline from {Path(raysft.pipeline.__file__).parent}", flush=True)
    for label, tokenizer in (("smollm2", None), ("qwen2.5", REAL_TOKENIZER)):
        prepare(side_config(side_out, data, tokenizer, label), output=str(side_out / "prepared" / label))
    result = train(side_config(side_out, data, None, "train"))
    (side_out / "adapter_path").write_text(str(result.adapter_path))


def launch(checkout: Path, out: Path, data: Path, name: str) -> Path:
    """Run one side in its own process; a side that finished before (OUT/NAME/adapter_path) is reused."""
    side_out = out / name
    if (side_out / "adapter_path").is_file():
        return side_out
    side_out.mkdir(parents=True, exist_ok=True)
    shim = out / f"{name}-path" / "raysft"
    shim.mkdir(parents=True, exist_ok=True)
    for part in ("pipeline", "kernels"):
        link = shim / part
        if not link.exists():
            link.symlink_to(checkout / part, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(shim.parent), "HF_HUB_OFFLINE": "1"}
    log = side_out / "side.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--side", str(side_out), "--data", str(data)],
            cwd=side_out,  # not a checkout root: its kernels/ folder must not shadow PyPI's kernels package
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{name} side failed (exit {proc.returncode}); see {log}")
    first = log.read_text().splitlines()[0]
    assert str(checkout / "pipeline") in first or str(shim / "pipeline") in first, first
    return side_out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_prepared(a: Path, b: Path) -> dict:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    differ = []
    for rel in sorted(set(files_a) | set(files_b)):
        pa_, pb_ = a / rel, b / rel
        if not (pa_.is_file() and pb_.is_file()):
            differ.append(f"{rel}: only on one side")
        elif rel.endswith("stats.json"):
            sa, sb = (json.loads(p.read_text()) for p in (pa_, pb_))
            sa.pop("seconds", None)
            sb.pop("seconds", None)
            if sa != sb:
                differ.append(f"{rel}: counters differ")
        elif digest(pa_) != digest(pb_):
            differ.append(f"{rel}: bytes differ{_same_rows_note(pa_, pb_)}")
    shards = [f for f in files_a if f.endswith(".parquet")]
    return {"files": len(files_a), "parquet_shards": len(shards), "differ": differ}


def _same_rows_note(a: Path, b: Path) -> str:
    """For a shard whose bytes differ: whether the rows still match (values, schema and its metadata), which
    separates a change of the file format (e.g. page checksums) from a change of the prepared data."""
    if a.suffix != ".parquet":
        return ""
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    same = ta.equals(tb) and ta.schema.metadata == tb.schema.metadata
    return " (rows, schema and metadata equal)" if same else " (ROWS DIFFER)"


def compare_adapters(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(ta) != set(tb):
        return {"tensors": len(ta), "max_abs_diff": None, "differ": ["tensor names differ"]}
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    return {"tensors": len(ta), "max_abs_diff": worst, "differ": [] if worst <= TOLERANCE else ["weights differ"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="the checkout to compare against (e.g. a worktree of a3add22)")
    p.add_argument("--head", type=Path, default=REPO, help="the checkout under test (default: this one)")
    p.add_argument("--out", type=Path, default=Path("/tmp/raysft-equivalence"))
    p.add_argument("--side", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side is not None:
        run_side(args.side, args.data)
        return 0
    out = args.out.resolve()
    data = out / "data"
    if not (data / "train.jsonl").is_file():
        from raysft.pipeline.demo.task import write_task

        write_task(data, n_train=64, n_eval=16, seed=0)
    base = launch(args.base.resolve(), out, data, "base")
    head = launch(args.head.resolve(), out, data, "head")
    report = {
        "base": str(args.base.resolve()),
        "head": str(args.head.resolve()),
        "prepared": {
            label: compare_prepared(base / "prepared" / label, head / "prepared" / label)
            for label in ("smollm2", "qwen2.5")
        },
        "adapter": compare_adapters(
            Path((base / "adapter_path").read_text()), Path((head / "adapter_path").read_text())
        ),
    }
    text = json.dumps(report, indent=2)
    (out / "equivalence.json").write_text(text + "\n")
    print(text)
    same = not any(r["differ"] for r in report["prepared"].values()) and not report["adapter"]["differ"]
    print("equivalent" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
