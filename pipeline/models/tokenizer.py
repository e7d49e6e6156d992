"""The one tokenizer loader: training, the data plan, the demo's eval and export all load it here."""

from __future__ import annotations

from raysft.pipeline.config import Config
from raysft.pipeline.errors import ModelError
from raysft.pipeline.models.source import tokenizer_source


def no_chat_template(location: str, field: str) -> ModelError:
    return ModelError(
        f"The tokenizer {location} ({field}) has no chat template; use an instruct model's tokenizer or "
        "set data.format=text."
    )


def load_tokenizer(cfg: Config, need_chat_template: bool | None = None):
    """The tokenizer of `cfg.model.tokenizer` (else `cfg.model.name_or_path`), fast and with offsets.

    Raises ModelError (one sentence) when it is missing, not a tokenizer, not a fast tokenizer, or
    has no chat template while one is needed (by default: every data format but `text`).
    """
    from transformers import AutoTokenizer

    src = tokenizer_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            src.location, trust_remote_code=cfg.model.trust_remote_code, gguf_file=src.gguf_file
        )
    except Exception as exc:
        what = "does not hold a tokenizer" if src.local else "could not be loaded from the Hugging Face hub"
        raise ModelError(
            f"The tokenizer {src.location} ({src.field}) {what}: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:120]}."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(
            f"The tokenizer {src.location} ({src.field}) is not a fast tokenizer, which exact loss masks "
            "need (offsets)."
        )
    if need_chat_template is None:
        need_chat_template = cfg.data.format != "text"
    if need_chat_template and not tok.chat_template:
        raise no_chat_template(src.location, src.field)
    return tok
