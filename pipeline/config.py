"""The one typed config schema: YAML file + `--set a.b=c` overrides -> validated `Config`.

The same object is used by the CLI, the Python API, the Ray Train worker function (as a plain
dict through `Config.to_dict()` / `Config.from_dict()`) and Ray Tune (search spaces address
fields by dotted path). Unknown keys and wrong types fail naming the dotted path and the file.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from raysft.pipeline.errors import ConfigError

# A data.* field marked so cannot change the prepared rows (where they are cached, how many actors make them):
# it stays out of the prepared-data cache key (data/cache.py) and a sweep may vary it without preparing again.
NOT_DATA = {"prepared_data": False}


class _Section(BaseModel):
    """Strict section: unknown keys are errors, values are not silently coerced across kinds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base model and how it is loaded."""

    name_or_path: str = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="Base model: a hub id, a local Hugging Face folder, or a .gguf file.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer source when it differs from name_or_path.")
    gguf_file: str | None = Field(None, description="The .gguf file inside name_or_path when that is a folder.")
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="nf4: a bitsandbytes 4-bit base (QLoRA); none: the base in model.dtype (LoRA)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype the 4-bit layers compute in; auto: bfloat16 where the hardware computes bf16 natively "
        "(CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX), else float32 (float16 is refused with DeepSpeed).",
    )
    double_quant: bool = Field(True, description="bitsandbytes nested quantization of the NF4 absmax constants.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = Field(
        None,
        description="Storage dtype of the packed 4-bit weights: uint8, or model.dtype (null: model.dtype), "
        "which lets ZeRO-3 shard them; DeepSpeed recasts any other float dtype and corrupts them.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the weights that are not quantized, the LoRA weights and DeepSpeed (bf16 or fp32); "
        "auto: as compute_dtype, decided once on the driver and said on the console.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention implementation passed to transformers; auto: flash_attention_2 (packed samples "
        "as one varlen sequence, no dense mask) on GPUs when flash-attn is importable, else sdpa.",
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")


class LoraConfig(_Section):
    """The PEFT LoRA adapter that is trained."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scale numerator: alpha / r (alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get an adapter: all-linear, or a list of module names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained (PEFT's option).")


class DataSource(_Section):
    """One training source of a weighted mix (`data.train` as a list)."""

    path: str = Field(..., description="A file, directory, glob or hf://dataset[/split], as for a single data.train.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] | None = Field(
        None, description="The row format of this source; default data.format."
    )
    weight: float = Field(
        1.0,
        gt=0,
        lt=32,
        description="Sampling ratio: each row appears floor(weight) times per epoch, plus "
        "once more with probability weight - floor(weight) (a seeded hash of the row).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="This source's field names, keyed by the standard "
        "ones (messages, conversations, role, content, from, value, prompt, completion, "
        "instruction, input, output, text, tools).",
    )


class DataConfig(_Section):
    """The data plan: sources, format, masks, packing, bad rows and the prepared-data cache."""

    train: None | str | list[DataSource] = Field(
        None,
        description="Training data: a file, a directory, a glob, or hf://NAME[/SPLIT]; or a list of weighted "
        "sources (path, format, weight, columns).",
    )
    eval: str | None = Field(None, description="Eval data, in the same forms as data.train.")
    eval_split: float = Field(
        0.0, ge=0, lt=1, description="Fraction of the train rows held out for eval when data.eval is not set."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects it per row."
    )
    max_seq_len: int = Field(1024, ge=8, description="Tokens per packed row (and the longest sample kept whole).")
    packing: Literal["bfd", "none"] = Field(
        "bfd", description="bfd: best-fit-decreasing packing of samples into rows; none: one sample per row."
    )
    train_on: Literal["responses", "all"] = Field(
        "responses", description="responses: loss on assistant turns only; all: on every token."
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to samples longer than data.max_seq_len (counted in stats.json)."
    )
    system_prompt: str | None = Field(None, description="Prepended as a system turn to rows that have none.")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip", description="skip: count a malformed row in stats.json and go on; error: stop at the first."
    )
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="Stop when more than this share of rows is bad.")
    pack_window: int = Field(4096, ge=1, description="Samples per packing window (bounds the packer's memory).")
    tokenize_batch_size: int = Field(1024, ge=1, description="Rows per chunk a tokenizer actor reads and tokenizes.")
    num_tokenizer_actors: int = Field(
        2, ge=1, description="Ray Data actors that tokenize in parallel.", json_schema_extra=NOT_DATA
    )
    cache_dir: str | None = Field(
        None,
        description="Prepared-data cache, a folder or an s3:// / gs:// URI (default: ~/.cache/raysft/prepared).",
        json_schema_extra=NOT_DATA,
    )
    shard_mb: float = Field(
        64,
        gt=0,
        description="Prepared rows are written as Parquet shards of about this many MiB (in memory); "
        "a training worker holds a few shards at a time (train.shuffle_window).",
    )
    seed: int = Field(0, description="Seed of the data.eval_split hash and of the weighted sources' fractional draw.")
    train_on_reasoning: bool = Field(
        True,
        description="Train assistant reasoning (reasoning_content or a leading "
        "<think> block); false masks it and still trains the answer.",
    )
    chat_template: str | None = Field(None, description="A Jinja chat template file that replaces the tokenizer's own.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra variables passed to the chat template, e.g. {enable_thinking: false}."
    )


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO settings."""

    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage (3 also shards the parameters).")
    offload_optimizer: bool = Field(False, description="Keep the optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="Keep the parameters in CPU memory (ZeRO-3 only).")
    config: str | None = Field(
        None,
        description="A DeepSpeed JSON file used instead of the generated one (raysft still sets its batch, "
        "precision and optimizer keys).",
    )


class LoggingConfig(_Section):
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files into the run folder.")
    mlflow: bool = Field(False, description="Log to MLflow (when mlflow is installed).")
    wandb: bool = Field(False, description="Log to Weights & Biases (when wandb is installed).")
    project: str | None = Field(None, description="Experiment / project name for MLflow or W&B (default: raysft).")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server URI (default: $MLFLOW_TRACKING_URI, else mlflow's ./mlruns)."
    )


class GenerateEvalConfig(_Section):
    """Generation eval during training: greedy replies to held-out prompts, scored on each saved checkpoint."""

    prompts: str | None = Field(
        None,
        description="Held-out prompts in any data format data.train takes (file, directory, glob, hf://); each "
        "row's last assistant turn is the reference, the turns before it the prompt. Unset: off.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] | None = Field(
        None, description="Row format of the prompts file; default data.format."
    )
    every: int = Field(
        100,
        ge=1,
        description="Generate every this many steps (and at the end); a checkpoint is "
        "saved at those steps and the eval runs on it, off the training workers.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per reply (greedy decoding).")
    metric: str = Field(
        "exact_match",
        description="exact_match (reply == reference, stripped), contains (the stripped "
        "reference occurs in the reply), or module:function / path/to/file.py:function of your own, "
        "called as fn(replies, references) -> float; logged as gen_<name>.",
    )
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")
    num_cpus: float = Field(
        1.0, gt=0, description="CPUs the eval task holds while it runs (beside the training workers)."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs the eval task holds while it runs.")
    timeout_s: float | None = Field(None, gt=0, description="Give up on one checkpoint's eval after this long.")


class TrainConfig(_Section):
    """The optimisation: steps, batch, schedule, checkpoints, DeepSpeed and logging."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides train.epochs when set.")
    epochs: int = Field(1, ge=1, description="Passes over the prepared rows (when train.max_steps is not set).")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW).")
    seed: int = Field(0, description="Seed of the LoRA init and the data order.")
    micro_batch_size: int = Field(1, ge=1, description="Packed rows per micro-batch per worker.")
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per worker per optimizer step at the most workers (with fewer, each worker takes "
        "more); ignored when train.global_batch_rows is set.",
    )
    global_batch_rows: int | None = Field(
        None,
        ge=1,
        description="Packed rows per optimizer step over all workers; null: the most workers (scaling.num_workers, "
        "or its max) x train.grad_accum x train.micro_batch_size. Fixed for the whole run: with fewer workers each "
        "takes more micro-batches, so every step trains the same rows.",
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of the total steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in steps; overrides train.warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient-norm clipping threshold; 0 disables clipping.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO settings.")
    save_every: int = Field(100, ge=1, description="Checkpoint every this many steps (and at the end).")
    eval_every: int = Field(100, ge=1, description="Evaluate every this many steps (and at the end), given eval data.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async",
        description="async: Ray Train uploads a checkpoint to run.storage_path in a background thread while "
        "the next step runs (that step's report waits for it if it is not done; one upload in flight) and "
        "registers it once every rank's copy is there. sync: the checkpoint's step waits for the upload. "
        "Under a preemption notice checkpoints are always sync.",
    )
    shuffle_window: int = Field(
        2,
        ge=1,
        description="Shards whose rows are shuffled together each epoch (after the shards are permuted). "
        "Larger mixes rows better; a worker holds this many shards, twice while it prefetches.",
    )
    kernels: bool = Field(
        False, description="Opt-in Triton kernels (raysft.kernels); their PyTorch references without a GPU."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Where metrics go besides metrics.jsonl.")
    eval_generate: GenerateEvalConfig = Field(
        default_factory=GenerateEvalConfig, description=GenerateEvalConfig.__doc__
    )


class ScalingConfig(_Section):
    """Ray Train workers and their resources."""

    num_workers: int | list[int] = Field(
        2,
        description="Training workers (processes, one per GPU with use_gpu); [min, max] for elastic training: the "
        "run starts once min workers fit, grows toward max when resources appear and goes on with fewer when a "
        "node is lost (the same rows and math per step at any size; see docs/elastic-and-preemption.md).",
    )
    resize_check_s: float = Field(
        60.0,
        gt=0,
        description="Elastic runs: seconds between Ray Train's checks for more (or fewer) workers than are running "
        "(ScalingConfig.elastic_resize_monitor_interval_s); a resize restarts the group from the last checkpoint. "
        "Keep it well above 20 s, the interval at which Ray refreshes its view of the nodes.",
    )
    use_gpu: bool = Field(False, description="Give each worker GPUs (NCCL); otherwise CPU workers over gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker holds.")
    gpus_per_worker: float = Field(
        1.0, ge=0, description="GPUs each worker holds when scaling.use_gpu is on; must be 1 (one rank per GPU)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (placement-group strategy)."
    )

    @field_validator("num_workers")
    @classmethod
    def _workers_or_range(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("scaling.num_workers must be an int or [min, max], two ints")
            if not 1 <= value[0] <= value[1]:
                raise ValueError("scaling.num_workers [min, max] needs 1 <= min <= max")
        elif value < 0:
            raise ValueError("scaling.num_workers must be at least 0")
        return value

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a [min, max] range (Ray Train's elastic worker group)."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


class RunConfig(_Section):
    """Where a run lives and how it recovers."""

    name: str = Field("raysft", description="Run name: the run folder is run.storage_path/run.name.")
    storage_path: str = Field(
        "runs",
        description="Folder of run folders: a local path (on several nodes, one every node mounts) or an "
        "s3:// / gs:// URI.",
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint before the run fails (-1: no limit)."
    )
    address: str | None = Field(
        None,
        description=(
            "Where Ray runs. Unset (or local): raysft starts its own local Ray instance and shuts it down at the end, "
            "never joining another one (inside a Ray Job: the job's cluster). auto: join the cluster `ray start` made "
            "on this machine, on purpose. HOST:PORT or ray://HOST:PORT: join that cluster. An address nobody answers "
            "at is an error within 30 s."
        ),
    )
    resume: Literal["auto", "never", "must"] = Field(
        "auto",
        description="Rerunning an existing run.name: auto resumes when its identity (run.json: data, base "
        "model, LoRA, optimizer and schedule, seed, global batch) matches and refuses otherwise; never refuses to "
        "reuse the name; must refuses unless there is a complete checkpoint to resume from.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, value: str) -> str:
        if not value.strip() or value.strip() in (".", ".."):
            raise ValueError("run.name must name a folder under run.storage_path (not empty, not . or ..)")
        return value


class StorageConfig(_Section):
    """How s3:// and gs:// URIs are reached (credentials always come from the standard environment)."""

    endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (e.g. http://minio:9000); default: AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="S3 region; default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.")
    require_credentials: bool = Field(
        True,
        description="Refuse an s3:// URI when no AWS_* credentials or ~/.aws files are found; false for "
        "anonymous buckets and instance roles.",
    )


class TuneConfig(_Section):
    """The Ray Tune sweep of `raysft tune`."""

    search_space: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config key -> a list (grid), {choice: [...]}, "
        "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, or a constant.",
    )
    num_samples: int = Field(1, ge=1, description="Samples of the sampled keys; a grid is repeated this many times.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Most trials at once (default: as many as the cluster fits)."
    )
    scheduler: Literal["asha", "none"] = Field("asha", description="Trial scheduler: ASHA early stopping, or none.")
    grace_period: int = Field(1, ge=1, description="ASHA: reported steps before a trial can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: rungs at grace_period x reduction_factor^k.")
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random", description="random or grid (Ray Tune's variant generator), or optuna (TPE)."
    )
    metric: str = Field("eval_loss", description="The reported metric trials are judged on.")
    mode: Literal["min", "max"] = Field("min", description="Whether tune.metric is minimised or maximised.")
    alpha_rule: Literal["2r", "r"] | None = Field(
        None, description="Derive lora.alpha from the sampled lora.r (2r: alpha = 2 x r); unset: as configured."
    )


class Config(_Section):
    """The whole config: one section per part of the pipeline."""

    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    lora: LoraConfig = Field(default_factory=LoraConfig, description=LoraConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description=ScalingConfig.__doc__)
    run: RunConfig = Field(default_factory=RunConfig, description=RunConfig.__doc__)
    storage: StorageConfig = Field(default_factory=StorageConfig, description=StorageConfig.__doc__)
    tune: TuneConfig = Field(default_factory=TuneConfig, description=TuneConfig.__doc__)
    source: str | None = Field(None, exclude=True, description="The file the config was loaded from (for messages).")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict (what travels to Ray workers and is saved next to checkpoints)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Config:
        return _validate(data, source)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> Config:
        """A copy with `a.b=c` strings (YAML-parsed values) or a {dotted: value} dict applied."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else _split_overrides(overrides)
        for key, value in items:
            set_dotted(data, key, value, self.source)
        return _validate(data, self.source)

    def rows_per_step(self, world_size: int | None = None) -> int:
        """Packed rows per optimizer step: train.global_batch_rows, else the most workers (or `world_size`, for a
        launcher such as torchrun that fixes it) x grad_accum x micro_batch_size."""
        t = self.train
        if t.global_batch_rows is not None:
            return t.global_batch_rows
        return (world_size or self.scaling.max_workers) * t.grad_accum * t.micro_batch_size

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @model_validator(mode="after")
    def _rules_between_fields(self) -> Config:
        """Settings that each hold alone but not together, refused at load time in one sentence naming the
        fields (what needs a cluster, a model or the data is checked when a command starts)."""
        for rule in (_dtype_rule, _gpu_rule, _batch_rule):
            problem = rule(self)
            if problem is not None:
                raise PydanticCustomError(RULE_ERROR, problem)
        return self

    def resolve_path(self, path: str | None) -> str | None:
        """Relative data/model paths are relative to the config file's folder when they exist there."""
        return resolve_relative(path, self.source)


# The data.* fields marked NOT_DATA, as dotted keys.
NOT_IN_DATA_KEY: tuple[str, ...] = tuple(
    f"data.{name}" for name, field in DataConfig.model_fields.items() if field.json_schema_extra == NOT_DATA
)

# --------------------------------------------------------------------------- rules between fields

RULE_ERROR = "config_rule"  # a pydantic error type whose message is the whole sentence (_one_sentence)


def split_problem(rows_per_step: int, world_size: int, micro_batch_size: int) -> str | None:
    """Why a step of `rows_per_step` packed rows cannot be split into whole micro-batches over `world_size`
    workers, or None when it can."""
    per_round = world_size * micro_batch_size
    if rows_per_step % per_round == 0:
        return None
    return (
        f"An optimizer step of {rows_per_step} packed rows does not split into whole micro-batches of "
        f"train.micro_batch_size {micro_batch_size} over {world_size} workers; make the global batch "
        f"(train.global_batch_rows) a multiple of {per_round}."
    )


def accumulation(rows_per_step: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches each of `world_size` workers takes so that an optimizer step trains exactly `rows_per_step`
    rows (the global batch is fixed by the config; with fewer workers each takes more)."""
    problem = split_problem(rows_per_step, world_size, micro_batch_size)
    if problem is not None:
        raise ConfigError(problem)
    return rows_per_step // (world_size * micro_batch_size)


def _dtype_rule(cfg: Config) -> str | None:
    m = cfg.model
    if m.dtype == "float16" or (m.quantization == "nf4" and m.compute_dtype == "float16"):
        return (
            "model.dtype / model.compute_dtype float16 is not supported with DeepSpeed and a 4-bit base; use bfloat16."
        )
    return None


def _gpu_rule(cfg: Config) -> str | None:
    """Settings that would silently break a GPU run: several GPUs per worker, and a 4-bit storage dtype
    DeepSpeed recasts."""
    s, m = cfg.scaling, cfg.model
    if s.use_gpu and s.gpus_per_worker != 1:
        return (
            f"scaling.gpus_per_worker must be 1 with scaling.use_gpu (got {s.gpus_per_worker:g}): each worker is one "
            "rank on one GPU; use more scaling.num_workers instead."
        )
    # dtype auto is checked once it is resolved (models/precision.py revalidates the resolved config)
    if m.quantization == "nf4" and m.dtype != "auto" and m.quant_storage not in (None, "uint8", m.dtype):
        return (
            f"model.quant_storage {m.quant_storage} must be uint8 or equal to model.dtype ({m.dtype}): DeepSpeed "
            "recasts the packed 4-bit weights to model.dtype, which corrupts them in any other float dtype."
        )
    return None


def _batch_rule(cfg: Config) -> str | None:
    """Every worker count Ray Train may pick must split the fixed global batch into whole micro-batches, and the
    checkpoint must be re-partitionable to it (training/checkpoint.py; ARCHITECTURE.md, "Elastic training")."""
    s, t = cfg.scaling, cfg.train
    if s.min_workers < 1:  # no training workers: refused by the commands that train (trainer.preflight)
        return None
    rows = cfg.rows_per_step()
    bad = [w for w in range(s.min_workers, s.max_workers + 1) if split_problem(rows, w, t.micro_batch_size)]
    if bad and not s.elastic:
        return split_problem(rows, bad[0], t.micro_batch_size)
    if bad:
        shown = ", ".join(str(w) for w in bad)
        return (
            f"scaling.num_workers {s.num_workers} lets the run go on at {shown} worker(s), where a step's "
            f"{rows} packed rows (train.global_batch_rows, or max workers x grad_accum x micro_batch_size) do not "
            f"split into whole micro-batches of train.micro_batch_size {t.micro_batch_size}; set "
            "train.global_batch_rows to a multiple of micro_batch_size x every worker count in the range."
        )
    if s.elastic and t.deepspeed.stage == 3:
        return (
            "scaling.num_workers [min, max] needs train.deepspeed.stage 0, 1 or 2: raysft cannot yet re-partition "
            "ZeRO-3 optimizer state to another worker count."
        )
    if s.elastic and s.placement_strategy.startswith("STRICT_"):
        return (
            f"scaling.num_workers [min, max] cannot use scaling.placement_strategy {s.placement_strategy}: Ray Train's "
            "elastic sizing counts workers by resources alone, so a strict placement it cannot meet would never start."
        )
    return None


def resolve_relative(path: str | None, source: str | None) -> str | None:
    """`path` as written, or relative to the folder of config file `source` when it exists only there."""
    if path is None or "://" in path or os.path.isabs(path) or source is None:
        return path
    candidate = Path(source).parent / path
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
            loaded = yaml.load(p.read_text(), Loader=_StrictLoader)
        except _DuplicateKey as dup:
            raise ConfigError(
                f"Config file {source} sets key '{dup.key}' twice (line {dup.first} and line {dup.line}); keep one."
            ) from None
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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first, self.line = key, first, line


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


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


def _split_overrides(texts: list[str]) -> list[tuple[str, Any]]:
    """`a.b=c` strings parsed; the same key twice with different values is refused (one would silently win)."""
    given: dict[str, Any] = {}
    items = []
    for text in texts:
        key, value = _split_override(text)
        if key in given and given[key] != value:
            raise ConfigError(
                f"--set {key} is given twice with different values ({show_value(given[key])} and "
                f"{show_value(value)}); give it once."
            )
        given[key] = value
        items.append((key, value))
    return items


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
    if err["type"] == RULE_ERROR:  # already one sentence naming its fields
        return f"{err['msg'].removesuffix('.')}" + (f" (in {source})." if source else ".")
    given = err.get("input")
    message = err["msg"].removeprefix("Value error, ").rstrip(".")
    return f"Config key '{path}'{where} has a bad value {given!r}: {message}{more}."


# ---------------------------------------------------------------- the reference (`raysft config --explain`)

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference shows it: dotted path, type, default and description."""

    key: str
    type: str
    default: Any
    description: str


def config_reference(model: type[BaseModel] = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of the schema in file order, nested sections flattened to dotted paths (from the fields)."""
    out: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            out += config_reference(field.annotation, key + ".")
            continue
        bounds = [f"{_BOUNDS[k]} {getattr(m, k)}" for m in field.metadata for k in _BOUNDS if hasattr(m, k)]
        kind = _type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        out.append(KeyDoc(key, kind, field.get_default(call_default_factory=True), field.description or ""))
    return out


def explain_text(cfg: Config | None = None) -> str:
    """The reference for a terminal; with `cfg`, each key it sets to another value than the default shows it."""
    lines = []
    values = cfg.to_dict() if cfg is not None else None
    for doc in config_reference():
        lines.append(f"{doc.key}: {doc.type} = {show_value(doc.default)}")
        lines.append(f"    {doc.description}")
        if values is not None:
            value = get_dotted(values, doc.key)
            if value != doc.default:
                lines.append(f"    in {cfg.source or 'this config'}: {show_value(value)}")
    return "\n".join(lines) + "\n"


def explain_markdown() -> str:
    """The reference as docs/configuration.md shows it: one table per section (`raysft config --explain --markdown`)."""
    docs = config_reference()
    parts = []
    for name, field in Config.model_fields.items():
        if field.exclude:
            continue
        parts.append(f"**`{name}`**: {(field.description or '').strip()}\n")
        parts.append("| key | type | default | description |\n| --- | --- | --- | --- |")
        for d in docs:
            if d.key.startswith(name + "."):
                cells = [f"`{d.key}`", f"`{d.type}`", f"`{show_value(d.default)}`", d.description]
                parts.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def show_value(value: Any) -> str:
    """A value as it is written in YAML: null, true, 0.0002, all-linear, {}."""
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union or origin is UnionType:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is dict:
        return "mapping"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))
