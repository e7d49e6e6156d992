"""The one typed config schema: YAML file + `--set a.b=c` overrides -> validated `Config`.

The same object is used by the CLI, the Python API, the Ray Train worker function (as a plain
dict through `Config.to_dict()` / `Config.from_dict()`) and Ray Tune (search spaces address
fields by dotted path). Unknown keys and wrong types fail naming the dotted path and the file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raysft.pipeline.errors import ConfigError


class _Section(BaseModel):
    """Strict section: unknown keys are errors, values are not silently coerced across kinds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id, local directory, or .gguf file
    tokenizer: Optional[str] = None  # tokenizer source when it differs from name_or_path
    gguf_file: Optional[str] = None  # file name inside name_or_path when it is a GGUF directory
    quantization: Literal["nf4", "none"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = True  # bitsandbytes nested quantization of the NF4 absmax
    # Container dtype of the packed 4-bit weights: uint8, or model.dtype (None: model.dtype), which lets
    # ZeRO-3 partition them; any other float dtype is recast by DeepSpeed and corrupts them.
    quant_storage: Optional[Literal["uint8", "bfloat16", "float16", "float32"]] = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of the non-quantized weights
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False  # off unless the user turns it on


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[str, list[str]] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class DataConfig(_Section):
    train: Optional[str] = None  # file, directory, glob, or hf://dataset[/split]
    eval: Optional[str] = None
    eval_split: float = Field(0.0, ge=0, lt=1)  # fraction of train held out when `eval` is not set
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    max_seq_len: int = Field(1024, ge=8)
    packing: Literal["bfd", "none"] = "bfd"
    train_on: Literal["responses", "all"] = "responses"
    too_long: Literal["truncate", "drop"] = "truncate"  # samples longer than max_seq_len
    system_prompt: Optional[str] = None  # prepended as a system turn when a row has none
    on_bad_row: Literal["skip", "error"] = "skip"
    max_bad_fraction: float = Field(0.1, ge=0, le=1)  # stop when more than this share of rows is bad
    pack_window: int = Field(4096, ge=1)  # samples per packing window (bounds memory)
    tokenize_batch_size: int = Field(1024, ge=1)
    num_tokenizer_actors: int = Field(2, ge=1)
    cache_dir: Optional[str] = None  # default: ~/.cache/raysft/prepared
    seed: int = 0  # for eval_split


class DeepSpeedConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    config: Optional[str] = None  # a user's DeepSpeed JSON; overrides the generated one


class LoggingConfig(_Section):
    tensorboard: bool = True
    mlflow: bool = False
    wandb: bool = False
    project: Optional[str] = None  # experiment / project name for MLflow or W&B


class TrainConfig(_Section):
    max_steps: Optional[int] = Field(None, ge=1)
    epochs: int = Field(1, ge=1)
    lr: float = Field(2.0e-4, gt=0)
    seed: int = 0
    micro_batch_size: int = Field(1, ge=1)  # packed rows per micro-batch per worker
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: Optional[int] = Field(None, ge=0)  # overrides warmup_ratio when set
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    save_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    kernels: bool = False  # opt-in Triton kernels (raysft.kernels); PyTorch references without a GPU
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # must be 1 with use_gpu (one rank per GPU)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class RunConfig(_Section):
    name: str = "raysft"
    storage_path: str = "runs"
    max_failures: int = Field(2, ge=-1)
    address: Optional[str] = None  # Ray address to connect to; default starts or joins a local one


class TuneConfig(_Section):
    search_space: dict[str, Any] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # in reported steps, for ASHA
    reduction_factor: float = Field(2, gt=1)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    alpha_rule: Optional[Literal["2r", "r"]] = None  # derive lora.alpha from the sampled lora.r


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    source: Optional[str] = Field(None, exclude=True)  # the file it was loaded from, for messages

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict (what travels to Ray workers and is saved next to checkpoints)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "Config":
        return _validate(data, source)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """A copy with `a.b=c` strings (YAML-parsed values) or a {dotted: value} dict applied."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            set_dotted(data, key, value, self.source)
        return _validate(data, self.source)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve_path(self, path: str | None) -> str | None:
        """Relative data/model paths are relative to the config file's folder when they exist there."""
        if path is None or "://" in path or os.path.isabs(path) or self.source is None:
            return path
        candidate = Path(self.source).parent / path
        return str(candidate) if candidate.exists() and not Path(path).exists() else path


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {source} does not exist.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"Config file {source} is not valid YAML{where}.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {source} must hold a mapping of sections, not a {type(loaded).__name__}.")
        data = loaded
    cfg = _validate(data, source)
    return cfg.with_overrides(overrides) if overrides else cfg


def set_dotted(data: dict[str, Any], key: str, value: Any, source: str | None = None) -> None:
    """Set `data[a][b] = value` for key "a.b"; the path must exist in the schema (checked on validate)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"Override key '{key}' is not a dotted path like train.lr.")
    # tune.search_space takes dotted keys of its own as one key.
    if parts[:2] == ["tune", "search_space"] and len(parts) > 2:
        data.setdefault("tune", {}).setdefault("search_space", {})[".".join(parts[2:])] = value
        return
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"Override key '{key}': '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must have the form key.sub=value.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _validate(data: dict[str, Any], source: str | None) -> Config:
    data = copy.deepcopy(data)
    data.pop("source", None)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_sentence(exc, source)) from None
    object.__setattr__(cfg, "source", source)
    return cfg


def _one_sentence(exc: ValidationError, source: str | None) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    where = f" in {source}" if source else ""
    more = f" ({len(exc.errors()) - 1} more problem(s) after this one)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"Unknown config key '{path}'{where}{more}."
    given = err.get("input")
    return f"Config key '{path}'{where} has a bad value {given!r}: {err['msg'].rstrip('.')}{more}."
