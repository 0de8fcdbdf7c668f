"""Checkpoints: bit-identical resume (weights, AdamW, RNGs), atomic writes, keep-last, HF-loadable policy."""

import json
import random

import numpy as np
import pytest
import torch

import score.rl.checkpoints.plain as ckpt
from score.model import ModelConfig, Transformer
from score.rl.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

CFG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_model(seed, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **overrides}))


def make_optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
    )


def train_steps(model, optimizer, n):
    """Each step draws its batch and a noise scale from all three global RNGs, so a resume that forgot
    any of them diverges."""
    for _ in range(n):
        ids = torch.randint(0, CFG["vocab_size"], (2, 9))
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        logits = model(ids[:, :-1])
        loss = scale * torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def snapshot(model, optimizer):
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{index}.{k}": v.clone() for k, v in entry.items()})
    return tensors, torch.rand(3), np.random.rand(), random.random()


def test_resume_is_bit_identical(tmp_path):
    n = 3
    model = make_model(0)
    optimizer = make_optimizer(model)
    seed_all(1)
    train_steps(model, optimizer, n)
    path = save_checkpoint(tmp_path, n, model, optimizer, {"stage": 1, "data_position": 12})
    train_steps(model, optimizer, n)
    uninterrupted = snapshot(model, optimizer)

    resumed_model = make_model(5)  # different weights until loaded
    resumed_optimizer = make_optimizer(resumed_model)
    seed_all(99)  # and different RNG states
    state = load_checkpoint(path, resumed_model, resumed_optimizer)
    assert state == {"stage": 1, "data_position": 12, "step": n}
    train_steps(resumed_model, resumed_optimizer, n)
    resumed = snapshot(resumed_model, resumed_optimizer)

    assert uninterrupted[0].keys() == resumed[0].keys()
    for key, value in uninterrupted[0].items():
        assert torch.equal(value, resumed[0][key]), key
    assert torch.equal(uninterrupted[1], resumed[1]) and uninterrupted[2:] == resumed[2:]
    assert resumed_optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_layout_safetensors_only_and_policy_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(0, tie_word_embeddings=True)
    optimizer = make_optimizer(model)
    seed_all(0)
    train_steps(model, optimizer, 1)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"stage": 2})
    assert path == tmp_path / "checkpoints" / "step_00000001"
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == ["model/config.json", "model/model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    record = json.loads((path / "trainer_state.json").read_text())
    assert set(record["rng"]) == {"python", "numpy", "torch", "cuda"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, CFG["vocab_size"], (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.double(), model(ids).double(), rtol=1e-5, atol=1e-5)


def test_keep_last_and_latest(tmp_path):
    model = make_model(0)
    optimizer = make_optimizer(model)
    assert latest_checkpoint(tmp_path, "plain") is None
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path, "plain")] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path, "plain").name == "step_00000004"
    save_checkpoint(tmp_path, 4, model, optimizer, {"again": True}, keep_last=2)  # re-save replaces
    assert json.loads((latest_checkpoint(tmp_path, "plain") / "trainer_state.json").read_text())["state"] == {
        "again": True
    }


def test_interrupted_save_leaves_previous_checkpoints(tmp_path, monkeypatch):
    model = make_model(0)
    optimizer = make_optimizer(model)
    save_checkpoint(tmp_path, 1, model, optimizer, {})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, {})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    # A temporary folder left by a killed process is not a checkpoint and is cleaned by the next save.
    (tmp_path / "checkpoints" / ".tmp-step_00000003-x").mkdir()
    assert latest_checkpoint(tmp_path, "plain").name == "step_00000001"
    monkeypatch.undo()
    save_checkpoint(tmp_path, 3, model, optimizer, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000003"]


def test_errors_are_named(tmp_path):
    model = make_model(0)
    optimizer = make_optimizer(model)
    with pytest.raises(ValueError, match=r"state\['bad'\] is not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, optimizer, {"ok": 1, "bad": object()})
    with pytest.raises(ValueError, match="keep_last must be"):
        save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    with pytest.raises(FileNotFoundError, match="that is a run folder"):
        load_checkpoint(tmp_path, model, optimizer)
    other = torch.optim.AdamW(model.parameters())  # one group instead of two
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        load_checkpoint(path, model, other)
    with pytest.raises(ValueError, match="is for AdamW, got a SGD"):
        load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(
        ValueError,
        match=r"embed_tokens.weight is torch.float32 \[64, 32\] in the checkpoint, "
        r"torch.float32 \[64, 64\] in the model",
    ):
        load_checkpoint(path, make_model(0, hidden_size=64), None)


def test_plain_and_sharded_checkpoints_in_one_run_folder_never_mix(tmp_path):
    """Each format lists, resumes and prunes only its own folders (both live in run/checkpoints/)."""
    from score.rl.checkpoints import save_sharded

    model = make_model(0)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=1)
    assert latest_checkpoint(tmp_path, "sharded") is None  # a sharded resume over a plain run finds nothing to load
    save_sharded(tmp_path, 2, model, optimizer, {"data_step": 2}, keep_last=1)
    save_sharded(tmp_path, 3, model, optimizer, {"data_step": 3}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path, "sharded")] == ["step_00000003.dcp"]
    assert [p.name for p in list_checkpoints(tmp_path, "plain")] == ["step_00000001"]  # not pruned by the sharded save
    save_checkpoint(tmp_path, 4, model, optimizer, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path, "plain")] == ["step_00000004"]
    assert [p.name for p in list_checkpoints(tmp_path, "sharded")] == ["step_00000003.dcp"]  # nor the reverse


def test_resume_across_formats(tmp_path):
    """A single-process resume loads a sharded checkpoint; a sharded resume over a plain run names
    the cause instead of loading it with DCP; a re-saved sharded step replaces the old one."""
    import types

    from score.rl.checkpoints import save_sharded
    from score.rl.parallel.seam import FSDP2, SingleProcess

    model = make_model(0)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 2)
    save_sharded(tmp_path / "sharded", 2, model, optimizer, {"data_step": 2})
    save_sharded(tmp_path / "sharded", 2, model, optimizer, {"data_step": 2})  # the same step again
    assert [p.name for p in list_checkpoints(tmp_path / "sharded", "sharded")] == ["step_00000002.dcp"]
    fresh = make_model(1)
    fresh_optimizer = make_optimizer(fresh)
    assert SingleProcess(torch.device("cpu")).resume(tmp_path / "sharded", fresh, fresh_optimizer) == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    save_checkpoint(tmp_path / "plain", 1, model, optimizer, {})
    rank = FSDP2(types.SimpleNamespace(device=torch.device("cpu"), is_main=True))
    with pytest.raises(ValueError, match="written by a single-process run"):
        rank.resume(tmp_path / "plain", fresh, fresh_optimizer)
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        SingleProcess(torch.device("cpu")).resume(tmp_path / "empty", fresh, fresh_optimizer)
