"""The one place a run differs between one process and one rank of an FSDP2 job.

The trainer asks its `Parallel` for everything that depends on how the run is spread over
processes: the policy and the frozen reference, the weights the engine generates from, autocast
(the precision contract, ../precision.py, is the same for both),
this rank's share of a step's prompt groups, sums, maxima and gathers of statistics, gradient
clipping, checkpoints and the final export. `SingleProcess` does each the plain way; `FSDP2`
shards, all-gathers and reduces (distributed.py). The trainer never asks which one it has.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Protocol

import torch

from score.model import from_pretrained, load_tokenizer, save_pretrained

from ..checkpoints import (
    UnreadableCheckpoint,
    export_consolidated,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
    save_sharded,
    set_aside,
)
from ..config import RunConfig
from ..factories import make_engine, make_reward, pick_device, prompt_builder
from ..precision import Precision
from . import distributed as D


class Parallel(Protocol):
    device: torch.device
    is_main: bool
    rank: int
    world_size: int
    precision: Precision  # set by build_models

    def build_models(self, cfg: RunConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(policy with master weights, frozen reference in the compute dtype) from cfg.model.path, ready
        for the optimizer."""

    def generation(self, *models: torch.nn.Module):
        """A context in which `models` hold whole weights an engine can decode from."""

    def after_loss(self, reference: torch.nn.Module) -> None:
        """Frees what the reference's no-grad forwards left gathered, once a step's losses are done."""

    def autocast(self):
        """The autocast context of the policy's and the reference's forwards."""

    def my_groups(self, num_groups: int) -> range:
        """The global indices of the prompt groups this process trains on."""

    def sum(self, values: list) -> list[float]: ...

    def max(self, values: list) -> list[float]: ...

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in global order."""

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's rows of a [n, ...] CPU tensor, concatenated in global order."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float: ...

    def barrier(self) -> None: ...

    def check_shared(self, folder: Path) -> None:
        """Every process sees the run folder `folder` (a ValueError everywhere if one does not)."""

    def save(self, run_dir: Path, step: int, policy, optimizer, state: dict, *, keep_last: int, tokenizer) -> Path:
        """A checkpoint of `step` (every process calls it)."""

    def resume(self, run_dir: Path, policy, optimizer) -> int:
        """Loads the newest checkpoint this kind of run can resume from; returns its step."""

    def export(self, policy: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
        """The whole policy as an HF folder of `dtype` weights (every process calls it)."""

    def evaluation(self, trainer, final: Path):
        """A context yielding (engine, prompt builder, reward) for the after-training evaluation of
        the policy in `final`, or None in a process that does not evaluate."""


def parallel_for_run(cfg: RunConfig) -> Parallel:
    """FSDP2 when this process was started by torchrun (it joins the job), else SingleProcess."""
    if D.launched_by_torchrun():
        return FSDP2(D.init_distributed(cfg.model.device))
    return SingleProcess.for_run(cfg)


def _nothing_to_resume(run_dir) -> FileNotFoundError:
    return FileNotFoundError(f"--resume: no checkpoint under {Path(run_dir) / 'checkpoints'}")


class SingleProcess:
    """Everything in this process: plain modules, identity reductions, plain checkpoints."""

    is_main = True
    rank, world_size = 0, 1

    def __init__(self, device: torch.device):
        self.device = device
        self.precision = None

    @classmethod
    def for_run(cls, cfg: RunConfig) -> SingleProcess:
        return cls(pick_device(cfg.model.device))

    def build_models(self, cfg):
        self.precision = p = Precision.of(cfg, self.device)
        policy = from_pretrained(cfg.model.path, dtype=p.master_dtype, device=self.device)
        policy.set_kernels(p.kernels)
        return policy, p.frozen_copy(policy)

    def generation(self, *models):
        return contextlib.nullcontext()

    def after_loss(self, reference):
        pass

    def autocast(self):
        return self.precision.autocast()

    def my_groups(self, num_groups):
        return D.shard_groups(num_groups, None)

    def sum(self, values):
        return D.all_reduce_sum(values, None)

    def max(self, values):
        return D.all_reduce_max(values, None)

    def gather(self, items):
        return list(items)

    def gather_rows(self, rows):
        return rows

    def clip_grad_norm(self, model, max_norm):
        return D.clip_grad_norm(model, max_norm)

    def barrier(self):
        pass

    def check_shared(self, folder):
        pass

    def save(self, run_dir, step, policy, optimizer, state, *, keep_last, tokenizer):
        return save_checkpoint(run_dir, step, policy, optimizer, state, keep_last=keep_last, tokenizer=tokenizer)

    def resume(self, run_dir, policy, optimizer):
        """A plain run resumes from either format (a sharded checkpoint loads into the plain model).
        A checkpoint whose files cannot be read (corrupt, truncated) is reported, set aside, and the
        next older one is tried; nothing is loaded from it. When none can be read, FileNotFoundError
        says so, as when there is none."""
        plain = list_checkpoints(run_dir, "plain")[::-1]
        for i, path in enumerate(plain):
            try:
                return int(load_checkpoint(path, policy, optimizer)["step"])
            except UnreadableCheckpoint as e:
                older = f"falling back to {plain[i + 1].name}" if i + 1 < len(plain) else "no older one is left"
                aside = set_aside(path)
                print(
                    f"--resume: checkpoint {path} cannot be read ({e}); set aside as {aside.name}; {older}",
                    file=sys.stderr,
                    flush=True,
                )
        sharded = latest_checkpoint(run_dir, "sharded")
        if sharded is not None:
            return int(load_sharded(sharded, policy, optimizer)["step"])
        if plain:
            raise FileNotFoundError(
                f"--resume: none of the {len(plain)} checkpoints under {plain[0].parent} can be read "
                "(each is set aside as step_….unreadable)"
            )
        raise _nothing_to_resume(run_dir)

    def export(self, policy, folder, dtype):
        save_pretrained(policy, folder, dtype)

    @contextlib.contextmanager
    def evaluation(self, trainer, final):
        with trainer.generation() as engine:  # the trained policy itself, already in memory
            yield engine, trainer.builder, trainer.reward


class FSDP2:
    """One rank of a torchrun job: FSDP2-sharded policy and reference, collectives over the group."""

    def __init__(self, env: D.DistEnv):
        self.env = env
        self.device = env.device
        self.is_main = env.is_main
        self.precision = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def build_models(self, cfg):
        self.precision = p = Precision.of(cfg, self.device)
        if p.master_dtype != torch.float32:
            raise ValueError(
                f"model.master_dtype = {cfg.model.master_dtype!r} runs in one process only: FSDP2 keeps fp32 "
                "master weights (bf16 ones would drop most AdamW updates)"
            )
        # the mixed-precision policy gathers the weights in the compute dtype: half the bytes per all-gather
        policy, reference = D.sharded_from_pretrained(
            cfg.model.path,
            self.env,
            compute_dtype=p.compute_dtype,
            reference_cpu_offload=cfg.model.reference_cpu_offload,
        )
        for model in (policy, reference):
            model.set_kernels(p.kernels)
        return policy, reference

    @contextlib.contextmanager
    def generation(self, *models):
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(D.unsharded(model))
            yield

    def after_loss(self, reference):
        D.reshard(reference)  # its root stays gathered after a forward; free it until the next step

    def autocast(self):
        return self.precision.autocast()

    def my_groups(self, num_groups):
        return D.shard_groups(num_groups, self.env)

    def sum(self, values):
        return D.all_reduce_sum(values, self.env)

    def max(self, values):
        return D.all_reduce_max(values, self.env)

    def gather(self, items):
        return D.gather_lists(items, self.env)

    def gather_rows(self, rows):
        return torch.tensor(D.gather_lists(rows.tolist(), self.env))

    def clip_grad_norm(self, model, max_norm):
        return D.clip_grad_norm(model, max_norm)

    def barrier(self):
        D.barrier(self.env)

    def check_shared(self, folder):
        D.check_shared_folder(folder, self.env)

    def save(self, run_dir, step, policy, optimizer, state, *, keep_last, tokenizer):
        return save_sharded(run_dir, step, policy, optimizer, state, keep_last=keep_last)

    def resume(self, run_dir, policy, optimizer):
        sharded = latest_checkpoint(run_dir, "sharded")
        if sharded is not None:
            return int(load_sharded(sharded, policy, optimizer)["step"])
        plain = latest_checkpoint(run_dir, "plain")
        if plain is not None:
            raise ValueError(
                f"--resume: {plain} was written by a single-process run; resume it without "
                "torchrun/--nproc (multi-process runs resume from their sharded checkpoints)"
            )
        raise _nothing_to_resume(run_dir)

    def export(self, policy, folder, dtype):
        export_consolidated(policy, folder, dtype=dtype)  # a collective; rank 0 writes

    @contextlib.contextmanager
    def evaluation(self, trainer, final):
        """Leaves the job, then rank 0 alone evaluates the exported policy. Reached only after a clean
        run: after an error a peer may be waiting in another collective and never reach the closing
        barrier, so the process exits and the launcher stops the job."""
        trainer.close()
        D.shutdown()
        if not self.is_main:
            yield None
            return
        cfg = trainer.cfg
        model = from_pretrained(final, dtype=self.precision.compute_dtype, device=self.device)
        model.set_kernels(self.precision.kernels)
        reward = make_reward(cfg)
        try:
            engine = make_engine(cfg, model, max_model_len=trainer.max_model_len)
            yield engine, prompt_builder(cfg, load_tokenizer(final)), reward
        finally:
            reward.close()
