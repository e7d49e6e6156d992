"""A tokenizer as plain data (`TokenizerSpec`) and its chat template compiled without transformers.

Ray's tokenizer actors each start a fresh Python process; importing transformers there costs
~6 s of CPU per actor on this kind of box, while `tokenizers` + `jinja2` take ~0.4 s. The driver
loads the tokenizer once with transformers (validation, fingerprint) and ships only what the
tokenize stage reads: the backend's tokenizer.json, the chat template source, the variables
`apply_chat_template` passes to it, the special token ids and the eos id. `compile_chat_template`
builds the same Jinja environment as transformers 5's `_compile_jinja_template` (sandbox,
trim/lstrip blocks, loopcontrols, the `{% generation %}` tag, tojson, raise_exception,
strftime_now, dict, a namespace that rejects dunder names), so renders are identical.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class TokenizerSpec:
    """What ChatEncoder needs of a Hugging Face fast tokenizer, picklable without transformers."""

    backend_json: str  # tokenizers.Tokenizer serialised (vocab, merges, normalizer, added tokens)
    chat_template: str | None
    template_vars: dict[str, Any] = field(default_factory=dict)  # special_tokens_map, as apply_chat_template passes it
    special_ids: frozenset[int] = frozenset()
    eos_id: int | None = None

    @classmethod
    def from_hf(cls, tokenizer) -> TokenizerSpec:
        backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer._tokenizer
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        return cls(
            backend_json=backend.to_str(),
            chat_template=tokenizer.get_chat_template() if tokenizer.chat_template else None,
            template_vars=dict(tokenizer.special_tokens_map),
            special_ids=frozenset(special),
            eos_id=tokenizer.eos_token_id,
        )

    def backend(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend_json)

    def to_json(self) -> str:
        return json.dumps(
            {
                "backend_json": self.backend_json,
                "chat_template": self.chat_template,
                "template_vars": self.template_vars,
                "special_ids": sorted(self.special_ids),
                "eos_id": self.eos_id,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TokenizerSpec:
        d = json.loads(text)
        return cls(
            d["backend_json"], d["chat_template"], dict(d["template_vars"]), frozenset(d["special_ids"]), d["eos_id"]
        )

    def fingerprint(self) -> str:
        """Content hash: vocabulary, merges, normalisation, added tokens, chat template, special tokens."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: Jinja's own tojson escapes HTML characters, which chat templates must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` for templates, without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


# LoopContext's read-only values (properties and plain attributes; not `cycle`/`changed`, which are methods).
_LOOP_VALUES = frozenset(
    {"index0", "index", "revindex", "revindex0", "first", "last", "length", "depth", "depth0", "previtem", "nextitem"}
)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.runtime
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it for masks;
        we do not need to)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore-prefixed names (as transformers does)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    loop_type = jinja2.runtime.LoopContext
    dict_attrs = frozenset(dir(dict))

    class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
        """The same sandbox, with the two lookups chat templates make per message answered directly:
        `loop.first`-style reads (plain values) and `message.role` on a dict (Jinja's fallback to the
        key when dict has no such attribute). Anything else takes the sandbox's checked path; renders
        are identical, the sandbox's check cost ~half of a ChatML render."""

        def getattr(self, obj, attribute):
            kind = type(obj)
            if kind is loop_type and attribute in _LOOP_VALUES:
                return getattr(obj, attribute)
            if kind is dict and type(attribute) is str and attribute not in dict_attrs and attribute in obj:
                return obj[attribute]
            return super().getattr(obj, attribute)

    env = ChatTemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=8)
def compile_chat_template(source: str):
    """The chat template as a jinja2 Template, compiled like transformers does."""
    return _environment().from_string(source)
