"""Run by tests/test_checkpoint_safety.py in a fresh process (DeepSpeed and torch.distributed stay out of pytest's).

argv: TESTS_DIR MODEL_DIR OUT_DIR CASE... with each CASE STAGE:DTYPE:QUANTIZATION. For each case, in turn (one
process start and one gloo group for all): trains 2 steps, saves a checkpoint, trains 2 more (A); a second engine,
perturbed by one step on other data, loads the checkpoint and trains the same 2 steps (B). Prints one line
`RESULT CASE JSON` per case: the largest difference between A's and B's trainable weights and learning rates, the
checkpoint's files, and the elements of every tensor it holds beside the model's trainable and frozen elements.
"""

import json
import os
import random
import socket
import sys
from pathlib import Path

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
sock.close()
os.environ.update(
    RANK="0",
    LOCAL_RANK="0",
    WORLD_SIZE="1",
    MASTER_ADDR="127.0.0.1",
    MASTER_PORT=str(port),
)

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
tests_dir, model_dir, out_root, cases = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, tests_dir)

import train_fixtures as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

from raysft.pipeline.config import load_config  # noqa: E402
from raysft.pipeline.models.load import build_model  # noqa: E402
from raysft.pipeline.training import checkpoint as ck  # noqa: E402
from raysft.pipeline.training.engine import DeepSpeedStepEngine, deepspeed_config, trainable_state_dict  # noqa: E402
from raysft.pipeline.training.step import collate, make_optimizer, optimizer_step  # noqa: E402

rng = random.Random(0)
rows = F.pack_rows([F.make_sample(rng, i) for i in range(24)], 3)


def roundtrip(stage: int, dtype: str, quantization: str, out: str) -> dict:
    cfg = load_config(
        None,
        overrides={
            "model.name_or_path": model_dir,
            "model.quantization": quantization,
            "model.dtype": dtype,
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.dropout": 0.0,
            "train.lr": 1e-2,
            "train.warmup_steps": 1,
            "train.deepspeed.stage": stage,
            "scaling.num_workers": 1,
            "train.max_steps": 6,
        },
    )

    def engine():
        model = build_model(cfg, "cpu")
        opt, sched = make_optimizer(model, cfg.train, 6)
        e, *_ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=sched,
            config=deepspeed_config(cfg, 1),
            dist_init_required=False,
        )
        return e

    def step(e, k):
        mb = collate([rows[k]])
        optimizer_step(DeepSpeedStepEngine(e), [mb], mb.n_trained)

    a = engine()
    step(a, 0)
    step(a, 1)
    ck.save(
        a,
        out,
        rank=0,
        state={"step": 2},
        ledger_path=None,
        config_yaml="x: 1\n",
        storage=out,
    )
    problem = ck.problem(out)
    saved = trainable_state_dict(a.module)
    step(a, 2)
    step(a, 3)
    wa, lra = trainable_state_dict(a.module), a.optimizer.param_groups[0]["lr"]

    b = engine()
    step(b, 5)  # other state that loading must replace
    state = ck.load(b, out, rank=0)
    step(b, 2)
    step(b, 3)
    wb, lrb = trainable_state_dict(b.module), b.optimizer.param_groups[0]["lr"]
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    changed = max(float((wa[k].float() - saved[k].float()).abs().max()) for k in wa)

    stored = 0  # elements of every tensor in the checkpoint's safetensors files
    for f in Path(out).rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                stored += n
    params = list(a.module.parameters())
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params if p.requires_grad)
    frozen = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params if not p.requires_grad)
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    a.destroy()
    b.destroy()
    return {
        "diff": diff,
        "changed": changed,
        "lr": [lra, lrb],
        "problem": problem,
        "state": state,
        "files": files,
        "n": len(wa),
        "stored": stored,
        "trainable": trainable,
        "frozen": frozen,
    }


for case in cases:
    stage, dtype, quantization = case.split(":")
    result = roundtrip(int(stage), dtype, quantization, os.path.join(out_root, case.replace(":", "-")))
    print(f"RESULT {case} " + json.dumps(result), flush=True)
