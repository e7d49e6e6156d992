"""The typed config schema: YAML + dotted overrides, strict validation, one-sentence errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raysft.pipeline.config import Config, accumulation, load_config
from raysft.pipeline.errors import ConfigError

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_have_the_design_keys():
    cfg = load_config()
    assert cfg.model.quantization == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 32, 0.05, "all-linear")
    assert (cfg.data.format, cfg.data.max_seq_len, cfg.data.packing, cfg.data.train_on) == (
        "auto",
        1024,
        "bfd",
        "responses",
    )
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.deepspeed.stage) == (1, 2.0e-4, 2)
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu) == (2, False)
    assert cfg.run.max_failures == 2
    assert (cfg.tune.metric, cfg.tune.mode, cfg.tune.scheduler) == ("eval_loss", "min", "asha")
    assert cfg.model.trust_remote_code is False


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model: {name_or_path: /m}\ntrain: {lr: 1.0e-3, deepspeed: {stage: 3}}\n")
    cfg = load_config(path, overrides=["train.lr=1e-4", "data.max_seq_len=512", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.model.name_or_path == "/m"
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.deepspeed.stage == 3
    assert cfg.data.max_seq_len == 512
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_round_trip_through_dict_is_identity(tmp_path):
    cfg = load_config(
        write(tmp_path, "lora: {r: 8}\n"), overrides=["tune.search_space.train.lr={loguniform: [1.0e-5, 1.0e-3]}"]
    )
    again = Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.tune.search_space == {"train.lr": {"loguniform": [1e-5, 1e-3]}}


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train: {lrr: 1}\n", [], "Unknown config key 'train.lrr' in"),
        ("", ["train.lr=abc"], "Config key 'train.lr'"),
        ("data: {packing: greedy}\n", [], "Config key 'data.packing' in"),
        ("scaling: {num_workers: -1}\n", [], "Config key 'scaling.num_workers'"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("model: [unclosed\n", [], "is not valid YAML at line"),
        ("", ["train.lr"], "must have the form key.sub=value"),
    ],
)
def test_bad_config_is_one_sentence_naming_the_path(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides=overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, expected",
    [
        (  # two top-level sections of one name: one would silently win
            "train:\n  lr: 1.0e-3\ndata:\n  max_seq_len: 512\ntrain:\n  epochs: 2\n",
            "sets key 'train' twice (line 1 and line 5); keep one.",
        ),
        ("lora:\n  r: 8\n  alpha: 16\n  r: 4\n", "sets key 'r' twice (line 2 and line 4); keep one."),
        ("train:\n  deepspeed: {stage: 2, stage: 3}\n", "sets key 'stage' twice (line 2 and line 2); keep one."),
    ],
)
def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"Config file {path} {expected}"


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    cfg = load_config(write(tmp_path, "lora:\n  <<: {r: 8, alpha: 16}\n  r: 4\n"))
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 16)


def test_conflicting_set_overrides_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=["train.lr=1e-4", "data.max_seq_len=512", "train.lr=2e-4"])
    assert str(err.value) == "--set train.lr is given twice with different values (1e-4 and 2e-4); give it once."
    # The same value twice (a wrapper script repeating a flag) says the same thing once: accepted.
    assert load_config(None, overrides=["lora.r=4", "lora.r=4"]).lora.r == 4


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/cfg.yaml")


def test_cli_config_prints_resolved_and_fails_cleanly(tmp_path):
    path = write(tmp_path, "train: {lr: 1.0e-3}\n")
    ok = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "config", str(path), "--set", "lora.r=4"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    printed = load_config(None).from_dict(__import__("yaml").safe_load(ok.stdout))
    assert printed.lora.r == 4 and printed.train.lr == pytest.approx(1e-3)

    bad = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "config", str(path), "--set", "lora.rank=4"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "Unknown config key 'lora.rank'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_every_command_documents_its_flags():
    from raysft.pipeline.cli import build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for command in [
        "prepare",
        "train",
        "tune",
        "submit",
        "status",
        "logs",
        "stop",
        "models",
        "demo",
        "export",
        "config",
    ]:
        assert command in help_text


# ---------------------------------------------------------------- the reference: --explain and docs/configuration.md


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("search_space", "chat_template_kwargs"):  # dict-valued keys
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_field_has_a_description_and_the_reference_lists_every_key():
    from pydantic import BaseModel

    from raysft.pipeline.config import config_reference

    def undocumented(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                out.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += undocumented(field.annotation, f"{prefix}{name}.")
        return out

    assert undocumented(Config) == [], "fields without Field(description=...)"
    reference = config_reference()
    assert [d.key for d in reference] == _leaf_keys(Config().to_dict())
    defaults = Config().to_dict()
    from raysft.pipeline.config import get_dotted

    for d in reference:
        assert d.default == get_dotted(defaults, d.key), d.key
    by_key = {d.key: d for d in reference}
    assert by_key["lora.r"].type == "int (>= 1)" and by_key["lora.r"].default == 16
    assert by_key["train.max_steps"].type == "int | null (>= 1)" and by_key["train.max_steps"].default is None
    assert by_key["data.packing"].type == "bfd | none"
    assert by_key["train.deepspeed.stage"].type == "0 | 1 | 2 | 3"
    assert "source" not in by_key  # where a config came from is not a key


def test_cli_explain_prints_every_key_with_type_default_and_description(tmp_path):
    from raysft.pipeline.config import config_reference

    run = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "config", "--explain"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    reference = config_reference()
    assert len(lines) == 2 * len(reference)
    for doc, head, body in zip(reference, lines[::2], lines[1::2]):
        assert head.startswith(f"{doc.key}: {doc.type} = "), head
        assert body.strip() == doc.description
    assert "train.lr: float (> 0) = 0.0002" in lines

    path = write(tmp_path, "train: {lr: 1.0e-3}\n")
    with_cfg = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "config", "--explain", str(path), "--set", "lora.r=4"],
        capture_output=True,
        text=True,
    )
    assert with_cfg.returncode == 0, with_cfg.stderr
    assert f"    in {path}: 0.001" in with_cfg.stdout and f"    in {path}: 4" in with_cfg.stdout
    assert with_cfg.stdout.count(f"    in {path}:") == 2  # only the keys it changes

    for argv, message in [(["config"], "needs a CONFIG file"), (["config", str(path), "--markdown"], "--markdown")]:
        bad = subprocess.run([sys.executable, "-m", "raysft.pipeline.cli", *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


REFERENCE_BEGIN = "<!-- BEGIN config reference: generated by `raysft config --explain --markdown`; do not edit -->"
REFERENCE_END = "<!-- END config reference -->"


def test_docs_config_reference_is_the_generated_one():
    from pathlib import Path

    from raysft.pipeline.config import explain_markdown

    printed = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "config", "--explain", "--markdown"],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0 and printed.stdout == explain_markdown(), printed.stderr
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page.count(REFERENCE_BEGIN) == 1 and page.count(REFERENCE_END) == 1, (
        "docs/configuration.md lacks the markers"
    )
    section = page.split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0]
    assert section.strip("\n") == printed.stdout.strip("\n"), (
        "docs/configuration.md's config reference differs from the schema: replace the text between its markers "
        "with the output of `raysft config --explain --markdown`"
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        ("[2, 1]", "1 <= min <= max"),
        ("[0, 2]", "1 <= min <= max"),
        ("[1, 2, 3]", "an int or [min, max]"),
    ],
)
def test_elastic_num_workers_range_is_checked_in_one_sentence(value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[f"scaling.num_workers={value}"])
    assert "scaling.num_workers" in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_elastic_global_batch_is_fixed_by_the_most_workers_and_must_split_at_every_size():
    """Refused when the config is loaded (Config's rules between fields), in one sentence naming the fields."""
    cfg = load_config(None, overrides=["scaling.num_workers=[1, 2]", "train.grad_accum=3", "train.micro_batch_size=2"])
    assert (cfg.scaling.elastic, cfg.scaling.min_workers, cfg.scaling.max_workers) == (True, 1, 2)
    assert cfg.rows_per_step() == 12  # max workers x grad_accum x micro_batch_size, at any world size
    with pytest.raises(ConfigError, match=r"go on at 2 worker\(s\), where a step's 6 packed rows"):
        cfg.with_overrides(["scaling.num_workers=[1, 3]", "train.grad_accum=1"])
    odd = cfg.with_overrides(["scaling.num_workers=[2, 3]", "train.global_batch_rows=12"])
    assert [accumulation(12, w, 2) for w in (2, 3)] == [3, 2]  # 12 rows over 2 (3 micro-batches each) and 3 workers
    assert odd.scaling.elastic
    for bad, named in (
        (["train.deepspeed.stage=3"], "ZeRO-3"),
        (["scaling.placement_strategy=STRICT_SPREAD"], "STRICT_SPREAD"),
    ):
        with pytest.raises(ConfigError, match=named):
            cfg.with_overrides(bad)
    with pytest.raises(ConfigError, match="does not split into whole micro-batches") as err:  # a fixed size too
        load_config(None, overrides=["scaling.num_workers=2", "train.global_batch_rows=3"])
    assert "\n" not in str(err.value) and "train.micro_batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="does not split"):
        accumulation(3, 2, 1)  # what a worker computes at its world size, the same sentence


def test_dtype_rule_is_refused_when_the_file_is_loaded(tmp_path):
    """A rule between fields names the fields and the file, in one sentence, before any command starts."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dtype: float16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        "model.dtype / model.compute_dtype float16 is not supported with DeepSpeed and a 4-bit base; use bfloat16 "
        f"(in {path})."
    )


def test_fields_that_do_not_change_prepared_data_are_one_list_from_the_schema():
    """data.* fields marked NOT_DATA in the schema are exactly those the cache key leaves out and those a sweep
    may vary without preparing again; every other data.* field changes the key."""
    from raysft.pipeline.config import NOT_DATA, NOT_IN_DATA_KEY, DataConfig
    from raysft.pipeline.data.cache import prepared_key
    from raysft.pipeline.sweep.space import Param

    marked = {f"data.{n}" for n, f in DataConfig.model_fields.items() if f.json_schema_extra == NOT_DATA}
    assert set(NOT_IN_DATA_KEY) == marked == {"data.cache_dir", "data.num_tokenizer_actors"}
    data = load_config(None).data.model_dump(mode="json")
    base = prepared_key(data, [], [], "tokenizer")
    for name in data:
        changes = prepared_key({**data, name: "another value"}, [], [], "tokenizer") != base
        assert changes == (f"data.{name}" not in NOT_IN_DATA_KEY), name
        assert Param(f"data.{name}", "constant", ("another value",)).changes_data == changes, name


def test_every_list_of_config_keys_names_fields_of_the_schema():
    from raysft.pipeline.config import NOT_IN_DATA_KEY, config_reference
    from raysft.pipeline.sweep.run import RESUME_MAY_DIFFER
    from raysft.pipeline.sweep.space import DATA_KEY_FIELDS
    from raysft.pipeline.training.identity import IDENTITY_KEYS

    known = {doc.key for doc in config_reference()}
    for keys in (IDENTITY_KEYS, DATA_KEY_FIELDS, NOT_IN_DATA_KEY, RESUME_MAY_DIFFER):
        assert set(keys) <= known, sorted(set(keys) - known)
