"""The rank program of tests/test_distributed.py (run under score.rl.parallel.launch / torchrun), and the
deterministic training step it shares with the test's plain single-process reference.

A "step" is what the distributed trainer does, minus rollouts: every rank takes its contiguous
share of the step's prompt groups, divides its summed token log-prob loss by the GLOBAL token
count, runs one micro-batch per group, clips the global gradient norm and steps AdamW.

Modes (argv[1]):
  run2    OUT STEPS SAVE_AT  generate + train STEPS steps from the seeded init, DCP-save after SAVE_AT steps,
          write params after SAVE_AT and STEPS steps, unsharded logits and greedy engine tokens,
          a consolidated HF export of the final weights, the sharded reference's log-probs, and one
          bf16-compute step
  resume1 OUT STEPS CKPT     train STEPS steps fresh (the 1-rank run), then load CKPT and train
          to STEPS steps again (the resumed run); write both final parameter sets
  fail    EXIT_RANK          every rank joins; EXIT_RANK exits with code 3, the others wait in a barrier
  train   CONFIG OUT [resume]  the SCoRe Trainer itself (what `score train --nproc G` runs), rewarded by
          tiny_run.ParityReward so that the untrained test model gets a learning signal; prints each
          rank's global and local rank and its prompt groups
  unshared OUT               each rank checks a run folder of its own (OUT/rank{r}) with
          check_shared_folder and prints the error it must raise
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

from score.kernels import fused_linear_logprob
from score.model import ModelConfig, Transformer
from score.rl.checkpoints import export_consolidated, full_state_dict, load_sharded, save_sharded
from score.rl.parallel import distributed as D

# Odd vocab and tied head: uneven shards, and the embedding serves as the output head. No q/k/v
# bias: a key bias has an exactly zero gradient (softmax ignores a per-query constant), so its
# "gradient" is rounding noise that Adam's normalisation turns into +-lr steps on any world size.
CONFIG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    architecture="LlamaForCausalLM",
    max_position_embeddings=128,
)
GROUPS, SAMPLES = 4, 2
PROMPTS = [[5, 9, 14, 3], [7, 7, 1]]


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIG))


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def step_groups(step: int) -> list[list[list[int]]]:
    """The step's global batch: GROUPS prompt groups of SAMPLES sequences of varied length."""
    gen = torch.Generator().manual_seed(1000 + step)
    groups = []
    for _ in range(GROUPS):
        group = []
        for _ in range(SAMPLES):
            length = int(torch.randint(5, 24, (1,), generator=gen))
            group.append(torch.randint(0, CONFIG["vocab_size"], (length,), generator=gen).tolist())
        groups.append(group)
    return groups


def train_step(model, optimizer, step: int, env) -> float:
    groups = step_groups(step)
    mine = [groups[i] for i in D.shard_groups(len(groups), env)]
    (denominator,) = D.all_reduce_sum([sum(len(s) - 1 for g in mine for s in g)], env)
    optimizer.zero_grad(set_to_none=True)
    for group in mine:  # one micro-batch per group: ranks run equally many
        ids = torch.tensor([t for s in group for t in s])
        offsets = [0]
        for s in group:
            offsets.append(offsets[-1] + len(s))
        cu = torch.tensor(offsets, dtype=torch.int32)
        rows = torch.tensor([offsets[i] + p for i, s in enumerate(group) for p in range(len(s) - 1)])
        hidden = model.hidden_states(ids, cu_seqlens=cu)
        logp = fused_linear_logprob(hidden.index_select(0, rows), model.lm_head_weight, ids[rows + 1])
        (-logp.sum() / denominator).backward()
    norm = D.clip_grad_norm(model, 1.0)
    optimizer.step()
    return norm


def sequence_logprobs(model, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor(tokens)
    hidden = model.hidden_states(ids, cu_seqlens=torch.tensor([0, len(tokens)], dtype=torch.int32))
    return fused_linear_logprob(hidden[:-1], model.lm_head_weight, ids[1:])


def _save_params(model, path) -> None:
    full = full_state_dict(model)
    if full:
        save_file({k: v.contiguous() for k, v in full.items()}, path)


def _check_prefetch(model) -> None:
    """Each layer prefetches its neighbours' all-gathers (FSDP2 keeps the lists in its module state)."""
    state = [layer._get_fsdp_state() for layer in model.layers]
    assert len(state) >= 2
    for i, layer in enumerate(state):
        assert layer._states_to_forward_prefetch == state[i + 1 : i + 2], i
        assert layer._states_to_backward_prefetch == (state[i - 1 : i] if i else []), i
    root = model._get_fsdp_state()
    assert root._states_to_forward_prefetch == state[:1] and root._states_to_backward_prefetch == state[-1:]


def run2(out: str, steps: int, save_at: int) -> None:
    from score.model import Engine, SamplingParams

    env = D.init_distributed("cpu")
    model = D.shard_policy(make_model(), env)
    _check_prefetch(model)
    optimizer = make_optimizer(model)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=5, ignore_eos=True)
    with D.unsharded(model):  # built while gathered: the engine takes the compute dtype from the weights
        engine = Engine(model, block_size=4, num_blocks=32, max_model_len=32, max_num_seqs=4)
    norms = []
    for step in range(steps):  # as the trainer: generate on gathered weights, then train sharded
        with D.unsharded(model):
            engine.generate(PROMPTS, greedy)
        engine.clear_cache()
        norms.append(train_step(model, optimizer, step, env))
        if step + 1 == save_at:
            save_sharded(out, save_at, model, optimizer, {"data_step": save_at})
            _save_params(model, os.path.join(out, f"params_step{save_at}.safetensors"))
    _save_params(model, os.path.join(out, f"params_step{steps}.safetensors"))

    with D.unsharded(model):
        with torch.no_grad():
            logits = model(torch.tensor([PROMPTS[0]]))
        outs = engine.generate(PROMPTS, greedy)
    sharded_after = all(hasattr(p, "to_local") for p in model.parameters())

    reference = D.shard_reference(make_model(), env)  # the initial weights, frozen
    with torch.no_grad():
        ref_logp = sequence_logprobs(reference, PROMPTS[0])
    D.reshard(reference)
    sharded_after = sharded_after and all(hasattr(p, "to_local") for p in reference.parameters())
    export_consolidated(model, os.path.join(out, "hf"))

    # The GPU configuration (bf16 compute, fp32 master weights and fp32 gradient reduction), on gloo.
    mixed = D.shard_policy(make_model(), env, compute_dtype=torch.bfloat16)
    mixed_norm = train_step(mixed, make_optimizer(mixed), 0, env)
    with D.unsharded(mixed):
        gathered = str(mixed.layers[0].mlp.up_proj.weight.dtype)
    mixed_dtypes = {
        "master": str(mixed.layers[0].mlp.up_proj.weight.dtype),
        "grad": str(mixed.layers[0].mlp.up_proj.weight.grad.dtype),
        "gathered": gathered,
    }
    if env.is_main:
        save_file(
            {"logits": logits.contiguous(), "ref_logp": ref_logp.contiguous()},
            os.path.join(out, "unsharded_logits.safetensors"),
        )
        with open(os.path.join(out, "run2.json"), "w") as f:
            json.dump(
                {
                    "norms": norms,
                    "tokens": [o[0].token_ids for o in outs],
                    "mixed_norm": mixed_norm,
                    "mixed_dtypes": mixed_dtypes,
                    "resharded_after_generation": sharded_after,
                },
                f,
            )
    D.shutdown()


def resume1(out: str, steps: int, ckpt: str) -> None:
    env = D.init_distributed("cpu")
    model = D.shard_policy(make_model(), env)
    optimizer = make_optimizer(model)
    norms = [train_step(model, optimizer, step, env) for step in range(steps)]
    _save_params(model, os.path.join(out, f"params_fresh1_step{steps}.safetensors"))

    model = D.shard_policy(make_model(), env)
    optimizer = make_optimizer(model)
    state = load_sharded(ckpt, model, optimizer)
    for step in range(state["data_step"], steps):
        train_step(model, optimizer, step, env)
    _save_params(model, os.path.join(out, f"params_resumed1_step{steps}.safetensors"))
    with open(os.path.join(out, "resume1.json"), "w") as f:
        json.dump({"norms": norms, "state": state}, f)
    D.shutdown()


def fail(exit_rank: int) -> None:
    env = D.init_distributed("cpu", timeout_s=300)
    if env.rank == exit_rank:
        time.sleep(0.5)
        print(f"rank {env.rank} exiting on purpose", flush=True)
        os._exit(3)
    torch.distributed.barrier()  # never completes: the peer is gone
    time.sleep(300)


def train(config: str, out: str, resume: bool) -> None:
    from score.rl.config import load_config
    from score.rl.parallel.seam import FSDP2
    from tests.helpers.tiny_run import trainer_with_parity

    cfg = load_config(config, [])
    env = D.init_distributed("cpu")
    groups = D.shard_groups(cfg.optim.prompts_per_step, env)
    print(f"rank {env.rank} of {env.world_size}, local rank {env.local_rank}, groups {list(groups)}", flush=True)
    trainer = trainer_with_parity(cfg, out, resume=resume, parallel=FSDP2(env))
    try:
        trainer.fit()
    finally:
        trainer.close()
    D.shutdown()


def unshared(out: str) -> None:
    """Each rank looks at a folder of its own, as nodes whose --out is on their own local disks."""
    env = D.init_distributed("cpu")
    folder = os.path.join(out, f"rank{env.rank}")
    os.makedirs(folder, exist_ok=True)
    try:
        D.check_shared_folder(folder, env, wait_s=1.0)
    except ValueError as e:
        print(f"rank {env.rank}: {e}", flush=True)
    else:
        D.exit_rank(3)
    D.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)  # ranks share the cores; oversubscribed threads only slow them down
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "run2":
        run2(rest[0], int(rest[1]), int(rest[2]))
    elif mode == "resume1":
        resume1(rest[0], int(rest[1]), rest[2])
    elif mode == "fail":
        fail(int(rest[0]))
    elif mode == "train":
        train(rest[0], rest[1], rest[2:] == ["resume"])
    elif mode == "unshared":
        unshared(rest[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    D.exit_rank(0)  # as score's CLI ends a rank (see exit_rank)
