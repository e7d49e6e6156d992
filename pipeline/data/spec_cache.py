"""The config's tokenizer as a TokenizerSpec (what the data plan's actors run on), cached per tokenizer folder.

The spec is built once through transformers (`load_tokenizer`, with its checks) and cached next to
the prepared data, keyed by the folder's file names, sizes and mtimes and the transformers and
tokenizers versions, so later prepare/train/tune calls on an unchanged folder skip the ~2.5 s
transformers + torch import.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from raysft.pipeline.atomic import write_atomic
from raysft.pipeline.data.cache import cache_root, lock_root
from raysft.pipeline.data.light_tokenizer import TokenizerSpec
from raysft.pipeline.models.source import tokenizer_source
from raysft.pipeline.models.tokenizer import load_tokenizer, no_chat_template


def _spec_cache_path(cfg, src: str, gguf: str | None) -> Path | None:
    """Where the TokenizerSpec of a local tokenizer directory is cached, keyed by every top-level file's
    name, size and mtime there plus the transformers and tokenizers versions; None for hub ids."""
    folder = Path(src)
    if not folder.is_dir():
        return None
    try:
        stats = [(f.name, f.stat()) for f in folder.iterdir() if f.is_file()]
        files = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats)
        versions = [version("transformers"), version("tokenizers")]
    except (OSError, PackageNotFoundError):
        return None
    blob = json.dumps([str(folder.resolve()), gguf, cfg.model.trust_remote_code, files, versions])
    root = cache_root(cfg)
    if not isinstance(root, Path):  # a cache on an object store: the spec of a local folder stays local
        root = lock_root().parent / "prepared"
    return root / "tokenizers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"


def load_tokenizer_spec(cfg, need_chat_template: bool | None = None) -> TokenizerSpec:
    """The config's tokenizer as a TokenizerSpec (what the data plan runs on).

    Built once through transformers (`load_tokenizer`, with its checks) and cached next to the
    prepared data, so later prepare/train/tune calls on an unchanged tokenizer folder skip the
    ~2.5 s transformers + torch import. The cached spec is transformers' own output, not a re-implementation.
    """
    if need_chat_template is None:
        need_chat_template = cfg.data.format != "text"
    src = tokenizer_source(cfg)
    path = _spec_cache_path(cfg, src.location, src.gguf_file)
    if path is not None and path.is_file():
        try:
            spec = TokenizerSpec.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            spec = None  # unreadable or from an older layout: rebuild below
        if spec is not None:
            if need_chat_template and not spec.chat_template:
                raise no_chat_template(src.location, src.field)
            return spec
    spec = TokenizerSpec.from_hf(load_tokenizer(cfg, need_chat_template))
    if path is not None:
        try:
            write_atomic(path, spec.to_json())  # concurrent writers write the same content
        except OSError:
            pass  # a read-only cache only costs the next call the transformers import
    return spec
