"""`raysft export RUN [--merge]`: hand out a run's adapter, or merge it into the base model.

The merge loads the base in bf16 (not fp32, and never the 4-bit weights) on CPU, merges the adapter
in place layer by layer (PEFT computes each layer's delta in fp32, then adds it in bf16) and saves a
plain bf16 safetensors model. Peak memory is about 2 bytes x the base's parameters plus one layer's
fp32 delta: ~140 GB for a 70B base, ~16 GB for 8B.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.config import Config, load_config
from raysft.pipeline.errors import ModelError
from raysft.pipeline.models.load import torch_dtype
from raysft.pipeline.models.source import base_model_path
from raysft.pipeline.models.tokenizer import load_tokenizer
from raysft.pipeline.outputs import atomic_output, check_output
from raysft.pipeline.run_folder import ADAPTER_DIR, MERGED_DIR, RESOLVED_CONFIG

MERGE_DTYPES = ("bfloat16", "float32")


def export_run(
    run_dir: str | os.PathLike, merge: bool = False, output: str | os.PathLike | None = None, dtype: str = "bfloat16"
) -> Path | str:
    """Copy the run's adapter (to `output` when given), or merge it into the base and save a `dtype` model.

    `dtype` "float32" merges and saves in fp32 (4 bytes per parameter); the default bf16 needs half that.
    """
    if storage.is_remote(run_dir) or (output is not None and storage.is_remote(output)):
        return _export_remote(str(run_dir), merge, output, dtype)
    run = Path(run_dir)
    adapter = run / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{run} has no {ADAPTER_DIR}/adapter_config.json (is it a finished raysft run directory?).")
    if not merge:
        if output is None:
            return adapter
        with atomic_output(output, "export", [adapter]) as tmp:  # never onto others' files; swapped in on success
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        return Path(output)
    if dtype not in MERGE_DTYPES:
        raise ModelError(f"The merge dtype must be one of {', '.join(MERGE_DTYPES)}, not {dtype}.")
    cfg = _run_config(run)
    out = Path(output) if output else run / MERGED_DIR
    inputs = [adapter, run / RESOLVED_CONFIG, cfg.model.name_or_path]
    check_output(out, "export", inputs)  # before the merge, which takes long
    merged = merge_adapter(cfg, adapter, dtype)
    with atomic_output(out, "export", inputs) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        try:
            load_tokenizer(cfg, need_chat_template=False).save_pretrained(tmp)
        except ModelError:
            pass  # the merged weights are still usable with the base's tokenizer
    return out


def _export_remote(run_dir: str, merge: bool, output: str | os.PathLike | None, dtype: str) -> Path | str:
    """A run folder and/or an output on an object store: the adapter and config.yaml are staged in a
    temporary folder (removed afterwards), exported there, and the result uploaded when `output` is a URI."""
    with tempfile.TemporaryDirectory(prefix="raysft-export-") as tmp:
        run = Path(tmp) / "run"
        if storage.is_remote(run_dir):
            run.mkdir()
            storage.download(storage.join(run_dir, ADAPTER_DIR), run / ADAPTER_DIR)
            storage.download(storage.join(run_dir, RESOLVED_CONFIG), run / RESOLVED_CONFIG)
            if not (run / ADAPTER_DIR / "adapter_config.json").is_file():
                raise ModelError(f"{run_dir} has no {ADAPTER_DIR}/adapter_config.json (is it a finished raysft run?).")
        else:
            run = Path(run_dir)
        remote_out = output is not None and storage.is_remote(output)
        local_out = Path(tmp) / "out" if remote_out or output is None else Path(output)
        result = export_run(run, merge=merge, output=local_out, dtype=dtype)
        if remote_out:
            storage.upload(result, str(output))
            return str(output)
        if output is None:  # the default output lives in the (remote) run folder
            target = storage.join(run_dir, MERGED_DIR if merge else ADAPTER_DIR)
            if merge:
                storage.upload(result, target)
            return target
        return result


def merge_adapter(cfg: Config, adapter: str | os.PathLike, dtype: str = "bfloat16"):
    """The run's base (full precision, in `dtype`, on CPU) with `adapter` merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_model_path(cfg.model),
        dtype=torch_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config.use_cache = True
    return merged


def _run_config(run: Path) -> Config:

    path = run / RESOLVED_CONFIG
    if not path.is_file():
        raise ModelError(f"{run} has no {RESOLVED_CONFIG}, so the base model of the run is unknown.")
    return load_config(path)
