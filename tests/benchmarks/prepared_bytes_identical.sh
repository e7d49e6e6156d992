#!/usr/bin/env bash
# Are the prepared shards of two checkouts byte-identical? `raysft prepare` (the Ray Data plan) runs from each
# checkout with its own .venv on the same real data and tokenizers, and every shard file and _index.json is compared
# by sha256 (stats.json too, less its `seconds`).
#
#   [SHARED=/work/shared] tests/benchmarks/prepared_bytes_identical.sh /work/main /work/wt/BRANCH [OUT]
#
# Data: ../shared/data's sharegpt (weight 1) + gsm8k train (weight 1.5, prompt/completion fields renamed),
# 5% held out for eval, max_seq_len 1024, bfd packing. Tokenizers: Qwen3, Llama-3.1, and Mistral v0.3 with a system
# prompt (Mistral moves it into the last user turn, so earlier assistant turns get their own views). Each prepare
# uses its own cache folder under OUT, so nothing is read from an earlier run (REUSE=1 keeps the outputs a finished
# prepare left in OUT, after a run stopped by, say, a Ray start-up timeout). Exit status 1 when anything differs.
set -euo pipefail
a=$(realpath "$1"); b=$(realpath "$2"); out=${3:-/tmp/prepared_bytes_identical}
shared=${SHARED:-$(dirname "$a")/shared}  # the real data and tokenizers: ../shared next to the first checkout
mkdir -p "$out"
cat > "$out/prep.yaml" <<EOF
model:
  name_or_path: $shared/tokenizers/qwen3
data:
  train:
    - {path: $shared/data/sharegpt/dummy_conversation.json, format: sharegpt, weight: 1}
    - {path: $shared/data/gsm8k/train.jsonl, format: prompt_completion, weight: 1.5, columns: {prompt: question, completion: answer}}
  eval_split: 0.05
  max_seq_len: 1024
  packing: bfd
  num_tokenizer_actors: 1
EOF
cases=("qwen3" "llama-3.1-instruct" "mistral-7b-instruct-v0.3|data.system_prompt=Answer briefly.")
for tree in "$a" "$b"; do
  side=$([ "$tree" == "$a" ] && echo a || echo b)
  for case in "${cases[@]}"; do
    tok=${case%%|*}; extra=()
    [[ $case == *"|"* ]] && extra=(--set "${case#*|}")
    if [ -n "${REUSE:-}" ] && [ -f "$out/$side-$tok/stats.json" ]; then echo "$side $tok: kept from an earlier run"; continue; fi
    rm -rf "$out/$side-$tok" "$out/cache-$side-$tok"
    start=$SECONDS
    (cd "$tree" && .venv/bin/raysft prepare "$out/prep.yaml" --set "model.name_or_path=$shared/tokenizers/$tok" \
      "${extra[@]}" --set "data.cache_dir=$out/cache-$side-$tok" --output "$out/$side-$tok" > "$out/$side-$tok.log" 2>&1) \
      || { tail -3 "$out/$side-$tok.log"; exit 2; }
    echo "$side $tok: prepared in $((SECONDS - start)) s ($tree)"
  done
done
status=0
for case in "${cases[@]}"; do
  tok=${case%%|*}
  sums() { (cd "$out/$1-$tok" && find . -name '*.parquet' -o -name '_index.json' | sort | xargs sha256sum); }
  stats() { python3 -c "import json, sys; s = json.load(open(sys.argv[1])); s.pop('seconds'); print(json.dumps(s))" \
    "$out/$1-$tok/stats.json"; }
  if [ "$(sums a)" == "$(sums b)" ] && [ "$(stats a)" == "$(stats b)" ]; then
    echo "$tok: $(sums a | wc -l) files identical (sha256), stats.json identical but for seconds"
  else
    echo "$tok: DIFFER"; diff <(sums a) <(sums b) || true; status=1
  fi
done
exit $status
