"""Many GPUs, on one node or several: what makes the one trainer distributed when torchrun (or
`score train --nproc G [--nnodes N ...]`, launch.py) starts it on every rank.

Why it is built this way:
- A rank's GPU is its LOCAL rank's; its share of the data, and whether it writes logs and exports,
  follow its GLOBAL rank. Every rank writes its shards into the run folder, so across nodes that
  folder must be on a shared file system, which is checked before any model is built.
- FSDP2 shards every decoder layer and then the root (embedding, final norm, head); each layer
  prefetches its neighbour's all-gather. The sharded parameters are the fp32 master weights
  (rl/precision.py); the mixed-precision policy gathers them in the compute dtype and reduces
  gradients in fp32. The frozen reference is sharded alike and stored in the compute dtype.
- Gradients are SUMMED across ranks, never averaged: each rank divides its loss by the GLOBAL
  denominator, so the reduced gradient is exactly the one-process gradient of the same batch, and
  G ranks compute the step one process would.
- Rank 0 alone reads the checkpoint and broadcasts it into shards built on the meta device: start-up
  never holds a whole model per GPU. A failure there is every rank's error.
- A rollout all-gathers the whole model once (the engine's many small decode forwards would
  otherwise gather every layer per token): one full copy of the weights in the compute dtype per GPU
  while generating, freed when it ends.
- Prompt groups are split into contiguous equal slices (never inside a group), so every rank runs
  the same number of micro-batches and FSDP's collectives match one for one; statistics are reduced
  in fp64, in rank order. Nothing is keyed on the rank: sampling seeds come from whole-batch
  positions, so a run's samples do not depend on the world size.

Not done: tensor/sequence parallelism, hybrid sharding (replicate across nodes, shard within one),
and overlapping rollouts of one rank with training of another.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..ranks import raise_on_all_ranks

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" | "gloo"
    mesh: object  # torch.distributed.device_mesh.DeviceMesh over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun set up. `device`: "auto" (cuda:LOCAL_RANK when CUDA is
    available, else cpu), "cuda" or "cpu". `timeout_s` bounds every collective, so a rank that
    disappears without the launcher noticing turns into an error, not a hang."""
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed needs the torchrun environment; missing {', '.join(missing)} (start "
            "with `torchrun --nproc_per_node=G -m score.rl.cli train ...` or `score train --nproc G`)"
        )
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"process group (rank {dist.get_rank()}/{dist.get_world_size()}) disagrees with "
            f"the environment (RANK={rank}, WORLD_SIZE={world})"
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,))
    return DistEnv(rank, world, local, dev, backend, mesh)


def barrier(env: DistEnv | None) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if env is not None and env.world_size > 1:
        dist.barrier()


def check_shared_folder(folder: Path, env: DistEnv | None, *, wait_s: float = 60.0) -> None:
    """Every rank sees what rank 0 writes into `folder`, else a ValueError on every rank naming the
    hosts that do not. Rank 0 writes a file of a fresh random name; the others look for it for up to
    `wait_s` seconds (an NFS client may cache the folder's old listing for as long as a minute)."""
    if env is None or env.world_size == 1:
        return
    box, error = [f".shared-check-{secrets.token_hex(8)}" if env.is_main else None], None
    if env.is_main:
        try:
            (Path(folder) / box[0]).write_text(box[0], encoding="utf-8")
        except OSError as e:
            error = f"{folder}: cannot write there ({e.strerror or e})"
    raise_on_all_ranks(error)
    dist.broadcast_object_list(box, src=0)
    name = box[0]
    probe = Path(folder) / name
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = probe.read_text(encoding="utf-8") == name
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    blind = gather_lists([] if seen else [f"rank {env.rank} on {socket.gethostname()}"], env)
    if env.is_main:
        probe.unlink()
    if blind:
        raise ValueError(
            f"{folder} is not on a file system that every rank shares: {', '.join(blind)} cannot see a file rank 0 "
            "wrote there (every rank writes its shards of each checkpoint into the run folder; give --out a folder "
            "on a shared file system)"
        )


def shutdown() -> None:
    if dist.is_initialized():
        # Without the barrier a fast rank can tear down its gloo pairs while a slow one is still
        # destroying its own.
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> typing.NoReturn:
    """End a rank's process without interpreter finalization (after `shutdown()`).

    A gloo worker thread marks a collective complete before it drops its last reference to the
    collective's tensors, and dropping a tensor that has a Python object takes the GIL. A rank that
    exits right after its last collective can be finalizing the interpreter at that moment; Python
    then ends the thread with pthread_exit, whose unwinding hits a noexcept frame of the worker loop
    (ProcessGroupGloo::runLoop), and std::terminate aborts the rank ("terminate called without an
    active exception", SIGABRT) after all its work is done. The process group lives on in FSDP's
    state, so destroying it does not join those threads first. Leaving with os._exit once stdio is
    flushed skips the finalization; files the run wrote are closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------
def _mp_policy(env: DistEnv, compute_dtype: torch.dtype | None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy(), compute_dtype
    # fp32 reduction: summing 8 ranks' bf16 gradients in bf16 loses ~3 bits on every element.
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32), compute_dtype


def _shard(model: nn.Module, env: DistEnv, mp_policy, offload_policy=None) -> nn.Module:
    from torch.distributed.fsdp import OffloadPolicy, fully_shard, register_fsdp_forward_method

    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"expected a score.model.Transformer with .layers, got {type(model).__name__}")
    kw = dict(mesh=env.mesh, mp_policy=mp_policy, offload_policy=offload_policy or OffloadPolicy())
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **kw)
    # The root (embedding, final norm, head) stays gathered from forward to backward: backward needs
    # it again at once. Explicit, so that `unsharded` can restore exactly these settings.
    fully_shard(model, reshard_after_forward=False, **kw)
    _prefetch_neighbours(model, list(layers))
    # The trainer calls `hidden_states` (not forward) and then uses `lm_head_weight`; registering
    # it makes FSDP all-gather the root's embedding/norm/head around that call as around forward.
    register_fsdp_forward_method(model, "hidden_states")
    return model


def _prefetch_neighbours(root, layers: list) -> None:
    """Each layer issues the next layer's all-gather before its own forward compute, and the
    previous layer's before its backward; the root issues the first (forward) and last (backward)
    layer's. The decoder runs its layers in one fixed order, the case explicit prefetch is for: the
    collective is in flight while the CPU is still launching this layer's kernels, at the cost of
    one more gathered layer alive at a time."""
    root.set_modules_to_forward_prefetch(layers[:1])
    root.set_modules_to_backward_prefetch(layers[-1:])
    for i, layer in enumerate(layers):
        layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 2])
        layer.set_modules_to_backward_prefetch(layers[i - 1 : i] if i else [])


def shard_policy(model: nn.Module, env: DistEnv, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 per decoder layer + root, in place; returns the model. Build the optimizer AFTER this
    (its state then lives on the shards). `compute_dtype` None: bf16 on GPU, fp32 on CPU."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        raise ValueError(
            f"the policy's master weights must be float32 (got {dtypes}); load it with "
            "dtype=float32 and let compute_dtype choose bf16 for the forward/backward"
        )
    mp_policy, _ = _mp_policy(env, compute_dtype)
    _shard(model, env, mp_policy)
    # Sum, do not average: each rank divides its loss by the global denominator itself. Forced sum
    # with divide factor 1 is a plain SUM reduce-scatter (gloo has no PREMUL_SUM).
    for module in fsdp_modules(model):  # per FSDP module: the setting is not inherited
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


def shard_reference(
    model: nn.Module, env: DistEnv, *, compute_dtype: torch.dtype | None = None, cpu_offload: bool = False
) -> nn.Module:
    """Frozen reference: no grad, eval, stored in the compute dtype and sharded like the policy.
    `cpu_offload` keeps its shards in pinned host memory and copies each layer in for its forward
    (GPU only; saves 2 x params / world bytes of GPU memory, costs a host-to-device copy per step)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if cpu_offload and env.device.type != "cuda":
        raise ValueError("cpu_offload of the reference needs GPUs (on CPU the shards are already in host memory)")
    _, dtype = _mp_policy(env, compute_dtype)
    model.requires_grad_(False).eval()
    model.to(dtype)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return _shard(model, env, MixedPrecisionPolicy(), CPUOffloadPolicy() if cpu_offload else None)


def sharded_from_pretrained(
    path, env: DistEnv, *, compute_dtype: torch.dtype | None = None, reference_cpu_offload: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(policy, reference) of an HF folder, loaded straight into FSDP2 shards.

    Every rank builds both models on the meta device and shards them (`shard_policy`,
    `shard_reference`); rank 0 alone reads the checkpoint into host memory and broadcasts it while
    each rank keeps only its shards. So no GPU ever holds a whole model (a full fp32 policy plus its
    reference copy is 8 x params bytes: 61 GB for a 7.6B model) and the host holds one copy, not one
    per rank. A checkpoint rank 0 cannot read is the same error on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from score.model import ModelConfig, Transformer, from_pretrained

    config = ModelConfig.from_hf(path)  # every rank: a bad config.json fails before any collective
    with torch.device("meta"):
        policy, reference = Transformer(config), Transformer(config)
    shard_policy(policy, env, compute_dtype=compute_dtype)
    shard_reference(reference, env, compute_dtype=compute_dtype, cpu_offload=reference_cpu_offload)
    full, error = {}, None
    if env.is_main:
        try:
            full = from_pretrained(path, dtype=torch.float32, device="cpu").state_dict()
        except (ValueError, FileNotFoundError, OSError) as exc:
            error = str(exc)
    raise_on_all_ranks(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for model, offloaded in ((policy, False), (reference, reference_cpu_offload)):
        model.to_empty(device="cpu" if offloaded else env.device)
        set_model_state_dict(model, dict(full), options=options)  # a copy: the call rewrites its dict
    return policy, reference


def fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    found = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not found:
        raise ValueError(f"{type(model).__name__} is not sharded (call shard_policy/shard_reference first)")
    return found


def reshard(model: nn.Module) -> None:
    """Free every all-gathered weight. The root keeps its embedding/head gathered after a forward
    (FSDP expects backward to need them next); call this after a no-grad forward of the reference."""
    for module in fsdp_modules(model):
        module.reshard()


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """All-gather the whole model for generation; reshard on exit (see the module docstring for
    its memory cost). Gradients must not be computed inside (the engine runs in inference mode)."""
    modules = fsdp_modules(model)
    layers = [m for m in modules if m is not model]  # the root never reshards after forward (_shard)
    for module in layers:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        for module in modules:
            module.unshard()
        yield model
    finally:
        for module in modules:
            module.reshard()
        for module in layers:
            module.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------------------------------------------
# Work split and reductions
# ---------------------------------------------------------------------------------------------------
def shard_groups(num_groups: int, env: DistEnv | None) -> range:
    """Global indices of the prompt groups this rank owns: a contiguous equal slice.

    Equal slices keep micro-batch counts equal across ranks; contiguous slices in rank order make
    `gather_lists` return results in global order. A group (one prompt's k samples) is never split."""
    world, rank = (1, 0) if env is None else (env.world_size, env.rank)
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    if num_groups % world:
        raise ValueError(
            f"{num_groups} prompts per step cannot be split evenly over {world} ranks; "
            f"use a multiple of {world} (e.g. {num_groups + world - num_groups % world})"
        )
    per_rank = num_groups // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def _reduce(values, op, env: DistEnv | None):
    if isinstance(values, dict):
        keys = sorted(values)
        reduced = _reduce([values[k] for k in keys], op, env)
        return dict(zip(keys, reduced, strict=True))
    vals = [float(v) for v in values]
    if env is None or env.world_size == 1:
        return vals
    # fp64 so that sums of token counts and losses are exact enough to be rank-count independent.
    device = env.device if env.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values, env: DistEnv | None):
    """Sum floats over ranks: a list -> list, a dict -> dict (same keys on every rank)."""
    return _reduce(values, dist.ReduceOp.SUM, env)


def all_reduce_max(values, env: DistEnv | None):
    return _reduce(values, dist.ReduceOp.MAX, env)


def gather_lists(local: list, env: DistEnv | None) -> list:
    """Concatenate every rank's list in rank order (picklable items; for per-trajectory metrics)."""
    if env is None or env.world_size == 1:
        return list(local)
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, list(local))
    return [item for part in parts for item in part]


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards) to `max_norm` (inf: measure only); returns
    the norm before clipping, identical on every rank."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
