"""Tokenizer and chat templates against transformers.AutoTokenizer on tokenizer folders built here."""

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer

from score.model import Tokenizer, load_tokenizer
from tests.helpers.model_fixtures import CHAT_STYLES, make_backend_tokenizer, make_chat_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "  Be brief. <b>bold</b> & 'quotes'  "},
        {"role": "user", "content": "Solve 3x + 5 = 20."},
        {"role": "assistant", "content": "x = 5", "tool_calls": None},  # None-valued keys are dropped
        {"role": "user", "content": "naïve café — are you sure?\n"},
    ],
    [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b", "reasoning_content": "easy"},
        {"role": "user", "content": "again"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "adds <a> & é",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def tokenizer_dir(request, tmp_path_factory):
    return make_chat_tokenizer(tmp_path_factory.mktemp(request.param), request.param), request.param


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_matches_transformers(tokenizer_dir, conversation, add_generation_prompt, tools):
    path, _ = tokenizer_dir
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    messages = CONVERSATIONS[conversation]
    want_text = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    want_ids = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    got_text = ours.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    got_ids = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert got_text == want_text
    assert got_ids == want_ids
    assert messages == CONVERSATIONS[conversation]  # the caller's messages are not modified


def test_template_in_tokenizer_config_is_read(tmp_path):
    make_chat_tokenizer(tmp_path, "qwen", template_in_config=True)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert load_tokenizer(tmp_path).chat_template == CHAT_STYLES["qwen"]["template"]


# Plain (dash-less) block tags: the output depends on trim_blocks/lstrip_blocks. Also jinja's
# loop controls, namespace, dict(), and tojson on HTML characters.
FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m.role }}: {{ m.content }}
    {% if m.role == 'stop' %}{% break %}{% endif %}
{% endfor %}
{{ dict(a='<&>', b=ns.n) | tojson }}
{{ messages | map(attribute='content') | list | tojson(indent=2) }}
"""


def test_jinja_environment_matches_transformers(tokenizer_dir):
    path, _ = tokenizer_dir
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    messages = [
        {"role": "user", "content": "é <x>"},
        {"role": "skip", "content": "-"},
        {"role": "stop", "content": "halt"},
        {"role": "user", "content": "never shown"},
    ]
    want = hf.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tokenize=False)
    assert ours.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tokenize=False) == want
    # sanity: the features did something (break, continue, unescaped JSON, stripped block lines)
    assert want.startswith("    [1] user: é <x>\n    [2] stop: halt\n{") and '"<&>"' in want and "[3]" not in want


def test_template_errors_are_value_errors(tokenizer_dir):
    path, style = tokenizer_dir
    ours = load_tokenizer(path)
    bad = [{"role": "assistant", "content": "hi"}] if style == "llama3" else [{"role": "robot", "content": "hi"}]
    with pytest.raises(ValueError, match="chat template failed"):
        ours.apply_chat_template(bad)
    with pytest.raises(ValueError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="does not parse"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% if %}")


def test_special_tokens_and_encode_decode_match_transformers(tokenizer_dir):
    path, style = tokenizer_dir
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_id == hf.eos_token_id
    gen = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert set(ours.eos_token_ids) == set(gen) | {hf.eos_token_id} and len(ours.eos_token_ids) == 2
    assert ours.vocab_size == len(hf)
    text = "Final Answer: The final answer is $5$. naïve café <|im_end|>"
    for add_special in (False, True):
        assert ours.encode(text, add_special_tokens=add_special) == hf.encode(text, add_special_tokens=add_special)
    ids = hf.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.token_to_id(CHAT_STYLES[style]["specials"][0]) == 0


def test_save_pretrained_round_trips_through_both_loaders(tokenizer_dir, tmp_path):
    path, _ = tokenizer_dir
    original = load_tokenizer(path)
    original.save_pretrained(tmp_path)
    again, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (again.special_tokens, again.eos_token_ids, again.chat_template) == (
        original.special_tokens,
        original.eos_token_ids,
        original.chat_template,
    )
    for messages in CONVERSATIONS:
        ids = original.apply_chat_template(messages, add_generation_prompt=True)
        assert again.apply_chat_template(messages, add_generation_prompt=True) == ids
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids


def test_built_from_a_tokenizers_object():
    backend = make_backend_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(
        backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_STYLES["qwen"]["template"]
    )
    assert tok.eos_token_ids == [2] and tok.pad_token_id == 0 and tok.bos_token_id is None
    ids = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(tok.encode("x = 5, naïve")) == "x = 5, naïve"
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(backend, eos_token="<eos>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([10_000])
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(backend).apply_chat_template(CONVERSATIONS[0])


def test_missing_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*tokenizer.model"):
        load_tokenizer(tmp_path)


def test_bad_special_token_in_config_is_named(tmp_path):
    make_chat_tokenizer(tmp_path, "qwen")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|nope|>", "__type": "AddedToken"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not in tokenizer.json"):
        load_tokenizer(tmp_path)
    assert isinstance(RustTokenizer.from_file(str(tmp_path / "tokenizer.json")), RustTokenizer)


def test_named_templates_in_config_use_the_default(tmp_path):
    make_chat_tokenizer(tmp_path, "qwen", template_in_config=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "{{ 'tools!' }}"},
        {"name": "default", "template": config["chat_template"]},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    want = hf.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False) == want
    assert want.startswith("<|im_start|>system")
