"""pipeline/models/source.py: hub id vs local path vs .gguf vs missing vs offline, answered in one place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ModelError
from raysft.pipeline.models.source import (
    base_model_path,
    hub_offline,
    is_hub_id,
    locate,
    resolve_model_source,
    tokenizer_source,
)
from raysft.pipeline.models.tokenizer import load_tokenizer


def mcfg(name: str, **over):
    return load_config(None, {"model.name_or_path": name, **over}).model


def fake_hub_cache(root: Path, repo_id: str, filename: str) -> None:
    """What huggingface_hub leaves on disk after downloading `filename` of `repo_id`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / filename).write_text("{}")


@pytest.mark.parametrize(
    "name, hub",
    [
        ("gpt2", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("./model", False),
        ("../model", False),
        ("/abs/model", False),
        ("~/model", False),
        ("a/b/c", False),
        ("model.gguf", False),
        ("org/Model.GGUF", False),
        ("org/", False),
        ("/", False),
        ("", False),
    ],
)
def test_is_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_a_name_that_exists_on_disk_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name") and is_hub_id("org/other")


@pytest.mark.parametrize(
    "env, offline",
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "false"}, False),
        ({"HF_HUB_OFFLINE": ""}, False),
        ({"TRANSFORMERS_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "True"}, True),
    ],
)
def test_hub_offline_reads_both_variables(env, offline, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert hub_offline() is offline


def test_local_folder_gguf_file_and_gguf_folder(tiny_model_dir, tmp_path):
    assert resolve_model_source(mcfg(str(tiny_model_dir))) == (str(tiny_model_dir.resolve()), None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.Q4.gguf").write_bytes(b"GGUF")
    folder = str((tmp_path / "g").resolve())
    assert resolve_model_source(mcfg(str(tmp_path / "g" / "m.Q4.gguf"))) == (folder, "m.Q4.gguf")
    assert resolve_model_source(mcfg(str(tmp_path / "g"))) == (folder, "m.Q4.gguf")
    (tmp_path / "g" / "other.gguf").write_bytes(b"GGUF")  # two files: which one must be said
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_source(mcfg(str(tmp_path / "g")))
    assert resolve_model_source(mcfg(str(tmp_path / "g"), **{"model.gguf_file": "other.gguf"}))[1] == "other.gguf"
    with pytest.raises(ModelError, match=r"^model.gguf_file nope.gguf is not in .*g\.$"):
        resolve_model_source(mcfg(str(tmp_path / "g"), **{"model.gguf_file": "nope.gguf"}))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="neither a folder nor a .gguf file"):
        resolve_model_source(mcfg(str(tmp_path / "weights.bin")))


def test_relative_paths_are_read_from_the_config_files_folder(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "conf" / "model")
    (tmp_path / "conf" / "c.yaml").write_text("model:\n  name_or_path: model\n  tokenizer: model\n")
    monkeypatch.chdir(tmp_path)  # "model" does not exist here, only next to c.yaml
    cfg = load_config(tmp_path / "conf" / "c.yaml")
    expected = str((tmp_path / "conf" / "model").resolve())
    assert resolve_model_source(cfg.model, cfg.source) == (expected, None)
    assert base_model_path(cfg.model, cfg.source) == expected
    assert tokenizer_source(cfg).location == expected and tokenizer_source(cfg).field == "model.tokenizer"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_source(cfg.model) == ("model", None)  # without the config file's folder: a bare hub id


def test_hub_ids_online_and_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model_source(mcfg("someorg/some-model")) == ("someorg/some-model", None)  # checked when loaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ModelError,
        match=r"^model.name_or_path someorg/some-model is neither a local directory nor in "
        r"the Hugging Face cache, and the hub is offline\.$",
    ):
        resolve_model_source(mcfg("someorg/some-model"))
    fake_hub_cache(tmp_path / "hub", "someorg/some-model", "config.json")
    assert resolve_model_source(mcfg("someorg/some-model")) == ("someorg/some-model", None)
    cfg = load_config(None, {"model.name_or_path": "someorg/some-model", "model.tokenizer": "someorg/tok"})
    with pytest.raises(ModelError, match=r"^model.tokenizer someorg/tok is neither .* offline\.$"):
        load_tokenizer(cfg)


def test_missing_tokenizer_names_its_field(tiny_model_dir, tmp_path):
    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir), "model.tokenizer": str(tmp_path / "tok")})
    with pytest.raises(ModelError, match=r"^model.tokenizer .*tok does not exist\.$"):
        tokenizer_source(cfg)
    src = tokenizer_source(cfg.with_overrides({"model.tokenizer": None}))
    assert (src.location, src.gguf_file, src.local, src.field) == (
        str(tiny_model_dir.resolve()),
        None,
        True,
        "model.name_or_path",
    )


def test_gguf_base_is_converted_once_for_every_caller(tmp_path, monkeypatch):
    """base_model_path is what preflight, load_base_model and export all load: a GGUF becomes one HF folder."""
    from test_fetch import write_tiny_gguf

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_tiny_gguf(tmp_path / "tiny.F32.gguf")
    first = base_model_path(mcfg(str(tmp_path / "tiny.F32.gguf")))
    assert Path(first).parent == tmp_path / "home" / ".cache" / "raysft" / "gguf"
    assert (Path(first) / "config.json").is_file()
    stamp = os.stat(Path(first) / "config.json").st_mtime_ns
    assert base_model_path(mcfg(str(tmp_path))) == first  # the folder holding one .gguf: the same copy
    assert os.stat(Path(first) / "config.json").st_mtime_ns == stamp
    assert locate(first, None, "model.name_or_path").gguf_file is None
