"""`raysft export RUN --format peft|merged|gguf`: hand a run's result to a serving tool.

- peft: the adapter (adapter_config.json + adapter_model.safetensors), for vLLM / TGI with the base.
- merged: base + adapter as one safetensors model with tokenizer, chat template and generation
  config, the layout vLLM and TGI load (`docs/exports.md`).
- gguf: the merged model as one GGUF file (`gguf_export.py`) for llama.cpp / Ollama.

Every export carries a model card (README.md, `model_card.py`) and is written into a temporary
sibling swapped in only on success (`outputs.atomic_output`), so a failed export leaves an earlier
one in place.

The merge (also behind gguf) loads the base in the dtype it is stored in, never the 4-bit weights
an NF4 run trained against: QLoRA's adapter is merged onto the full-precision base. Each LoRA layer
is upcast to fp32, merged there (PEFT's own merge: LoRA, rsLoRA, DoRA), and cast once to the export
dtype; every other weight is cast once. Peak memory: the base at its stored dtype plus one layer in
fp32, e.g. ~16 GB for an 8B base stored in bf16.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.config import Config, load_config
from raysft.pipeline.errors import ConfigError, ModelError
from raysft.pipeline.models.gguf_export import check_architecture, write_gguf
from raysft.pipeline.models.load import torch_dtype
from raysft.pipeline.models.model_card import write_card
from raysft.pipeline.models.source import base_model_path
from raysft.pipeline.models.tokenizer import load_tokenizer
from raysft.pipeline.outputs import atomic_output, check_output
from raysft.pipeline.run_folder import ADAPTER_DIR, MERGED_DIR, RESOLVED_CONFIG

FORMATS = ("peft", "merged", "gguf")
DEFAULT_DIRS = {"peft": "peft", "merged": MERGED_DIR, "gguf": "gguf"}  # under the run folder
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}  # --dtype -> torch name
DEFAULT_DTYPE = {"merged": "bf16", "gguf": "f16"}
QUANTS = ("q8_0",)


def export_run(
    run_dir: str | os.PathLike,
    merge: bool = False,
    output: str | os.PathLike | None = None,
    dtype: str | None = None,
    format: str | None = None,
    quant: str | None = None,
) -> Path | str:
    """Export the run in `format` (default peft; `merge=True` is format "merged") into `output`
    (default RUN/<format>); return where it is."""
    fmt, dtype = _check_request(format or ("merged" if merge else "peft"), dtype, quant)
    if storage.is_remote(run_dir) or (output is not None and storage.is_remote(output)):
        return _export_remote(str(run_dir), fmt, output, dtype, quant)
    return export_many(run_dir, [(fmt, dtype, quant, output)])[0]


def export_many(
    run_dir: str | os.PathLike, requests: list[tuple[str, str | None, str | None, str | os.PathLike | None]]
) -> list[Path]:
    """Several local exports of one run, (format, dtype, quant, output) each, from a single merge: the base +
    adapter is merged once in fp32 and every export casts from it once (what `raysft demo` does)."""
    checked = [(*_check_request(fmt, dtype, quant), quant, output) for fmt, dtype, quant, output in requests]
    run = Path(run_dir)
    adapter = run / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{run} has no {ADAPTER_DIR}/adapter_config.json (is it a finished raysft run directory?).")
    cfg = _run_config(run, required=any(fmt != "peft" for fmt, *_ in checked))
    inputs = [adapter, run / RESOLVED_CONFIG] + ([cfg.model.name_or_path] if cfg else [])
    outs = [Path(out) if out is not None else run / DEFAULT_DIRS[fmt] for fmt, _, _, out in checked]
    for out in outs:
        check_output(out, "export", inputs)  # before the merge, which takes long
    if any(fmt == "gguf" for fmt, *_ in checked):
        _check_gguf_architecture(cfg)
    merged_dtypes = [DTYPES[dtype] for fmt, dtype, _, _ in checked if fmt == "merged"]
    model = tokenizer = None
    if any(fmt != "peft" for fmt, *_ in checked):
        single = len(set(merged_dtypes)) == 1 and len(merged_dtypes) == len(checked)  # merged straight to its dtype
        model = merge_adapter(cfg, adapter, merged_dtypes[0] if single else "float32")
        tokenizer = _tokenizer(cfg)
    # gguf first (written from fp32), then merged ones in falling precision, each cast once from fp32
    order = sorted(range(len(checked)), key=lambda i: (checked[i][0] == "merged", -_BYTES.get(checked[i][1], 0)))
    last_merged = order[-1] if checked[order[-1]][0] == "merged" else None  # cast in place, no copy
    for i in order:
        fmt, dtype, quant, _ = checked[i]
        with atomic_output(outs[i], "export", inputs) as tmp:
            if fmt == "peft":
                shutil.copytree(adapter, tmp, dirs_exist_ok=True)
                _card(tmp, run, cfg, fmt, {"adapter": "PEFT LoRA adapter; load it onto the base model named below"})
            elif fmt == "gguf":
                _save_gguf(model, tokenizer, tmp, cfg, quant or dtype)
                details = {"tensor type": (quant or dtype).upper(), "file": _gguf_name(cfg, quant or dtype)}
                _card(tmp, run, cfg, fmt, details)
            else:
                target = torch_dtype(DTYPES[dtype])
                one = model if i == last_merged else copy.deepcopy(model)
                save_merged(one.to(target), tokenizer, tmp)
                details = {
                    "dtype": DTYPES[dtype],
                    "merge": "LoRA merged in fp32 onto the full-precision base, cast once",
                }
                _card(tmp, run, cfg, fmt, details)
    return outs


_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def _check_request(fmt: str, dtype: str | None, quant: str | None) -> tuple[str, str | None]:
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    long_names = {v: k for k, v in DTYPES.items()}
    dtype = long_names.get(dtype, dtype)  # bfloat16 etc. accepted too
    if dtype is not None and fmt == "peft":
        raise ConfigError(
            "--dtype applies to the merged and gguf formats; a peft export copies the adapter as trained."
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"The export dtype must be one of {', '.join(DTYPES)}, not {dtype}.")
    if quant is not None and (fmt != "gguf" or quant not in QUANTS):
        raise ConfigError(f"--quant {quant} is not available for the {fmt} format; the gguf format takes --quant q8_0.")
    if quant is not None and dtype is not None:
        raise ConfigError(f"--quant {quant} and --dtype {dtype} both set the GGUF tensor type; give one of them.")
    return fmt, dtype or (None if quant else DEFAULT_DTYPE.get(fmt))


def _card(folder: Path, run: Path, cfg: Config | None, fmt: str, details: dict[str, str]) -> None:
    if cfg is None:
        text = (
            f"# {run.name} (peft export)\n\nA raysft LoRA adapter; {run / RESOLVED_CONFIG} was missing, "
            "so its base model and training are unknown.\n"
        )
        (folder / "README.md").write_text(text)
        return
    write_card(folder, run, cfg, fmt, details)


def _tokenizer(cfg: Config):
    try:
        return load_tokenizer(cfg, need_chat_template=False)
    except ModelError:
        return None  # the merged weights are still usable with the base's tokenizer; gguf refuses below


def save_merged(model, tokenizer, folder: Path) -> None:
    """Safetensors weights, config.json, generation_config.json and the tokenizer with its chat template in
    tokenizer_config.json too, readable by vLLM / TGI pinned to an older transformers (docs/exports.md)."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype"))  # transformers < 4.56 and tools reading the file itself
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is None:
        return
    tokenizer.save_pretrained(folder)
    tok_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # TokenizersBackend exists only in transformers 5
    if tokenizer.chat_template:
        tok_config["chat_template"] = tokenizer.chat_template  # TGI reads it here; transformers 5 also writes .jinja
    tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    _stop_on_end_of_turn(folder, tokenizer)


def _stop_on_end_of_turn(folder: Path, tokenizer) -> None:
    """generation_config.json's eos_token_id includes the tokenizer's EOS (the chat template's end of turn)."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if ids:
        gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        gen.setdefault("pad_token_id", tokenizer.pad_token_id)
    path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _gguf_name(cfg: Config, qtype: str) -> str:
    return f"{cfg.run.name}-{qtype.upper()}.gguf"


def _check_gguf_architecture(cfg: Config) -> None:
    from transformers import AutoConfig

    path = base_model_path(cfg.model)
    check_architecture(AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code))


def _save_gguf(model, tokenizer, folder: Path, cfg: Config, qtype: str) -> None:
    if tokenizer is None:
        raise ModelError(
            f"GGUF export needs the run's tokenizer, which could not be loaded for {cfg.model.name_or_path}."
        )
    with tempfile.TemporaryDirectory(prefix="raysft-gguf-tok-") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        write_gguf(model, tok_dir, folder / _gguf_name(cfg, qtype), qtype, cfg.run.name)


def _export_remote(run_dir: str, fmt: str, output: str | os.PathLike | None, dtype: str | None, quant: str | None):
    """A run folder and/or an output on an object store: the run's adapter, config.yaml, run.json and
    metrics.jsonl are staged in a temporary folder (removed afterwards), exported there, and the result
    uploaded when `output` is a URI (default: RUN/<format>)."""
    with tempfile.TemporaryDirectory(prefix="raysft-export-") as tmp:
        run = Path(tmp) / "run"
        if storage.is_remote(run_dir):
            run.mkdir()
            storage.download(storage.join(run_dir, ADAPTER_DIR), run / ADAPTER_DIR)
            storage.download(storage.join(run_dir, RESOLVED_CONFIG), run / RESOLVED_CONFIG)
            for name in ("run.json", "metrics.jsonl"):  # for the model card; absent is fine
                try:
                    storage.download(storage.join(run_dir, name), run / name)
                except Exception:  # noqa: BLE001 - the card says what it could not read
                    pass
            if not (run / ADAPTER_DIR / "adapter_config.json").is_file():
                raise ModelError(f"{run_dir} has no {ADAPTER_DIR}/adapter_config.json (is it a finished raysft run?).")
        else:
            run = Path(run_dir)
        remote_out = output is None or storage.is_remote(output)
        local_out = Path(tmp) / "out" if remote_out else Path(output)
        result = export_run(run, output=local_out, dtype=dtype if fmt != "peft" else None, format=fmt, quant=quant)
        if not remote_out:
            return result
        target = str(output) if output is not None else storage.join(run_dir, DEFAULT_DIRS[fmt])
        storage.upload(result, target)
        return target


def merge_adapter(cfg: Config, adapter: str | os.PathLike, dtype: str = "bfloat16"):
    """The run's base (full precision, on CPU) with `adapter` merged in fp32 and every weight cast once to `dtype`."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    target = torch_dtype(dtype)
    base = AutoModelForCausalLM.from_pretrained(
        base_model_path(cfg.model),
        dtype="auto",  # as stored: upcast per layer below, not the whole model
        use_safetensors=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.to(torch.float32)  # this layer's base weight and LoRA factors
                module.merge()
                module.get_base_layer().to(target)
    merged = peft_model.unload()  # the LoRA modules go; their base layers hold the merged weights
    merged.to(target)
    merged.config.use_cache = True
    return merged


def _run_config(run: Path, required: bool = True) -> Config | None:
    path = run / RESOLVED_CONFIG
    if not path.is_file():
        if not required:
            return None
        raise ModelError(f"{run} has no {RESOLVED_CONFIG}, so the base model of the run is unknown.")
    return load_config(path)
