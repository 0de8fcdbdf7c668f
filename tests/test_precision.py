"""The precision contract (rl/precision.py) on the CPU: fp32 master weights and AdamW state under
bf16 compute, the reference and the engine in the compute dtype, the settings' resolution per device."""

from __future__ import annotations

import pytest
import torch

from score.model import save_pretrained
from score.rl.config import config_from_dict
from score.rl.precision import Precision, final_dtype
from tests.helpers.model_fixtures import tiny_decoder
from tests.helpers.tiny_run import tiny_config, trainer_with_parity


def settings(**model) -> object:
    return config_from_dict({"model": model})


@pytest.mark.parametrize(
    "device, model, compute",
    [
        ("cpu", {}, torch.float32),  # auto: the masters' dtype on CPU
        ("cuda", {}, torch.bfloat16),  # auto: bf16 on CUDA
        ("cpu", {"autocast": "bf16"}, torch.bfloat16),
        ("cuda", {"autocast": "off"}, torch.float32),
        ("cuda", {"master_dtype": "bfloat16", "autocast": "off"}, torch.bfloat16),
    ],
)
def test_the_compute_dtype_per_device_and_setting(device, model, compute):
    p = Precision.of(settings(**model), torch.device(device))
    assert p.compute_dtype == compute and p.master_dtype == getattr(torch, model.get("master_dtype", "float32"))
    assert p.mixed == (compute != p.master_dtype)


def test_triton_kernels_on_the_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="model.kernels = 'triton'.*TRITON_INTERPRET=1"):
        Precision.of(settings(kernels="triton"), torch.device("cpu"))
    assert Precision.of(settings(kernels="triton"), torch.device("cuda")).kernels == "triton"


def test_final_dtype_follows_the_starting_checkpoint_unless_configured(tmp_path):
    model = tiny_decoder(seed=0)
    save_pretrained(model, tmp_path / "bf16", torch.bfloat16)
    save_pretrained(model, tmp_path / "fp32")
    assert final_dtype(settings(), str(tmp_path / "bf16")) == torch.bfloat16
    assert final_dtype(settings(), str(tmp_path / "fp32")) == torch.float32
    assert final_dtype(settings(final_dtype="float32"), str(tmp_path / "bf16")) == torch.float32


def adamw_run(tmp_path, closes, **model):
    """A 3-step SCoRe run at lr 5e-6 (the paper's) computing in bf16; returns (the masters before, the
    masters after, a float64 AdamW's weights after the same gradients and learning rates)."""
    keys = {f"model__{k}": v for k, v in model.items()}
    cfg = tiny_config(tmp_path, optim__lr=5e-6, score__stage1_steps=2, score__stage2_steps=1, **keys)
    trainer = closes(trainer_with_parity(cfg, tmp_path / "run"))
    params = list(trainer.policy.parameters())
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    before = [p.detach().double().clone() for p in params]
    steps = []

    def record(optimizer, args, kwargs):  # the gradients AdamW is about to apply, after clipping
        assert {p.grad.dtype for p in params} == {params[0].dtype}
        steps.append((optimizer.param_groups[0]["lr"], [p.grad.detach().double().clone() for p in params]))

    trainer.optimizer.register_step_pre_hook(record)
    trainer.fit()
    trainer.close()
    assert len(steps) == 3
    reference = [w.clone().requires_grad_() for w in before]
    o = cfg.optim
    exact = torch.optim.AdamW(reference, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    for lr, grads in steps:
        exact.param_groups[0]["lr"] = lr
        for w, g in zip(reference, grads, strict=True):
            w.grad = g
        exact.step()
    return before, [p.detach().double() for p in params], [w.detach() for w in reference]


def worst_relative_error(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


def test_bf16_compute_moves_the_fp32_masters_as_float64_adamw_does(tmp_path, closes):
    before, after, exact = adamw_run(tmp_path, closes, autocast="bf16")
    assert worst_relative_error(after, exact) <= 1e-6
    assert worst_relative_error(before, exact) > 1e-6  # and the steps did move the weights measurably


def test_bf16_masters_do_not_move_as_adamw_does(tmp_path, closes):
    """The explicit bf16-master setting: most updates at lr 5e-6 round away, and the bound above fails."""
    _, after, exact = adamw_run(tmp_path, closes, autocast="off", master_dtype="bfloat16")
    assert worst_relative_error(after, exact) > 1e-4
