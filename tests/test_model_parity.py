"""Our decoder against transformers on random-weight checkpoints transformers itself wrote.

Covers every family/option in model_fixtures.VARIANTS (GQA, q/k/v bias, q/k norm, tied and untied
heads, explicit head_dim, llama3 RoPE), both config spellings, sharded and single-file checkpoints,
one backward pass, and the packed / hooked-attention input layouts against the dense one.
"""

import pytest
import torch

from score.model import ModelConfig, Transformer, from_pretrained
from score.model.attention import causal_attention
from score.model.loading import hf_to_ours
from tests.helpers.model_fixtures import VARIANTS, load_hf_model, make_hf_checkpoint, rewrite_config_old_style

LOGIT_TOL = 1e-4  # fp32, issue 2
GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        made[variant] = (path, make_hf_checkpoint(path, variant, seed=len(made)))
    return made


def random_ids(vocab, *shape, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    path, hf = checkpoints[variant]
    ours = from_pretrained(path)
    ids = random_ids(ours.config.vocab_size, 3, 23)
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("variant", ["llama3_rope", "qwen2_untied", "llama_bias_head_dim"])
def test_old_config_spelling_loads_the_same_model(checkpoints, tmp_path, variant):
    path, _ = checkpoints[variant]
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    rewrite_config_old_style(tmp_path)
    assert "rope_parameters" not in (tmp_path / "config.json").read_text()
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(path)
    hf, ours = load_hf_model(tmp_path), from_pretrained(tmp_path)
    ids = random_ids(ours.config.vocab_size, 2, 19, seed=1)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= LOGIT_TOL


def test_llama3_scaling_is_applied(checkpoints):
    # Guards the parity test above from passing with scaling silently ignored on both sides.
    path, _ = checkpoints["llama3_rope"]
    scaled = from_pretrained(path)
    assert scaled.config.rope_scaling["rope_type"] == "llama3"
    plain_cfg = ModelConfig(**{**vars(scaled.config), "rope_scaling": None})
    plain = Transformer(plain_cfg)
    plain.load_state_dict(scaled.state_dict())
    ids = random_ids(scaled.config.vocab_size, 1, 40, seed=2)
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen3_qknorm_head_dim"])
def test_sharded_checkpoint_matches(tmp_path, variant):
    hf = make_hf_checkpoint(tmp_path, variant, seed=7, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ours = from_pretrained(tmp_path)
    ids = random_ids(ours.config.vocab_size, 2, 16, seed=3)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("variant", ["llama_bias_head_dim", "qwen2_gqa_bias_tied", "qwen3_qknorm_head_dim"])
def test_backward_matches_transformers(checkpoints, variant):
    path, _ = checkpoints[variant]
    hf, ours = load_hf_model(path), from_pretrained(path)
    ids = random_ids(ours.config.vocab_size, 2, 21, seed=4)
    upstream = torch.randn(2, 21, ours.config.vocab_size, generator=torch.Generator().manual_seed(5))
    (hf(ids).logits * upstream).sum().backward()
    (ours(ids) * upstream).sum().backward()
    ours_params = dict(ours.named_parameters())
    compared = 0
    for hf_name, hf_param in hf.named_parameters():
        name = hf_to_ours(hf_name)
        if name not in ours_params:
            assert hf_name == "lm_head.weight" and ours.config.tie_word_embeddings
            continue
        diff = (ours_params[name].grad - hf_param.grad).abs().max().item()
        assert diff <= GRAD_TOL * max(1.0, hf_param.grad.abs().max().item()), hf_name
        compared += 1
    assert compared == len(ours_params)


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=80,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        **overrides,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a skipped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


LENGTHS = [5, 1, 12, 7]


def packed_batch(vocab):
    seqs = [random_ids(vocab, n, seed=10 + i) for i, n in enumerate(LENGTHS)]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_packed_forward_equals_per_sequence(arch):
    model = tiny_model(architecture=arch)
    seqs, flat, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        packed = model.hidden_states(flat, cu_seqlens=cu)
        alone = torch.cat([model.hidden_states(s[None])[0] for s in seqs])
        explicit = model.hidden_states(
            flat, cu_seqlens=cu, max_seqlen=max(LENGTHS), positions=torch.cat([torch.arange(n) for n in LENGTHS])
        )
    assert packed.shape == (sum(LENGTHS), model.config.hidden_size)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(explicit, packed, rtol=0, atol=0)


def test_packed_backward_equals_per_sequence():
    seqs, flat, cu = packed_batch(80)
    packed_model, alone_model = tiny_model(), tiny_model()
    upstream = torch.randn(sum(LENGTHS), 80, generator=torch.Generator().manual_seed(6))
    (packed_model(flat, cu_seqlens=cu) * upstream).sum().backward()
    alone = torch.cat([alone_model(s[None])[0] for s in seqs])
    (alone * upstream).sum().backward()
    for (name, a), b in zip(packed_model.named_parameters(), alone_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_attention_hook_sees_roped_heads():
    """A caller's attention hook (attn=...) gets q and k after q/k-norm and RoPE, and the forward
    around it is the packed forward, bit for bit."""
    model = tiny_model(architecture="Qwen3ForCausalLM")
    cfg = model.config
    seqs, flat, cu = packed_batch(cfg.vocab_size)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    calls = []

    def attn(layer_idx, q, k, v):  # what a caller with a KV cache of its own would do, minus the cache
        calls.append((layer_idx, q.shape, k.shape, v.shape))
        return causal_attention(q, k, v, scale=cfg.head_dim**-0.5, cu_seqlens=cu)

    with torch.no_grad():
        hooked = model.hidden_states(flat, positions=positions, attn=attn)
        packed = model.hidden_states(flat, cu_seqlens=cu)
    torch.testing.assert_close(hooked, packed, rtol=0, atol=0)
    n = sum(LENGTHS)
    assert calls == [
        (
            i,
            (n, cfg.num_attention_heads, cfg.head_dim),
            (n, cfg.num_key_value_heads, cfg.head_dim),
            (n, cfg.num_key_value_heads, cfg.head_dim),
        )
        for i in range(cfg.num_hidden_layers)
    ]


def test_activation_checkpointing_keeps_gradients():
    plain, ckpt = tiny_model(), tiny_model()
    ckpt.set_activation_checkpointing(True)
    ckpt.train()
    plain.train()
    _, flat, cu = packed_batch(80)
    plain(flat, cu_seqlens=cu).square().mean().backward()
    ckpt(flat, cu_seqlens=cu).square().mean().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_bf16_close_to_transformers_bf16(checkpoints):
    path, _ = checkpoints["qwen2_gqa_bias_tied"]
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = from_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm_head_weight.dtype == torch.bfloat16
    ids = random_ids(ours.config.vocab_size, 2, 15, seed=8)
    with torch.no_grad():
        want, got = hf(ids).logits.float(), ours(ids).float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(2, 3)), "int64/int32"),
        (dict(input_ids=torch.zeros(4, dtype=torch.long)), "pass cu_seqlens"),
        (dict(input_ids=torch.zeros(4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])), "int32"),
        (
            dict(input_ids=torch.zeros(4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
            "from 0 to N=4",
        ),
        (dict(input_ids=torch.zeros(4, dtype=torch.long), attn=lambda *a: None), "needs positions"),
        (
            dict(input_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
            "1-D",
        ),
    ],
)
def test_bad_inputs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().hidden_states(**kwargs)
