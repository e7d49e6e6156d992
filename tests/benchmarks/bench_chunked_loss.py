"""CPU time of the loss: full logits + torch cross_entropy vs the chunked PyTorch loss (issue 20 item 4).

One forward + backward of `fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")` with
`reference=True` (full logits, fp32 copy) and `triton=False` (the chunks GPU runs take without
train.kernels), fp32, a third of the labels ignored. The two alternate (ABAB) within each repeat; the
median of --repeats is quoted with the ratio chunked / full. Decides `step.chunked_by_default` on CPU.

    python tests/benchmarks/bench_chunked_loss.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from raysft.kernels import fused_linear_cross_entropy

SHAPES = [(512, 64, 512), (1024, 64, 32000), (1024, 576, 49152)]  # tokens, hidden, vocab (the last: SmolLM2)


def once(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, reference: bool) -> float:
    start = time.perf_counter()
    fused_linear_cross_entropy(h, w, y, reduction="sum", reference=reference, triton=False).backward()
    h.grad = None
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n, hidden, vocab in SHAPES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, hidden, generator=g).requires_grad_(True)
        w = torch.randn(vocab, hidden, generator=g) * 0.02
        y = torch.randint(0, vocab, (n,), generator=g)
        y[::3] = -100
        once(h, w, y, True), once(h, w, y, False)  # warm
        times: dict[str, list[float]] = {"full": [], "chunked": []}
        for _ in range(args.repeats):
            times["full"].append(once(h, w, y, True))
            times["chunked"].append(once(h, w, y, False))
        full, chunked = statistics.median(times["full"]), statistics.median(times["chunked"])
        row = {"tokens": n, "hidden": hidden, "vocab": vocab, "full_ms": full * 1e3, "chunked_ms": chunked * 1e3}
        row["ratio"] = chunked / full
        print(
            f"{n} x {hidden} -> {vocab}: full {full * 1e3:.1f} ms, chunked {chunked * 1e3:.1f} ms, "
            f"chunked/full {chunked / full:.2f}",
            flush=True,
        )
        rows.append(row)
    print(json.dumps({"threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
