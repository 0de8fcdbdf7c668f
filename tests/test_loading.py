"""Checkpoint loading/saving: HF round trips, config spellings, and the errors bad folders get."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from score.model import ModelConfig, Transformer, from_pretrained, save_pretrained
from score.model.loading import HF_KEY_MAP, hf_to_ours, ours_to_hf
from tests.helpers.model_fixtures import load_hf_model, make_hf_checkpoint

LOGIT_TOL = 1e-4


def random_model(seed=0, **cfg):
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(
            vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **cfg
        )
    ).eval()
    with torch.no_grad():  # HF would init norms to 1 and biases to 0; make both visible in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
    return model


SAVE_CASES = {
    "llama_gqa_llama3": dict(
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
    "llama_bias_head_dim": dict(architecture="LlamaForCausalLM", attention_bias=True, head_dim=32),
    "qwen2_tied": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", num_key_value_heads=1, head_dim=24, eos_token_id=[3, 4]),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path, case):
    ours = random_model(**SAVE_CASES[case])
    save_pretrained(ours, tmp_path)
    hf = load_hf_model(tmp_path)
    assert type(hf).__name__ == ours.config.architecture
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= LOGIT_TOL
    again = from_pretrained(tmp_path)
    assert again.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_saved_files_are_hf_layout(tmp_path):
    ours = random_model(architecture="Qwen2ForCausalLM", tie_word_embeddings=True)
    save_pretrained(ours, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert "model.layers.1.self_attn.q_proj.bias" in tensors and "model.layers.1.self_attn.o_proj.bias" not in tensors
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["dtype"] == "float32" and config["rope_parameters"]["rope_theta"] == 10000.0
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary files left behind


def test_key_map_round_trips():
    for hf_key, ours in HF_KEY_MAP.items():
        hf_key, ours = hf_key.replace("{}", "13"), ours.replace("{}", "13")
        assert hf_to_ours(hf_key) == ours and ours_to_hf(ours) == hf_key
    assert hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_meta_init_and_dtype(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen3_tied")
    model = from_pretrained(tmp_path, dtype="bfloat16")
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head_weight is model.embed_tokens.weight
    assert not model.training
    kept = from_pretrained(tmp_path)  # dtype=None keeps what the file stores
    assert {p.dtype for p in kept.parameters()} == {torch.float32}


def test_config_spellings_agree(tmp_path):
    new = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(
        rope_theta=5e5,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    assert ModelConfig.from_hf_dict(new) == ModelConfig.from_hf_dict(old)
    cfg = ModelConfig.from_hf_dict(new)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 8.0 and cfg.head_dim == 16
    # Qwen3's head_dim default is 128, not hidden_size // heads.
    assert (
        ModelConfig.from_hf_dict({**old, "architectures": ["Qwen3ForCausalLM"], "rope_scaling": None}).head_dim == 128
    )
    # Llama-3 defaults original_max_position_embeddings to max_position_embeddings, as transformers does.
    del new["rope_parameters"]["original_max_position_embeddings"]
    assert ModelConfig.from_hf_dict(new).rope_scaling["original_max_position_embeddings"] == 64


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(architectures=["MistralForCausalLM"]),
            r"unsupported architecture MistralForCausalLM; "
            r"supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ),
        (dict(architectures=None, model_type="gemma"), r"unsupported architecture model_type='gemma'"),
        (dict(use_sliding_window=True, sliding_window=16), r"sliding-window attention .* supported: full causal"),
        (dict(layer_types=["full_attention", "sliding_attention"]), r"\['sliding_attention'\] are not supported"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            r"RoPE type 'yarn' is not supported; supported: default, llama3",
        ),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
        (dict(mlp_bias=True), r"mlp_bias=true is not supported"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
        **change,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_direct_config_validation():
    with pytest.raises(ValueError, match="only Qwen3ForCausalLM has q/k RMSNorm"):
        ModelConfig(qk_norm=True)
    with pytest.raises(ValueError, match="always has q/k/v bias"):
        ModelConfig(architecture="Qwen2ForCausalLM", attention_bias=False)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig(architecture="GPT2LMHeadModel")
    with pytest.raises(ValueError, match="missing"):
        ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})


@pytest.fixture
def sharded(tmp_path):
    make_hf_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    return tmp_path


def test_missing_shard_file_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard files that do not exist: {shard.name} \(holds \d+ tensors"):
        from_pretrained(sharded)


def edit_single_file(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen3_qknorm_head_dim")
    edit_single_file(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.self_attn.k_norm.weight \[32\]"):
        from_pretrained(tmp_path)


def test_shape_mismatch_and_unexpected_tensors_are_named_together(tmp_path):
    make_hf_checkpoint(tmp_path, "llama")

    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        t["model.vision_tower.weight"] = torch.zeros(3)

    edit_single_file(tmp_path, edit)
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    text = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight: checkpoint [100, 64], model [112, 64]" in text
    assert "unexpected tensors: " in text and "model.layers.0.self_attn.q_proj.bias [64]" in text
    assert "model.vision_tower.weight [3]" in text and "missing" not in text


def test_missing_weights_file_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, "llama")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle .bin weights; safetensors checkpoints only"):
        from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "nowhere")


def test_tied_checkpoint_with_stored_head_loads(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2_gqa_bias_tied")
    edit_single_file(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = from_pretrained(tmp_path)
    assert model.lm_head is None and model.lm_head_weight is model.embed_tokens.weight
