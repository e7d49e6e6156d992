"""The Python API end to end: fetch a model, make data, prepare, train, export, generate.

    python examples/api_prepare_train.py [--steps 20] [--output runs/api]

Every call here is what the matching command does (`raysft models fetch`, `raysft prepare`,
`raysft train`, `raysft export`); a Ray cluster is started locally or joined (run.address).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raysft.pipeline import load_config, prepare, train
from raysft.pipeline.demo.task import write_task
from raysft.pipeline.models.export import export_run
from raysft.pipeline.models.fetch import fetch_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", default="runs/api")
    args = ap.parse_args()
    out = Path(args.output).resolve()

    model_dir = fetch_model("smollm2-135m-instruct")  # raysft models fetch
    train_file, eval_file = write_task(out / "data", n_train=600, n_eval=32)
    cfg = load_config(
        Path(__file__).with_name("demo.yaml"),
        overrides={
            "model.name_or_path": str(model_dir),
            "data.train": str(train_file),
            "data.eval": str(eval_file),
            "train.max_steps": args.steps,
            "train.save_every": args.steps,
            "run.storage_path": str(out),
            "run.name": "api-run",
        },
    )

    stats = prepare(cfg, output=out / "prepared")  # raysft prepare
    print(f"prepared {stats['packed_rows']} packed rows, packing efficiency {stats['packing_efficiency']:.2f}")

    result = train(cfg)  # raysft train
    print(json.dumps(result.summary(), indent=2))

    merged = export_run(result.run_dir, merge=True)  # raysft export RUN --merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    chat = [
        {"role": "system", "content": cfg.data.system_prompt},
        {"role": "user", "content": "Write the date 1969-07-20 as day, month name and year."},
    ]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :]
    print("reply:", tok.decode(reply, skip_special_tokens=True))


if __name__ == "__main__":
    main()
