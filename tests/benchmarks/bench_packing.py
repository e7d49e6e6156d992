"""Packing efficiency on gsm8k train: ours (per window, as the plan runs it), TRL's BFD, the lower bound.

    python tests/benchmarks/bench_packing.py --tokenizer /tmp/smollm2_tok --max-seq-len 512 1024 2048

Samples are tokenized once with our chat encoder (SmolLM2's ChatML template: system + question +
answer); each packer then sees the same token ids, truncated to max_seq_len. Efficiency = real
tokens / (packed rows x max_seq_len). The bound is ceil(sum of lengths / max_seq_len) rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="SmolLM2 tokenizer directory (Hugging Face format)")
    ap.add_argument("--max-seq-len", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--window", type=int, default=4096, help="samples per packing window (data.pack_window)")
    args = ap.parse_args()

    import datasets
    from transformers import AutoTokenizer
    from trl import pack_dataset

    from raysft.pipeline.data.encode import ChatEncoder
    from raysft.pipeline.data.formats import normalise_row
    from raysft.pipeline.data.pack import bfd_bins, plan_bins

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    encoded = ChatEncoder(tok).encode([normalise_row(r) for r in rows])
    ids = [e[0] for e in encoded]
    print(f"{len(ids)} samples, mean {np.mean([len(x) for x in ids]):.1f} tokens, max {max(len(x) for x in ids)}")

    results = []
    for L in args.max_seq_len:
        lengths = np.minimum([len(x) for x in ids], L)
        tokens = int(lengths.sum())
        t = time.perf_counter()
        ours = sum(len(plan_bins(lengths[i : i + args.window], L)) for i in range(0, len(lengths), args.window))
        t_ours = time.perf_counter() - t
        whole = len(plan_bins(lengths, L))
        plain = sum(len(bfd_bins(lengths[i : i + args.window], L)) for i in range(0, len(lengths), args.window))
        ds = datasets.Dataset.from_dict({"input_ids": [x.tolist() for x in ids]})
        t = time.perf_counter()
        packed = pack_dataset(ds, L, strategy="bfd", map_kwargs={"keep_in_memory": True})
        t_trl = time.perf_counter() - t
        trl_tokens = int(sum(packed.data.table.column("seq_lengths").combine_chunks().values.to_numpy()))
        bound = math.ceil(tokens / L)
        row = {
            "max_seq_len": L,
            "ours": round(tokens / (ours * L), 4),
            "ours_rows": ours,
            "ours_s": round(t_ours, 2),
            "ours_one_window": round(tokens / (whole * L), 4),
            "plain_bfd": round(tokens / (plain * L), 4),
            "trl_bfd": round(trl_tokens / (packed.num_rows * L), 4),
            "trl_rows": packed.num_rows,
            "trl_s": round(t_trl, 2),
            "bound": round(tokens / (bound * L), 4),
            "bound_rows": bound,
        }
        assert trl_tokens == tokens, (trl_tokens, tokens)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"| max_seq_len | ours (window {args.window:d}) | ours (one window) | plain BFD | TRL bfd | bound | "
        "rows ours / TRL / bound |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['max_seq_len']} | {r['ours']:.4f} | {r['ours_one_window']:.4f} | {r['plain_bfd']:.4f} | "
            f"{r['trl_bfd']:.4f} | {r['bound']:.4f} | {r['ours_rows']} / {r['trl_rows']} / {r['bound_rows']} |"
        )


if __name__ == "__main__":
    main()
