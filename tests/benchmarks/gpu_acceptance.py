"""The GPU acceptance run behind gpu_acceptance.sh: each stage in a child process with a time limit, one report.

Stages (GPU): environment; a tiny random Llama (built from a config) and packed Parquet rows; the Ray-free
loop (`python -m raysft.pipeline.training.torchrun_entry`, NCCL, world size 1) with NF4 + ZeRO-2 and
kernels off, kernels on, and a resume from a lost last checkpoint; tests/test_gpu_path.py and the bf16
kernel numerics (tests/test_kernels_bf16.py) on the GPU; bench_kernels.py --quick; bench_train.py --gpu.
Every child runs with `ray` made unimportable, so nothing on the path can lean on Ray. With --dry-run
(CPU): the wheels and their size with the working tree, then the same loop stages on CPU (gloo, fp32),
which checks the plumbing.

    python tests/benchmarks/gpu_acceptance.py [--dry-run [--wheels DIR | --no-wheels]] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
LIMIT_MIB = 64  # what may travel to the GPU machine: working tree + carried wheels
BUDGET_S = 8 * 60
NO_RAY = (
    "import sys, runpy; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__')"
)
NO_RAY_SCRIPT = (
    "import sys, runpy; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


class Report:
    """Stages with their status, seconds and details; written as one markdown file after every stage."""

    def __init__(self, path: Path, title: str):
        self.path, self.title, self.stages, self.started = path, title, [], time.monotonic()

    def add(self, name: str, ok: bool | None, seconds: float, details: dict | None = None, log: str = "") -> None:
        self.stages.append(
            {"stage": name, "ok": ok, "seconds": round(seconds, 1), "details": details or {}, "log": log}
        )
        self.write()

    @property
    def ok(self) -> bool:
        return all(s["ok"] is not False for s in self.stages)

    def write(self) -> None:
        lines = [
            f"# {self.title}",
            "",
            f"total {time.monotonic() - self.started:.0f} s; {'ALL PASSED' if self.ok else 'FAILURES'}",
            "",
            "| stage | result | seconds |",
            "| --- | --- | --- |",
        ]
        for s in self.stages:
            mark = {True: "pass", False: "FAIL", None: "info"}[s["ok"]]
            lines.append(f"| {s['stage']} | {mark} | {s['seconds']} |")
        for s in self.stages:
            lines += ["", f"## {s['stage']}", "", "```json", json.dumps(s["details"], indent=2, default=str), "```"]
            if s["log"]:
                lines += [
                    "",
                    "<details><summary>output (tail)</summary>",
                    "",
                    "```",
                    s["log"][-4000:],
                    "```",
                    "",
                    "</details>",
                ]
        self.path.write_text("\n".join(lines) + "\n")


def child(args: list[str], timeout: float, env: dict | None = None, module: bool = True) -> tuple[int, str, float]:
    """Run `python -c NO_RAY <module or script> args...`; (exit code, output, seconds); 124 on timeout."""
    cmd = [sys.executable, "-c", NO_RAY if module else NO_RAY_SCRIPT, *args]
    start = time.monotonic()
    try:
        p = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            text=True,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return p.returncode, p.stdout, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n[timed out after {timeout:.0f} s]", time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- stages ----------------------------------------------------------------------------------------


def environment(gpu: bool) -> dict:
    import importlib.metadata as md

    import torch

    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("transformers", "peft", "accelerate", "triton", "bitsandbytes", "deepspeed", "pydantic", "pyarrow"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        import ray  # noqa: F401

        info["ray"] = "importable (the loop stages still run with it blocked)"
    except ImportError:
        info["ray"] = None
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --dry-run on a CPU machine")
    return info


def tree_bytes() -> int:
    """Bytes of what the device tool carries besides the wheels: tracked + untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sum((REPO / f).stat().st_size for f in out.split("\0") if f and (REPO / f).is_file())


def wheels(wheel_dir: Path) -> dict:
    wanted = [
        line.split()[0]
        for line in (REPO / "tests/benchmarks/gpu_wheels.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = sorted(p for p in wheel_dir.iterdir() if p.is_file())

    def norm(s):
        return s.lower().replace("-", "_")

    missing = [w for w in wanted if not any(norm(f.name).startswith(norm(w.replace("==", "-")) + "") for f in files)]
    extra = [f.name for f in files if not any(norm(f.name).startswith(norm(w.replace("==", "-"))) for w in wanted)]
    total = sum(f.stat().st_size for f in files)
    tree = tree_bytes()
    return {
        "files": {f.name: f.stat().st_size for f in files},
        "missing": missing,
        "unexpected": extra,
        "wheels_mib": round(total / 2**20, 2),
        "tree_mib": round(tree / 2**20, 2),
        "total_mib": round((total + tree) / 2**20, 2),
        "limit_mib": LIMIT_MIB,
        "fits": total + tree <= LIMIT_MIB * 2**20 and not missing,
    }


def fixtures(work: Path, gpu: bool) -> tuple[Path, Path]:
    """A tiny random Llama with a ChatML tokenizer (no downloads) and packed rows of a learnable pattern."""
    sys.path.insert(0, str(TESTS))
    import torch
    from tiny import build_tokenizer, tiny_llama_config
    from train_fixtures import make_prepared
    from transformers import LlamaForCausalLM

    model_dir = work / "model"
    tok = build_tokenizer("chatml")
    torch.manual_seed(0)
    size = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8) if gpu else {}
    cfg = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, **size)  # CPU dry run: the tests' tiny size
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    prepared = make_prepared(work / "prepared", n_train=96, n_eval=12, per_row=3)
    return model_dir, prepared.train_dir.parent


def loop_steps(gpu: bool) -> int:
    """Optimizer steps per loop run: 8 on the GPU; 4 in the CPU dry run (the same stages: two evals, two
    checkpoints and a resume from the first; a CPU step of the NF4 loop takes seconds)."""
    return 8 if gpu else 4


def loop_config(work: Path, model_dir: Path, gpu: bool) -> Path:
    """NF4 + ZeRO-2, `loop_steps` steps of 2 micro-batches x 2 rows, eval and a checkpoint every half of them."""
    import yaml

    steps = loop_steps(gpu)
    dtype = "bfloat16" if gpu else "float32"  # CPU: fp32 (bf16 matmuls are slow and DeepSpeed's CPU path is fp32)
    cfg = {
        "model": {
            "name_or_path": str(model_dir),
            "quantization": "nf4",
            "dtype": dtype,
            "compute_dtype": dtype,
            "gradient_checkpointing": True,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "max_steps": steps,
            "lr": 5e-3,
            "warmup_steps": 1,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "save_every": steps // 2,
            "eval_every": steps // 2,
            "deepspeed": {"stage": 2},
            "logging": {"tensorboard": False},
        },
        "scaling": {"num_workers": 1, "use_gpu": gpu},
        "run": {"storage_path": str(work / "runs"), "name": "kernels-off"},
    }
    path = work / "loop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, prepared: Path, sets: list[str], timeout: float) -> tuple[int, str, float]:
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    args = ["raysft.pipeline.training.torchrun_entry", str(config), "--prepared", str(prepared)]
    for s in sets:
        args += ["--set", s]
    return child(args, timeout, env)


def run_summary(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]
    events = [e for e in events if e.get("event") == "start"]  # events.jsonl also holds the reader counters
    return {
        "steps": [r["step"] for r in rows],
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "eval_loss": [r.get("eval_loss") for r in rows if "eval_loss" in r],
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2],
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint_*")),
        "starts": [e["step"] for e in events],
        "adapter": (run_dir / "adapter" / "adapter_model.safetensors").is_file(),
    }


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (
        load_file(str(a / "adapter" / "adapter_model.safetensors")),
        load_file(str(b / "adapter" / "adapter_model.safetensors")),
    )
    assert x.keys() == y.keys()
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def resume_tolerance(run: Path, gpu: bool) -> float:
    """How far a resumed run's adapter may be from the uninterrupted one's, from the dtype it is stored in.

    The resume restores the exact state (fp32 master weights, bf16 weights, optimizer, RNG, data position), so
    the runs differ only where GPU kernels reduce in a nondeterministic order; that moves a stored bf16 weight
    by a rounding step or two at its magnitude: 2 ulps of bf16 (eps 2^-7) at the largest adapter weight. On the
    CPU (fp32, deterministic reductions) the runs agree to fp32 rounding: 1e-5."""
    if not gpu:
        return 1e-5
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    scale = max(float(w.float().abs().max()) for w in weights.values())
    return 2 * torch.finfo(torch.bfloat16).eps * scale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: check the wheels and the plumbing, no GPU needed")
    ap.add_argument("--wheels", type=Path, help="dry run: the folder of downloaded wheels to check")
    ap.add_argument("--no-wheels", action="store_true", help="dry run: skip the wheel check")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    gpu = not args.dry_run
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"raysft-gpu-acceptance-{os.getpid()}"
    work.mkdir(parents=True)
    report = Report(
        args.out / "gpu_acceptance.md", "raysft GPU acceptance" + (" (dry run on CPU)" if args.dry_run else "")
    )
    deadline = time.monotonic() + BUDGET_S

    def left():
        return max(10.0, deadline - time.monotonic())

    try:
        t = time.monotonic()
        report.add("environment", None, time.monotonic() - t, environment(gpu))
        if args.dry_run:
            t = time.monotonic()
            if args.no_wheels:
                tree = tree_bytes()
                w = {"tree_mib": round(tree / 2**20, 2), "wheels_mib": None, "total_mib": round(tree / 2**20, 2)}
                w |= {"limit_mib": LIMIT_MIB, "fits": tree <= LIMIT_MIB * 2**20}
            else:
                w = wheels(args.wheels or REPO / ".whl")
            wheels_text = "not checked (--no-wheels)" if w["wheels_mib"] is None else f"{w['wheels_mib']} MiB"
            print(
                f"carry: working tree {w['tree_mib']} MiB + wheels {wheels_text} = {w['total_mib']} MiB "
                f"of the device tool's {LIMIT_MIB} MiB ({'fits' if w['fits'] else 'TOO BIG'})",
                flush=True,
            )
            report.add("carry: working tree + wheels (<= 64 MiB)", w["fits"], time.monotonic() - t, w)

        t = time.monotonic()
        model_dir, prepared = fixtures(work, gpu)
        config = loop_config(work, model_dir, gpu)
        report.add(
            "fixtures: tiny random Llama + packed Parquet",
            True,
            time.monotonic() - t,
            {"model": str(model_dir), "prepared": str(prepared)},
        )

        runs = work / "runs"
        steps = loop_steps(gpu)
        ckpts = [f"checkpoint_{steps // 2:06d}", f"checkpoint_{steps:06d}"]
        results = {}
        for name, sets in [("kernels-off", []), ("kernels-on", ["train.kernels=true", "run.name=kernels-on"])]:
            code, log, secs = torchrun(config, prepared, sets, timeout=min(150, left()))
            details = {"exit": code}
            ok = code == 0
            if ok:
                details.update(run_summary(runs / name))
                ok = (
                    details["steps"] == list(range(1, steps + 1))
                    and len(details["eval_loss"]) == 2
                    and details["adapter"]
                    and details["checkpoints"] == ckpts
                    and details["loss_last"] < details["loss_first"]
                )
            results[name] = details
            report.add(f"torchrun loop, NF4 + ZeRO-2, {name}{', NCCL' if gpu else ', gloo'}", ok, secs, details, log)

        if all(r.get("exit") == 0 for r in results.values()):
            off, on = results["kernels-off"]["eval_loss"][-1], results["kernels-on"]["eval_loss"][-1]
            tol = 5e-2 if gpu else 1e-3
            report.add(
                "kernels on vs off (final eval loss)",
                abs(off - on) < tol,
                0.0,
                {"off": off, "on": on, "abs_diff": abs(off - on), "tolerance": tol},
            )

        # A crash after the first checkpoint: the next start resumes from it and ends where the full run did.
        if results["kernels-off"].get("exit") == 0:
            resumed = runs / "resumed"
            shutil.copytree(runs / "kernels-off", resumed)
            shutil.rmtree(resumed / ckpts[1])
            shutil.rmtree(resumed / "adapter")
            code, log, secs = torchrun(config, prepared, ["run.name=resumed"], timeout=min(150, left()))
            details = {"exit": code}
            ok = code == 0
            if ok:
                details.update(run_summary(resumed))
                details["adapter_max_abs_diff_vs_uninterrupted"] = diff = adapter_diff(resumed, runs / "kernels-off")
                details["tolerance"] = tol = resume_tolerance(runs / "kernels-off", gpu)
                ok = (
                    details["starts"] == [0, steps // 2]
                    and details["steps"] == list(range(1, steps + 1))
                    and diff <= tol
                )
            report.add("checkpoint + resume (lost last checkpoint)", ok, secs, details, log)

        if gpu:
            code, log, secs = child(
                [
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "tests/test_gpu_path.py",
                    "-m",
                    "not slow",
                    "-k",
                    "not sweep",
                ],
                timeout=min(120, left()),
            )
            report.add("tests/test_gpu_path.py on the GPU", code == 0, secs, {"exit": code}, log)
            code, log, secs = child(
                ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_bf16.py", "-m", "gpu"],
                timeout=min(150, left()),
            )
            report.add(
                "tests/test_kernels_bf16.py on the GPU (bf16 kernel numerics)", code == 0, secs, {"exit": code}, log
            )
            out_md = work / "kernels.md"
            code, log, secs = child(
                ["tests/benchmarks/bench_kernels.py", "--quick", "--skip-compile", "--out", str(out_md)],
                timeout=min(180, left()),
                module=False,
            )
            report.add(
                "bench_kernels.py --quick --skip-compile",
                code == 0,
                secs,
                {"exit": code, "table": out_md.read_text() if out_md.is_file() else None},
                log,
            )
            for extra in ([], ["--kernels"]):
                code, log, secs = child(
                    ["tests/benchmarks/bench_train.py", "--gpu", "--models", "demo,1b", "--steps", "10", *extra],
                    timeout=min(150, left()),
                    module=False,
                )
                report.add(
                    f"bench_train.py --gpu {' '.join(extra)}".strip(), code == 0, secs, {"exit": code}, log[-3000:]
                )
        else:
            for script in ("bench_kernels.py", "bench_train.py"):
                code, log, secs = child([f"tests/benchmarks/{script}", "--help"], timeout=60, module=False)
                report.add(f"{script} --help (it parses)", code == 0, secs, {"exit": code})
    except Exception as exc:  # noqa: BLE001 - the report says what broke; the exit code too
        report.add("unexpected error", False, 0.0, {"error": repr(exc)})
    finally:
        report.write()
        shutil.rmtree(work, ignore_errors=True)
    print(report.path.read_text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
