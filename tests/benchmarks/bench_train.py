"""Training speed: `raysft train` (1 Ray worker) vs TRL's SFTTrainer on the demo model, same run, same settings.

CPU (default): both sides train SmolLM2-135M-Instruct with an NF4 (bitsandbytes) base, LoRA r=16 on
all linear layers, packed rows of --seq-len tokens (best-fit decreasing), gradient checkpointing,
one packed row per step, bf16 compute and the same number of CPU threads, on the same generated
data. Each side runs in its own process; the per-step tokens/s (forward + backward + optimizer,
data loading excluded on both sides) is reported as the median after --warmup steps.

    python tests/benchmarks/bench_train.py [--steps 12] [--warmup 2] [--seq-len 512] [--threads 2]

GPU (--gpu): the Ray-free training step (pipeline/training/step.py) on one GPU: tokens/s and MFU for
the demo model's architecture and a ~1B Llama, randomly initialised (throughput does not depend on
the weights, and nothing needs downloading). LoRA training is counted as 4N FLOPs per token (N =
parameters in matmuls: forward 2N, backward through frozen weights 2N) plus attention, against
the GPU's dense bf16 peak (--peak-tflops, default H200/H100 SXM 989).

    python tests/benchmarks/bench_train.py --gpu [--models demo,1b] [--quantization nf4|none] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "examples" / "demo.yaml"


# --------------------------------------------------------------------------------------------- CPU: raysft
def run_raysft(model_dir: str, data: Path, out: Path, args) -> dict:
    """`raysft train` with 1 worker holding all threads; tokens/s per step from its metrics.jsonl."""
    sets = {
        "model.name_or_path": model_dir,
        "data.train": str(data),
        "data.eval": None,
        "data.max_seq_len": args.seq_len,
        "data.cache_dir": str(out / "prepared"),
        "data.system_prompt": None,
        "lora.r": args.rank,
        "lora.alpha": 2 * args.rank,
        "lora.dropout": 0.0,
        "train.max_steps": args.steps,
        "train.save_every": args.steps,
        "train.eval_every": 10**6,
        "train.logging.tensorboard": False,
        "train.lr": 2e-4,
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": args.threads,
        "run.storage_path": str(out),
        "run.name": "raysft",
        "run.max_failures": 0,
    }
    cmd = [sys.executable, "-m", "raysft.pipeline.cli", "train", str(DEMO_YAML)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={'null' if v is None else v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(out), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"raysft train failed:\n{proc.stdout[-4000:]}")
    rows = [json.loads(x) for x in (out / "raysft" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_step = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"side": "raysft train (1 Ray worker, DeepSpeed ZeRO-2)", "tokens_per_s": per_step, "wall_s": wall}


# --------------------------------------------------------------------------------------------- CPU: TRL
def run_trl_worker(model_dir: str, data: Path, out: Path, args) -> dict:
    """TRL's SFTTrainer in this process (called in a child process by `run_trl`)."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=str(data), split="train")
    # Conversational prompt/completion: TRL trains on the completion only, like raysft's train_on=responses.
    rows = rows.map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}, remove_columns=["messages"]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
        attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
    )
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **k)

    cfg = SFTConfig(
        output_dir=str(out / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        max_length=args.seq_len,
        packing=True,
        packing_strategy="bfd",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
        max_grad_norm=1.0,
    )
    peft_cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = CountingSFTTrainer(
        model=model, args=cfg, train_dataset=rows, processing_class=tok, peft_config=peft_cfg, callbacks=[Timer()]
    )
    trainer.train()
    return {"side": "TRL SFTTrainer", "tokens_per_s": [n / t for n, t in zip(tokens, times)], "tokens_per_step": tokens}


def run_trl(model_dir: str, data: Path, out: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_trl-worker",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--threads",
        str(args.threads),
        "--rank",
        str(args.rank),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    result_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not result_line:
        raise SystemExit(f"TRL side failed:\n{proc.stdout[-4000:]}")
    return {**json.loads(result_line[-1][len("TRL_RESULT ") :]), "wall_s": wall}


def cpu_main(args) -> None:
    from raysft.pipeline.demo.task import write_task
    from raysft.pipeline.models.fetch import fetch_model

    model_dir = args.model or str(fetch_model("smollm2-135m-instruct"))
    out = Path(args.out or tempfile.mkdtemp(prefix="raysft-bench-train-")).resolve()
    # ~11 task rows fill one 512-token packed row; generate plenty so neither side runs out.
    data, _ = write_task(out / "data", n_train=max(400, args.steps * (args.seq_len // 30)), n_eval=1, seed=0)
    results = []
    for side in args.sides.split(","):
        print(f"[bench] {side}: {args.steps} steps ...", flush=True)
        r = run_raysft(model_dir, data, out, args) if side == "raysft" else run_trl(model_dir, data, out, args)
        steady = r["tokens_per_s"][args.warmup :]
        r["median_tokens_per_s"] = statistics.median(steady) if steady else float("nan")
        results.append(r)
        print(
            f"[bench] {r['side']}: median {r['median_tokens_per_s']:.1f} tokens/s over {len(steady)} steps "
            f"(process wall {r['wall_s']:.0f} s)",
            flush=True,
        )
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end",
        "settings": {
            "model": "SmolLM2-135M-Instruct",
            "base": "NF4 (bitsandbytes, double quant), bf16 compute",
            "lora_r": args.rank,
            "seq_len": args.seq_len,
            "packing": "bfd, 1 packed row per step",
            "gradient_checkpointing": True,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "results": results,
    }
    by = {r["side"].split()[0]: r["median_tokens_per_s"] for r in results}
    if "raysft" in by and "TRL" in by:
        summary["ratio_raysft_over_trl"] = by["raysft"] / by["TRL"]
        print(f"[bench] ratio raysft / TRL = {summary['ratio_raysft_over_trl']:.2f}", flush=True)
    (out / "bench_train.json").write_text(json.dumps(summary, indent=2))
    print(f"[bench] results in {out / 'bench_train.json'}")


# --------------------------------------------------------------------------------------------- GPU
GPU_MODELS = {
    # SmolLM2-135M's architecture (the demo model) and a Llama-3.2-1B-shaped model.
    "demo": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}


def matmul_params(model) -> int:
    """Parameters used in matmuls per token: every Linear (incl. the 4-bit ones, counted unpacked) and the LM head."""
    import torch

    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:  # the adapters' own FLOPs are ~1%: left out
            n += module.in_features * module.out_features
    return n


def flops_per_token(n_matmul: int, n_layers: int, hidden: int, sample_lens: list[int]) -> float:
    """LoRA training: 4N (forward 2N + input-gradient backward 2N; frozen base has no weight gradient) plus attention.

    Attention per token, forward: 4 * layers * hidden * (mean causal context); x3 for forward + backward.
    """
    total = sum(sample_lens)
    mean_ctx = sum(s * (s + 1) / 2 for s in sample_lens) / total
    return 4.0 * n_matmul + 3 * 4.0 * n_layers * hidden * mean_ctx


def _import_raysft_from_checkout() -> None:
    """On a GPU box without `pip install -e .` (and without Ray): map pipeline/ and kernels/ to raysft.* by hand."""
    try:
        import raysft.pipeline  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.util
    import types

    root = types.ModuleType("raysft")
    root.__path__ = []
    sys.modules["raysft"] = root
    for sub in ("pipeline", "kernels"):
        spec = importlib.util.spec_from_file_location(
            f"raysft.{sub}", REPO / sub / "__init__.py", submodule_search_locations=[str(REPO / sub)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"raysft.{sub}"] = module
        spec.loader.exec_module(module)


def gpu_main(args) -> None:
    import torch

    _import_raysft_from_checkout()
    from transformers import LlamaConfig, LlamaForCausalLM

    from raysft.pipeline.config import Config
    from raysft.pipeline.models.load import build_model
    from raysft.pipeline.training.step import TorchEngine, collate, make_optimizer, optimizer_step

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (--device cpu runs the same code as a smoke check).")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke check)"
    results = []
    for name in args.models.split(","):
        arch = GPU_MODELS[name]
        with tempfile.TemporaryDirectory(prefix=f"raysft-bench-{name}-") as tmp:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**arch)).to(torch.bfloat16).save_pretrained(tmp)
            cfg = Config.from_dict(
                {
                    "model": {
                        "name_or_path": tmp,
                        "quantization": args.quantization,
                        "attn_implementation": args.attn,
                        "gradient_checkpointing": True,
                    },
                    "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": "all-linear"},
                    "train": {"lr": 2e-4, "max_steps": args.steps, "kernels": args.kernels},
                }
            )
            model = build_model(cfg, device=dev)
            opt, sched = make_optimizer(model, cfg.train, args.steps)
            engine = TorchEngine(model, opt, sched)
            n_matmul = matmul_params(model.get_base_model())
            g = torch.Generator().manual_seed(0)
            rates, mfus = [], []
            for step in range(args.steps):
                # One packed row of --gpu-seq-len tokens: samples of 64..1024 tokens, position_ids restart per sample.
                lens, left = [], args.gpu_seq_len
                while left > 0:
                    s = min(left, int(torch.randint(64, 1025, (1,), generator=g)))
                    lens.append(s)
                    left -= s
                ids = torch.randint(0, arch["vocab_size"], (args.gpu_seq_len,), generator=g).tolist()
                pos = [p for s in lens for p in range(s)]
                mb = collate([{"input_ids": ids, "labels": ids, "position_ids": pos}])
                sync()
                res = optimizer_step(engine, [mb], mb.n_trained, device=dev)
                sync()
                rate = res.tokens / res.seconds
                if step >= args.warmup:
                    rates.append(rate)
                    fpt = flops_per_token(n_matmul, arch["num_hidden_layers"], arch["hidden_size"], lens)
                    mfus.append(rate * fpt / (args.peak_tflops * 1e12))
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
            r = {
                "model": name,
                "params_matmul": n_matmul,
                "tokens_per_s": statistics.median(rates),
                "mfu": statistics.median(mfus),
                "max_mem_gib": mem,
            }
            results.append(r)
            print(
                f"[bench-gpu] {name}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%} "
                f"(N={n_matmul / 1e6:.0f}M in matmuls, {args.quantization}, seq {args.gpu_seq_len}, "
                f"peak mem {mem:.1f} GiB)",
                flush=True,
            )
            del model, engine, opt
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    print(
        json.dumps(
            {
                "gpu": gpu,
                "peak_tflops": args.peak_tflops,
                "quantization": args.quantization,
                "seq_len": args.gpu_seq_len,
                "results": results,
            },
            indent=2,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description="raysft training speed vs TRL SFTTrainer (CPU), or tokens/s + MFU (--gpu)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sides", default="raysft,trl", help="which sides to run, in this order")
    ap.add_argument("--model", default=None, help="model folder (default: the fetched demo model)")
    ap.add_argument("--out", default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--gpu", action="store_true", help="run the GPU variant (Ray-free step, tokens/s and MFU)")
    ap.add_argument("--models", default="demo,1b")
    ap.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--kernels", action="store_true", help="GPU: use raysft's Triton kernels")
    ap.add_argument("--gpu-seq-len", type=int, default=4096)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda", help="GPU variant's device (cpu: a smoke check of the code path)")
    ap.add_argument("--_trl-worker", dest="trl_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        result = run_trl_worker(args.model, Path(args.data), Path(args.out), args)
        print("TRL_RESULT " + json.dumps(result), flush=True)
    elif args.gpu:
        args.warmup = max(args.warmup, 3)
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
