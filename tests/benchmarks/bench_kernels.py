"""Benchmark raysft.kernels against torch eager, torch.compile and Liger-Kernel, one op at a time.

GPU (the default; one run takes a few minutes on one H200):
    python tests/benchmarks/bench_kernels.py [--out results.md] [--skip-compile] [--quick]
  For each kernel and shape (hidden 2048/4096, vocab 49k/128k, 8k-16k tokens, bf16): median
  forward+backward time and peak extra memory (torch.cuda.max_memory_allocated over the inputs), and
  bf16 numerics of every implementation against an fp32 reference (outputs and every gradient).
  Liger is optional on that machine: carry its wheel and `pip install --no-deps` it first.

CPU:
    python tests/benchmarks/bench_kernels.py --cpu-smoke
  The correctness part on tiny shapes through the Triton interpreter (TRITON_INTERPRET=1), so the
  script is known to run before a GPU session; no timings.
    python tests/benchmarks/bench_kernels.py --cpu-memory [--tokens 8192 --vocab 32768 --hidden 512]
  Peak extra resident memory of fused linear cross-entropy vs logits + torch cross_entropy (forward
  + backward), each measured in a fresh process from the kernel's VmHWM after resetting it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _early_flags() -> None:
    # TRITON_INTERPRET must be set before triton is first imported (see kernels/backend.py).
    if "--cpu-smoke" in sys.argv or "--measure" in sys.argv and "triton" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"


_early_flags()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def import_kernels():
    """raysft.kernels, installed or straight from this checkout (the GPU machine may not install it)."""
    try:
        import raysft.kernels as kernels
    except ImportError:
        kernels = import_kernels_from_tree()
    return kernels


def import_kernels_from_tree():
    """Load kernels/ as raysft.kernels without installing, with only pipeline/errors.py beside it."""
    import importlib.util
    import types

    for name, path in (("raysft", None), ("raysft.pipeline", ROOT / "pipeline")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)] if path else []  # a bare package: its __init__ is not run
        sys.modules[name] = package
    spec = importlib.util.spec_from_file_location(
        "raysft.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["raysft.kernels"] = kernels
    spec.loader.exec_module(kernels)
    return kernels


K = import_kernels()


def liger_ops() -> dict[str, Callable] | None:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return {
        "flce": lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "mean")[
            0
        ],
        "rms_norm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        "rope": lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
        "swiglu": lambda g, u: LigerSiLUMulFunction.apply(g, u),
    }


# ----------------------------------------------------------------------------- the ops and their inputs


def eager_flce(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100, reduction="mean")


def eager_rope(q, k, cos, sin):
    return K.apply_rotary_reference(q, k, cos, sin)


OPS = {  # name -> (raysft, eager reference)
    "flce": (lambda h, w, y: K.fused_linear_cross_entropy(h, w, y), eager_flce),
    "rms_norm": (lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: K.rms_norm_reference(x, w, 1e-6)),
    "rope": (lambda q, k, cos, sin: K.apply_rotary(q, k, cos, sin), eager_rope),
    "swiglu": (lambda g, u: K.swiglu(g, u), K.swiglu_reference),
}


def make_inputs(op: str, shape: dict, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[list, list[int]]:
    """(args, indices of the args that take gradients) for one op at one shape."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    if op == "flce":
        n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.3] = -100  # prompt tokens are ignored
        return [randn(n, h), randn(v, h, scale=h**-0.5), y.to(device)], [0, 1]
    if op == "rms_norm":
        return [randn(shape["tokens"], shape["hidden"]), (1 + randn(shape["hidden"], scale=0.1))], [0, 1]
    if op == "rope":
        t, hq, hk, d = shape["tokens"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
        pos = torch.arange(t) % 2048  # packed rows: positions restart
        inv = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
        emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        q = randn(1, t, hq, d).transpose(1, 2)
        k = randn(1, t, hk, d).transpose(1, 2)
        return [q, k, cos, sin], [0, 1]
    if op == "swiglu":
        return [randn(shape["tokens"], shape["intermediate"]), randn(shape["tokens"], shape["intermediate"])], [0, 1]
    raise ValueError(op)


def run_fwd_bwd(fn: Callable, args: list, grad_idx: list[int], upstream_seed: int = 1):
    """Forward + backward with fixed upstream gradients; returns (outputs, grads) as fp32 tensors."""
    args = [a.detach().clone().requires_grad_(i in grad_idx) for i, a in enumerate(args)]
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator(device="cpu").manual_seed(upstream_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() if o.dim() else o for o in outs)
    loss.backward()
    return [o.detach().float() for o in outs], [args[i].grad.float() for i in grad_idx]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def numerics(op: str, shape: dict, dtype: torch.dtype, device: str, impls: dict[str, Callable]) -> dict[str, float]:
    """Max relative error of each implementation (in `dtype`) vs the eager reference in fp32."""
    args, grad_idx = make_inputs(op, shape, dtype, device)
    ref_outs, ref_grads = run_fwd_bwd(OPS[op][1], [a.float() if a.is_floating_point() else a for a in args], grad_idx)
    errors = {}
    for name, fn in impls.items():
        outs, grads = run_fwd_bwd(fn, args, grad_idx)
        errors[name] = max(rel_err(a, b) for a, b in zip(outs + grads, ref_outs + ref_grads))
    return errors


# ----------------------------------------------------------------------------- GPU timing and memory


def time_and_memory(fn: Callable, args: list, grad_idx: list[int], reps: int) -> tuple[float, float]:
    """(median ms of forward+backward, peak extra MiB over the live inputs)."""
    leaves = [a.detach().clone().requires_grad_(i in grad_idx) for i, a in enumerate(args)]

    def step():
        for i in grad_idx:
            leaves[i].grad = None
        out = fn(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])

    step()  # warm-up (and compile)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    for i in grad_idx:
        leaves[i].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


SHAPES = {
    "flce": [
        dict(tokens=8192, hidden=2048, vocab=49152),
        dict(tokens=16384, hidden=2048, vocab=49152),
        dict(tokens=8192, hidden=4096, vocab=128256),
    ],
    "rms_norm": [dict(tokens=16384, hidden=2048), dict(tokens=16384, hidden=4096)],
    "rope": [
        dict(tokens=16384, q_heads=32, kv_heads=8, head_dim=64),
        dict(tokens=16384, q_heads=32, kv_heads=8, head_dim=128),
    ],
    "swiglu": [dict(tokens=16384, intermediate=8192), dict(tokens=16384, intermediate=14336)],
}
TINY_SHAPES = {
    "flce": [dict(tokens=67, hidden=341, vocab=4231)],
    "rms_norm": [dict(tokens=37, hidden=341)],
    "rope": [dict(tokens=37, q_heads=4, kv_heads=2, head_dim=32)],
    "swiglu": [dict(tokens=37, intermediate=341)],
}


def implementations(op: str, compile_too: bool, liger: dict | None) -> dict[str, Callable]:
    impls = {"raysft": OPS[op][0], "eager": OPS[op][1]}
    if compile_too:
        impls["compile"] = torch.compile(OPS[op][1], dynamic=False)
    if liger is not None:
        impls["liger"] = liger[op]
    return impls


def gpu_benchmark(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke or --cpu-memory on a CPU machine")
        return 2
    liger = liger_ops()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | liger {'yes' if liger else 'not installed'}")
    rows, failures = [], []
    started = time.time()
    for op, shapes in SHAPES.items():
        for shape in shapes[:1] if args.quick else shapes:
            impls = implementations(op, not args.skip_compile, liger)
            errs = numerics(op, shape, torch.bfloat16, "cuda", impls)
            inputs, grad_idx = make_inputs(op, shape, torch.bfloat16, "cuda")
            result = {"op": op, "shape": shape}
            for name, fn in impls.items():
                try:
                    ms, mib = time_and_memory(fn, inputs, grad_idx, args.reps)
                except torch.OutOfMemoryError:
                    ms, mib = float("nan"), float("nan")
                result[name] = {"ms": ms, "peak_mib": mib, "bf16_rel_err": errs[name]}
                torch.cuda.empty_cache()
            # bf16 numerics: no worse than 2x eager bf16's own error against the fp32 reference
            if errs["raysft"] > max(2 * errs["eager"], 2e-2):
                failures.append(f"{op} {shape}: raysft bf16 error {errs['raysft']:.3g} vs eager {errs['eager']:.3g}")
            rows.append(result)
            print(format_row(result), flush=True)
    print(f"# total {time.time() - started:.0f} s")
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    for f in failures:
        print("NUMERICS FAIL:", f)
    return 1 if failures else 0


def format_row(r: dict) -> str:
    parts = [f"{r['op']} {r['shape']}"]
    for name in ("raysft", "eager", "compile", "liger"):
        if name in r:
            parts.append(
                f"{name}: {r[name]['ms']:.2f} ms {r[name]['peak_mib']:.0f} MiB err {r[name]['bf16_rel_err']:.2e}"
            )
    return " | ".join(parts)


def markdown(rows: list[dict]) -> str:
    names = [n for n in ("raysft", "eager", "compile", "liger") if rows and n in rows[0]]
    head = (
        "| op | shape | "
        + " | ".join(f"{n} ms / MiB / bf16 err" for n in names)
        + " | raysft time vs "
        + " / ".join(names[1:])
        + " |"
    )
    lines = [head, "|" + " --- |" * (3 + len(names))]
    for r in rows:
        cells = [f"{r[n]['ms']:.2f} / {r[n]['peak_mib']:.0f} / {r[n]['bf16_rel_err']:.1e}" for n in names]
        ratios = " / ".join(f"{r['raysft']['ms'] / r[n]['ms']:.2f}x" for n in names[1:])
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(f"| {r['op']} | {shape} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CPU modes


def cpu_smoke() -> int:
    """Run the numerics part on tiny shapes through the Triton interpreter (fp32 and fp16)."""
    from raysft.kernels.backend import use_triton

    assert use_triton(torch.zeros(1)), "the Triton interpreter is not active"
    liger = None  # Liger's kernels pass float scalars the 3.9 interpreter cannot take; see the tests
    bad = []
    for op, shapes in TINY_SHAPES.items():
        for shape in shapes:
            for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
                errs = numerics(op, shape, dtype, "cpu", implementations(op, False, liger))
                ok = errs["raysft"] <= max(tol, 2 * errs["eager"])
                print(
                    f"{op:9s} {dtype} {shape}: rel err raysft {errs['raysft']:.2e}, eager {errs['eager']:.2e} "
                    f"{'ok' if ok else 'FAIL'}"
                )
                if not ok:
                    bad.append(op)
    print("cpu smoke:", "FAIL " + ", ".join(bad) if bad else "ok")
    return 1 if bad else 0


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_once(method: str, tokens: int, vocab: int, hidden: int) -> dict:
    """In this (fresh) process: peak extra RSS of one forward+backward of `method`, in MiB."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden).requires_grad_()
    w = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))
    y[::4] = -100
    fn = eager_flce if method == "torch" else (lambda a, b, c: K.fused_linear_cross_entropy(a, b, c))
    before = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _vm_kib("VmHWM")
    from raysft.kernels.backend import use_triton

    return {
        "method": method,
        "triton": use_triton(h),
        "peak_extra_mib": (peak - before) / 1024,
        "seconds": seconds,
        "loss": loss.item(),
    }


def cpu_memory(args: argparse.Namespace) -> int:
    results = []
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            method,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
        ]
        env = dict(os.environ, TRITON_INTERPRET="1" if method == "triton" else "0")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]
    for r in results:
        r["ratio_vs_torch"] = base["peak_extra_mib"] / max(r["peak_extra_mib"], 1e-9)
        print(
            f"{r['method']:7s} triton={r['triton']!s:5s} peak extra {r['peak_extra_mib']:9.1f} MiB  "
            f"{r['seconds']:7.2f} s  loss {r['loss']:.5f}  torch/this = {r['ratio_vs_torch']:.1f}x"
        )
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "results": results}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="numerics on tiny shapes through the Triton interpreter")
    p.add_argument("--cpu-memory", action="store_true", help="fused CE vs logits + cross_entropy peak RSS on CPU")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["torch", "chunked", "triton"],
        help="--cpu-memory: torch (logits + cross_entropy), chunked (fused, PyTorch chunk step), "
        "triton (fused, interpreter)",
    )
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--reps", type=int, default=10, help="GPU: timed repetitions per implementation")
    p.add_argument("--skip-compile", action="store_true", help="GPU: leave torch.compile out")
    p.add_argument("--quick", action="store_true", help="GPU: first shape of each op only")
    p.add_argument("--out", help="GPU: also write the markdown table and raw JSON here")
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure_once(args.measure, args.tokens, args.vocab, args.hidden)))
        return 0
    if args.cpu_smoke:
        return cpu_smoke()
    if args.cpu_memory:
        return cpu_memory(args)
    return gpu_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
