"""Throughput and peak memory of `raysft prepare` vs a TRL-style baseline, in the same run.

    python tests/benchmarks/bench_prepare.py --tokenizer /tmp/smollm2_tok --repeat 10 --runs 3
    python tests/benchmarks/bench_prepare.py --tokenizer ../shared/tokenizers/llama-3.1-instruct --repeat 10 --runs 3 --self-check-runs 5

Input: ../shared/data/gsm8k/train.jsonl repeated `--repeat` times (7,473 rows each). Each side runs
in a fresh subprocess (imports, and for us Ray start-up, included in the wall time) while this
script samples the RSS of the subprocess and all its descendants (Ray's raylet, GCS and workers)
every 0.2 s.

Baselines (both end with `trl.pack_dataset(strategy="bfd")` at the same max_seq_len):
  trl_sft   TRL SFTTrainer's own prompt-completion tokenization: per row, the prompt and the
            prompt+completion are each rendered and tokenized with `apply_chat_template`, and the
            completion mask is where they diverge (this is how TRL gets response-only masks).
  trl_min   one `apply_chat_template(messages, tokenize=True)` per row, no mask at all (a floor).
Both use `datasets.map` in one process with caching disabled (keep_in_memory).

--self-check-runs N also times, in this process, ChatEncoder.encode_flat over gsm8k train (x1, in
batches of 1024 rows, as one tokenizer actor runs it) with the run-time mask self-check on and off,
N rounds interleaved, in CPU seconds of this process, and reports the medians and the check's share.
"""  # noqa: E501 (a usage line that --help prints as is)

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

BASELINE = textwrap.dedent(
    r"""
    import json, sys, time
    import datasets
    from transformers import AutoTokenizer
    from trl import pack_dataset
    datasets.disable_caching()
    datasets.disable_progress_bars()
    path, tok_dir, max_len, mode, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = datasets.Dataset.from_json(path, keep_in_memory=True)

    def tokenize(ids):
        return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids

    def sft(row):
        prompt = [{"role": "user", "content": row["question"]}]
        completion = [{"role": "assistant", "content": row["answer"]}]
        prompt_ids = tokenize(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        full = tokenize(tok.apply_chat_template(prompt + completion, tokenize=True))
        n = 0
        while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
            n += 1
        return {"input_ids": full, "completion_mask": [0] * n + [1] * (len(full) - n)}

    def minimal(row):
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        return {"input_ids": tokenize(tok.apply_chat_template(messages, tokenize=True))}

    ds = ds.map(sft if mode == "trl_sft" else minimal, remove_columns=ds.column_names, keep_in_memory=True)
    packed = pack_dataset(ds, max_len, strategy="bfd", map_kwargs={"keep_in_memory": True})
    tokens = sum(packed.data.table.column("seq_lengths").combine_chunks().values.to_numpy())
    json.dump({"tokens": int(tokens), "rows": packed.num_rows}, open(out, "w"))
    """
)


def sample_tree(proc: psutil.Process, cpu: dict[int, float]) -> int:
    """RSS of the process and all its descendants; records each one's CPU seconds so far in `cpu`."""
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            with p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS of the process tree, peak RSS of the main process, CPU seconds of the tree).

    CPU seconds are sampled every 0.2 s per process (Ray's workers are not children the shell waits
    for), so the last 0.2 s of a process that exits is missed: a slight undercount on both sides.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        try:
            peak_main = max(peak_main, ps.memory_info().rss)
        except psutil.Error:
            pass
        peak_tree = max(peak_tree, sample_tree(ps, cpu))
        time.sleep(0.2)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr.read()[-3000:]}")
    return wall, peak_tree, peak_main, sum(cpu.values())


def self_check_cost(tokenizer: str, runs: int, work: Path) -> dict:
    """Median seconds of encode_flat over gsm8k x1 with the mask self-check on and off (interleaved)."""
    from raysft.pipeline.config import load_config
    from raysft.pipeline.data.encode import ChatEncoder
    from raysft.pipeline.data.formats import normalise_row
    from raysft.pipeline.data.spec_cache import load_tokenizer_spec

    spec = load_tokenizer_spec(
        load_config(None, {"model.name_or_path": tokenizer, "data.cache_dir": str(work / "cache")})
    )
    items = [normalise_row(json.loads(line)) for line in GSM8K.read_text().splitlines()]
    times: dict[bool, list[float]] = {True: [], False: []}
    checked = 0
    for _ in range(runs):
        for check in (True, False):
            encoder = ChatEncoder(spec, mask_check=check)
            start = time.process_time()  # CPU seconds of this process: less exposed to the box's other load
            for i in range(0, len(items), 1024):
                encoder.encode_flat(items[i : i + 1024])
            times[check].append(time.process_time() - start)
            checked = max(checked, encoder.mask_checks)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {
        "rows": len(items),
        "turns_checked": checked,
        "median_s_with_check": round(on, 3),
        "median_s_without_check": round(off, 3),
        "check_share": round((on - off) / on, 3),
        "runs_with": [round(t, 3) for t in times[True]],
        "runs_without": [round(t, 3) for t in times[False]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokenizer", required=True, help="tokenizer directory (Hugging Face format, with a chat template)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        nargs="*",
        default=[1, 10],
        help="copies of gsm8k train (several: one run each; none: only the self-check timing)",
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per side; medians are reported")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--baselines", nargs="+", default=["trl_sft", "trl_min"])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--self-check-runs", type=int, default=0, help="also time the mask self-check (rounds; 0: skip)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    report = {}
    if args.self_check_runs:
        report["self_check"] = self_check_cost(args.tokenizer, args.self_check_runs, work)
        print(json.dumps({"self_check": report["self_check"]}, indent=2), flush=True)
    (work / "baseline.py").write_text(BASELINE)
    lines = GSM8K.read_text()
    for repeat in args.repeat:
        data = work / f"gsm8k_x{repeat}.jsonl"
        data.write_text(lines * repeat)
        cfg = work / f"cfg_x{repeat}.yaml"
        cfg.write_text(
            f"model: {{name_or_path: {args.tokenizer}}}\n"
            f"data: {{train: {data}, max_seq_len: {args.max_seq_len}, num_tokenizer_actors: {args.actors}, "
            f"cache_dir: {work / 'cache'}}}\n"
        )
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        results: dict[str, list] = {"raysft": []}
        results.update({b: [] for b in args.baselines})
        tokens = {}
        for i in range(args.runs):
            out = work / f"out_x{repeat}"
            wall, tree, main_rss, cpu = run(
                [sys.executable, "-m", "raysft.pipeline.cli", "prepare", str(cfg), "--output", str(out)], env
            )
            stats = json.loads((out / "stats.json").read_text())
            tokens["raysft"] = stats["tokens_total"]
            results["raysft"].append((wall, tree, main_rss, cpu))
            print(
                f"x{repeat} run {i} raysft: {wall:.1f}s, {stats['tokens_total'] / wall:.0f} tok/s, {cpu:.0f} CPU s, "
                f"peak tree RSS {tree / 2**20:.0f} MiB, driver {main_rss / 2**20:.0f} MiB, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            for b in args.baselines:
                res = work / f"{b}.json"
                wall, tree, main_rss, cpu = run(
                    [
                        sys.executable,
                        str(work / "baseline.py"),
                        str(data),
                        args.tokenizer,
                        str(args.max_seq_len),
                        b,
                        str(res),
                    ]
                )
                tokens[b] = json.loads(res.read_text())["tokens"]
                results[b].append((wall, tree, main_rss, cpu))
                print(
                    f"x{repeat} run {i} {b}: {wall:.1f}s, {tokens[b] / wall:.0f} tok/s, {cpu:.0f} CPU s, "
                    f"peak RSS {tree / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        summary = {}
        for name, runs in results.items():
            wall = statistics.median(r[0] for r in runs)
            summary[name] = {
                "median_s": round(wall, 1),
                "tokens": tokens[name],
                "tokens_per_s": round(tokens[name] / wall),
                "peak_tree_rss_mib": round(max(r[1] for r in runs) / 2**20),
                "peak_main_rss_mib": round(max(r[2] for r in runs) / 2**20),
                "median_cpu_s": round(statistics.median(r[3] for r in runs), 1),
            }
        for b in args.baselines:
            summary[f"speedup_vs_{b}"] = round(summary["raysft"]["tokens_per_s"] / summary[b]["tokens_per_s"], 2)
            ratios = [r[0] / o[0] for r, o in zip(results[b], results["raysft"])]  # paired, same round
            summary[f"paired_speedups_vs_{b}"] = [round(x * tokens["raysft"] / tokens[b], 2) for x in ratios]
        report[f"x{repeat}"] = summary
        print(json.dumps({f"x{repeat}": summary}, indent=2), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
