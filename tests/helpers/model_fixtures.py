"""Tiny random-weight HF checkpoints and tokenizers built on the fly (no downloads).

Shared by the model tests and anyone else who needs a real checkpoint folder: transformers itself
writes the files, so loading them exercises the exact layout HF checkpoints have.
"""

from __future__ import annotations

import json
import os

import torch

# One tiny config per family/option the decoder supports. Values are HF config.json fields.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)

VARIANTS = {
    "llama": dict(architecture="LlamaForCausalLM", num_key_value_heads=4),
    "llama_gqa_tied": dict(architecture="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_bias_head_dim": dict(
        architecture="LlamaForCausalLM", num_key_value_heads=2, attention_bias=True, head_dim=24
    ),
    "llama3_rope": dict(
        architecture="LlamaForCausalLM",
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2_gqa_bias_tied": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_untied": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=1, rope_theta=1000000.0),
    "qwen3_qknorm_head_dim": dict(architecture="Qwen3ForCausalLM", num_key_value_heads=2, head_dim=32),
    "qwen3_tied": dict(architecture="Qwen3ForCausalLM", num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
}


def hf_config(variant: str, **overrides):
    """A transformers config object for one of VARIANTS."""
    import transformers

    spec = {**TINY, **VARIANTS[variant], **overrides}
    arch = spec.pop("architecture")
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    rope_theta = spec.pop("rope_theta", 10000.0)
    rope = spec.pop("rope_scaling", None) or {"rope_type": "default"}
    spec["rope_parameters"] = {**rope, "rope_theta": rope_theta}
    config = config_cls(**spec)
    config.architectures = [arch]
    return config


def random_hf_model(variant: str, *, seed: int = 0, **overrides):
    """A random-weight transformers model of `variant` (fp32, eval).

    Norm weights and biases are randomised too (HF initialises them to 1/0), so a parity test
    also checks that they are read and applied to the right tensors.
    """
    import transformers

    torch.manual_seed(seed)
    config = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(std=0.1)
    return model


def make_hf_checkpoint(
    path, variant: str, *, seed: int = 0, max_shard_size: str | None = None, save_dtype=None, **overrides
):
    """Save `random_hf_model(variant, seed=seed, **overrides)` to `path` (in `save_dtype`, default
    fp32); returns the HF model (fp32)."""
    model = random_hf_model(variant, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if save_dtype is None:
        model.save_pretrained(path, **kwargs)
    else:
        import copy

        copy.deepcopy(model).to(save_dtype).save_pretrained(path, **kwargs)
    return model


def rewrite_config_old_style(path) -> None:
    """Rewrite a saved config.json with pre-transformers-5 RoPE keys (`rope_theta` + `rope_scaling`)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)


def load_hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- tokenizers -----------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is 2 + 2? The answer is 4.",
    "Solve for x: 3x + 5 = 20, so x = 5. Final Answer: The final answer is $5$. I hope it is correct.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "There might be an error in the solution above. Please correct the error, if any.",
    "système, naïve café — ünïcödé <b>bold</b> & 'quotes' \"double\"",
]

# Written for these tests in the style of Qwen2.5's and Llama-3.1's templates: default system
# prompt, tools rendered with tojson, namespaces, loop controls, raise_exception, strftime_now,
# and indented block tags that only render cleanly with trim_blocks + lstrip_blocks.
QWEN_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'system' and tools %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {%- set ns.turns = ns.turns + 1 %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.reasoning_content is defined %}
        {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
    {%- endif %}
    {{- message.content }}
    {%- if message.tool_calls is defined %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_STYLE_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Use these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHAT_STYLES = {
    "qwen": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        template=QWEN_STYLE_TEMPLATE,
        config=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        generation_eos=["<|im_end|>", "<|endoftext|>"],
        add_bos=False,
    ),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template=LLAMA3_STYLE_TEMPLATE,
        config=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None),
        generation_eos=["<|end_of_text|>", "<|eot_id|>"],
        add_bos=True,
    ),
}


def make_backend_tokenizer(specials, *, vocab_size=400, add_bos: str | None = None, corpus=CORPUS):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus` in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    if add_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{add_bos} $A",
            pair=f"{add_bos} $A {add_bos} $B",
            special_tokens=[(add_bos, tok.token_to_id(add_bos))],
        )
    return tok


def make_chat_tokenizer(path, style: str = "qwen", *, template_in_config: bool = False, corpus=CORPUS, vocab_size=400):
    """Write a HF tokenizer folder (tokenizer.json, tokenizer_config.json, chat template,
    generation_config.json) in the Qwen or Llama-3 style. The template goes to
    chat_template.jinja (transformers-5 layout) or, with template_in_config, into the config."""
    spec = CHAT_STYLES[style]
    bos = spec["config"]["bos_token"]
    tok = make_backend_tokenizer(
        spec["specials"], add_bos=bos if spec["add_bos"] else None, corpus=corpus, vocab_size=vocab_size
    )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        **spec["config"],
    }
    if template_in_config:
        config["chat_template"] = spec["template"]
    else:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(spec["template"])
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id(t) for t in spec["generation_eos"]]}, f)
    return path


def tiny_decoder(*, seed: int, vocab_size: int = 97, **overrides):
    """A tiny random-weight decoder in eval mode, for engine and sampler tests: 2 layers, 4 q and 2
    KV heads, tied embeddings, 128 positions, EOS the last token id; `overrides` replace any field."""
    from score.model import ModelConfig, Transformer

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        architecture="Qwen2ForCausalLM",
        tie_word_embeddings=True,
        initializer_range=0.3,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**fields, **overrides})).eval()


def randomise_biases(model):
    """Biases and norm weights drawn from U(0.5, 1.5) (zero and one at init), so that a test sees
    whether each one lands where it belongs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


PACKED_LENGTHS = [5, 9, 2]


def packed_prompts(model):
    """Three random sequences of PACKED_LENGTHS tokens packed back to back: (ids [16], cu_seqlens)."""
    gen = torch.Generator().manual_seed(1)
    device = model.lm_head_weight.device
    ids = torch.randint(0, model.config.vocab_size, (sum(PACKED_LENGTHS),), generator=gen).to(device)
    cu = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return ids, cu


def engine_forward_hidden(model, backend="torch"):
    """Final hidden states [16, D] of `packed_prompts(model)` through the engine's own forward
    (model/engine/inference_model.py): one prefill step into a fresh KV pool of 4-token blocks, through
    the engine's attention context on `backend`."""
    from score.model.engine.attention_context import AttentionContext
    from score.model.engine.inference_model import InferenceModel
    from score.model.engine.workspace import DecodeWorkspace

    cfg, device = model.config, model.lm_head_weight.device
    ids, cu = packed_prompts(model)
    dtype = model.lm_head_weight.dtype
    blocks = [-(-n // 4) for n in PACKED_LENGTHS]
    pool = torch.zeros(2, cfg.num_hidden_layers, sum(blocks), 4, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
    first = [sum(blocks[:s]) for s in range(len(blocks))]
    tables = [[first[s] + b if b < blocks[s] else 0 for b in range(max(blocks))] for s in range(len(blocks))]
    slots = [first[s] * 4 + p for s, n in enumerate(PACKED_LENGTHS) for p in range(n)]
    positions = torch.cat([torch.arange(n) for n in PACKED_LENGTHS]).to(device)
    ints = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    with torch.inference_mode():
        ctx = AttentionContext(
            pool.to(device),
            backend=backend,
            slot_mapping=ints(slots),
            block_tables=ints(tables),
            context_lens=ints(PACKED_LENGTHS),
            cu_seqlens_q=cu,
            max_q_len=max(PACKED_LENGTHS),
            max_context_len=max(PACKED_LENGTHS),
            copy_src=None,
            copy_dst=None,
        )
        return InferenceModel(model, dtype, DecodeWorkspace()).hidden_states(ids, positions, ctx)
