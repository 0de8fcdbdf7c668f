"""Tokenizer on the `tokenizers` library, with chat templates rendered the way transformers does.

`load_tokenizer(path)` reads a HF tokenizer folder: `tokenizer.json` (required: fast tokenizers
only), `tokenizer_config.json` (special tokens, chat template), `special_tokens_map.json` (older
folders), `chat_template.jinja` (transformers-5 layout; it wins over the config entry, as in
transformers) and `generation_config.json` (extra end-of-sequence ids: Llama-3 stops on both
<|end_of_text|> and <|eot_id|>).

Chat templates are rendered with jinja2 in the same sandboxed environment transformers builds
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML or non-ASCII, restricted `dict`/`namespace`), with the named special tokens
as template variables, and the text is encoded without adding special tokens, so the ids equal
`transformers.AutoTokenizer.apply_chat_template`'s. Not done: assistant-token masks (the
`{% generation %}` tag renders its body and marks nothing), `continue_final_message`, named
template sets other than the default, slow (sentencepiece-only) tokenizers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from .files import read_json_object, write_json, write_text

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """Text <-> ids plus the special tokens and chat template of a model.

    Build it from a `tokenizers.Tokenizer` and the special-token strings (each must be in its
    vocabulary), or load one with `load_tokenizer(path)`. `vocab_size` counts every id including
    added tokens (transformers' `len(tokenizer)`), the size an embedding must have at least.
    """

    def __init__(
        self,
        tokenizer: RustTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: list[int] | tuple[int, ...] = (),
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        if not isinstance(tokenizer, RustTokenizer):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.backend = tokenizer
        self.special_tokens = {}
        for name, token in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
            ("unk_token", unk_token),
        ):
            if token is None:
                continue
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            self.special_tokens[name] = token
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        bad = [i for i in extra_eos_token_ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"extra_eos_token_ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        self.eos_token_ids = []
        for i in ([self.token_to_id(eos_token)] if eos_token else []) + [int(i) for i in extra_eos_token_ids]:
            if i not in self.eos_token_ids:
                self.eos_token_ids.append(i)
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"chat_template must be a string, got {type(chat_template).__name__}")
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # --- ids ---------------------------------------------------------------------------------
    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # --- text --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers applies this WordPiece-era cleanup only to non-BPE models.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def __len__(self) -> int:
        return self.vocab_size

    # --- chat --------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> list[int] | str:
        """Render `messages` (and optional JSON-schema `tools`) with the chat template.

        Returns token ids (encoded without adding special tokens; the template writes them) or,
        with `tokenize=False`, the rendered string. Extra keyword arguments become template
        variables (e.g. `enable_thinking=False`), as in transformers.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template; pass chat_template=... or use plain encode()")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
            message = {k: _plain(v) for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:  # templates read it under different names
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = {**self.special_tokens, **{k: _plain(v) for k, v in template_kwargs.items()}}
        try:
            text = _compile(template).render(
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from err
        return self.encode(text) if tokenize else text

    # --- files -------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (+ eos ids) to `path`."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        # Each file is written whole or not at all (a kill mid-save never leaves half a tokenizer.json).
        write_text(os.path.join(path, "tokenizer.json"), self.backend.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.special_tokens,
        }
        write_json(os.path.join(path, "tokenizer_config.json"), config, ensure_ascii=False)
        template_file = os.path.join(path, "chat_template.jinja")
        if self.chat_template is not None:
            write_text(template_file, self.chat_template)
        elif os.path.exists(template_file):
            os.remove(template_file)
        if self.eos_token_ids[1:] or (self.eos_token_ids and "eos_token" not in self.special_tokens):
            # More than one stop id only fits generation_config.json; keep what else it holds.
            gen_file = os.path.join(path, "generation_config.json")
            gen = read_json_object(gen_file) if os.path.exists(gen_file) else {}
            gen["eos_token_id"] = list(self.eos_token_ids)
            write_json(gen_file, gen)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens}, "
            f"eos_token_ids={self.eos_token_ids}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def load_tokenizer(path) -> Tokenizer:
    """Read a HF tokenizer folder (see the module docstring for which files count)."""
    path = os.fspath(path)
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        present = sorted(os.listdir(path)) if os.path.isdir(path) else "not a folder"
        raise FileNotFoundError(f"no tokenizer.json in {path} (found: {present}); only fast tokenizers are supported")
    try:
        backend = RustTokenizer.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON and bad models
        raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None

    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        file = os.path.join(path, name)
        if os.path.isfile(file):
            config.update(read_json_object(file))
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: {name} must be a string or {{'content': ...}}, got {value!r}")
        if value is not None and backend.token_to_id(value) is None:
            raise ValueError(f"{path}: {name} {value!r} is not in tokenizer.json's vocabulary")
        special[name] = value

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default")
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()

    extra_eos = []
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        eos = read_json_object(gen_file).get("eos_token_id")
        extra_eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    return Tokenizer(
        backend,
        **special,
        extra_eos_token_ids=extra_eos,
        chat_template=chat_template,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )


def _plain(value):
    """Deep copy into plain JSON types, so templates never see caller objects or mutate them."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; we render it as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates need the raw JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` refusing underscore names, so templates cannot reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"chat template does not parse: {err.message} (template line {err.lineno})") from err
