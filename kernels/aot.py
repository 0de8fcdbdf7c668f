"""Ahead-of-time compilation of every Triton launch the package can make.

The interpreter (`TRITON_INTERPRET=1`, used by the CPU tests) accepts code that the GPU compiler
rejects: wrong dot shapes, too much shared memory, unsupported casts. So every launch
configuration is also compiled for real GPU targets on a CPU-only machine.

Convention (every `score.kernels` module with Triton kernels follows it):

* The module defines `aot_launches() -> list[Launch]`: every launch configuration its dispatch
  code can use — the `@triton.jit` function, the type of every argument (pointer element types,
  integer/float scalars, and `"constexpr"` for compile-time arguments), the constexpr values,
  `num_warps` and `num_stages`.
* The runtime dispatch picks configurations ONLY from that same table and launches them with
  `launch(cfg, grid, *args)`, which checks the tensors it is given against the table's
  signature. The AOT test therefore covers exactly what runs on a GPU.
* `tests/test_aot_compile.py` discovers every module with `aot_launches` and runs
  `score.kernels.aot.main()` in a fresh process (the test session runs with the interpreter on,
  which replaces `triton.jit` functions by interpreted ones), compiling each launch for
  `GPUTarget("cuda", 80, 32)` and `GPUTarget("cuda", 90, 32)` and checking shared memory against
  the per-block limit of A100 (sm_80) and H100 (sm_90).

Triton specialises some runtime values when launching (integers equal to 1, divisibility by 16
as alignment hints): hints on the same configuration, not new configurations, but they change
the code. Without the alignment hint Triton does not pipeline a loop's loads, so the variant a
GPU runs on torch tensors (16-byte aligned, sizes mostly multiples of 16) holds num_stages
buffers in shared memory where the unhinted one holds one. Each launch is therefore compiled
twice per target: with no hints, and with the hint on every pointer and integer (`aligned_attrs`).

Not done here: autotuning. A table entry is one fixed configuration chosen by hand; adding an
entry makes the test compile it too.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import sys
import time
from typing import Any

import torch

from .dispatch import interpreting

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
AOT_TARGETS = (80, 90)

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def triton_type(dtype: torch.dtype) -> str:
    """Triton's name of a torch dtype ("fp32", "bf16", "i64", ...)."""
    if dtype not in _TORCH_TO_TRITON:
        raise ValueError(f"no Triton type for torch dtype {dtype}")
    return _TORCH_TO_TRITON[dtype]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch configuration: a jit function with fixed types, constexprs, warps and stages.

    `signature` names every argument of `kernel` in order, with its Triton type ("*fp32" for a
    pointer to fp32, "i32", "fp32", ...) or "constexpr"; `constexprs` gives the value of every
    "constexpr" argument.
    """

    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{fn.__name__}[{consts}|w{self.num_warps}s{self.num_stages}]"


def launch(cfg: Launch, grid: tuple, *args) -> None:
    """Launch `cfg.kernel` on `grid` with runtime `args` (constexprs come from `cfg`).

    The tensors' dtypes are checked against `cfg.signature`, so a launch that the AOT test did not
    compile fails here instead of compiling something untested.
    """
    runtime = [(n, t) for n, t in cfg.signature.items() if t != "constexpr"]
    if len(args) != len(runtime):
        raise ValueError(f"{cfg.name}: expected {len(runtime)} runtime arguments, got {len(args)}")
    for (name, expected), value in zip(runtime, args, strict=True):
        if isinstance(value, torch.Tensor):
            got = "*" + triton_type(value.dtype)
            if got != expected:
                raise ValueError(f"{cfg.name}: argument {name} is {got}, the launch table says {expected}")
        elif expected.startswith("*"):
            raise ValueError(f"{cfg.name}: argument {name} must be a tensor ({expected}), got {type(value)}")
        elif expected == "i32" and not -(2**31) <= int(value) < 2**31:
            # Triton would silently specialise the argument to i64: an uncompiled variant.
            raise ValueError(f"{cfg.name}: argument {name} = {value} does not fit the table's i32")
    cfg.kernel[grid](*args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def select(table: list[Launch], **constexprs) -> Launch:
    """The table entry whose constexprs include all of `constexprs` (exactly one must match)."""
    found = [c for c in table if all(c.constexprs.get(k) == v for k, v in constexprs.items())]
    if len(found) != 1:
        raise ValueError(f"launch table has {len(found)} entries matching {constexprs}, expected 1")
    return found[0]


def discover_launches() -> dict[str, list[Launch]]:
    """Every `score.kernels.<module>.aot_launches()` table, by module name."""
    import score.kernels as package

    tables = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "aot_launches"):
            tables[module.__name__] = module.aot_launches()
    return tables


def aligned_attrs(cfg: Launch) -> dict:
    """Triton's divisibility-by-16 hint on every pointer and integer argument of `cfg`: what a
    launch gets from tensors allocated by torch and sizes that are multiples of 16, the common
    case on a GPU. Only with it does Triton pipeline a loop's loads (asynchronous copies into
    multi-stage shared memory buffers), so it is the variant that needs the most shared memory."""
    names = list(cfg.signature)
    hinted = [n for n, t in cfg.signature.items() if t.startswith("*") or t in ("i32", "i64")]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def compile_launch(cfg: Launch, capability: int, aligned: bool = False):
    """Compile one launch for `cuda` at `capability` (80, 90), with no alignment hints or (`aligned`)
    with `aligned_attrs`; returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cfg.kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise ValueError(
            f"{cfg.name}: kernel is {type(fn).__name__}, not a JITFunction; AOT compilation needs "
            "TRITON_INTERPRET unset when the module is imported"
        )
    attrs = aligned_attrs(cfg) if aligned else None
    src = ASTSource(fn=fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs), attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def _check_one(task: tuple[str, int, int, bool]) -> dict:
    module, index, cap, aligned = task
    cfg = importlib.import_module(module).aot_launches()[index]
    started = time.time()
    pointers = ",".join(t for t in cfg.signature.values() if t.startswith("*"))  # a name serves several dtypes
    entry = {"module": module, "launch": cfg.name, "pointers": pointers, "capability": cap, "aligned": aligned}
    try:
        compiled = compile_launch(cfg, cap, aligned)
        entry.update(
            ok=True,
            shared=int(compiled.metadata.shared),
            shared_limit=SHARED_MEMORY_LIMIT[cap],
            has_ptx="ptx" in compiled.asm,
            has_cubin="cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0,
        )
    except Exception as exc:  # reported per launch so that one failure does not hide the others
        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    entry["seconds"] = round(time.time() - started, 2)
    return entry


def check_all(capabilities=AOT_TARGETS, workers: int | None = None) -> list[dict]:
    """Compile every discovered launch for each capability, without and with the alignment hints;
    one result dict per (launch, target, variant).

    Compilation (mostly ptxas) is CPU-bound, so it runs in `workers` forked processes (default:
    one per CPU core); Triton's on-disk cache makes repeated runs fast.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tasks = [
        (module, i, cap, aligned)
        for module, table in discover_launches().items()
        for i in range(len(table))
        for cap in capabilities
        for aligned in (False, True)
    ]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_check_one(t) for t in tasks]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_check_one, tasks))


def main() -> int:
    """Compile everything (`python -m score.kernels.aot`), print one JSON list, exit 1 on failure."""
    if interpreting():
        print("unset TRITON_INTERPRET for ahead-of-time compilation", file=sys.stderr)
        return 2
    results = check_all()
    print(json.dumps(results, indent=1))
    bad = [
        r for r in results if not r["ok"] or r["shared"] > r["shared_limit"] or not (r["has_ptx"] and r["has_cubin"])
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
