"""Every Triton launch configuration compiles for sm_80 and sm_90 on this CPU-only machine.

The test session runs kernels under TRITON_INTERPRET=1, which accepts code the GPU compiler
rejects; so compilation runs in a fresh process with the interpreter off (kernels/aot.py
describes the `aot_launches()` convention that lists what runs).
"""

import json
import os
import subprocess
import sys

import pytest

from score.kernels.aot import SHARED_MEMORY_LIMIT

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from score.kernels.aot import main; sys.exit(main())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.stdout.strip(), f"aot compile printed nothing; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_every_kernel_module_is_covered(aot_results):
    modules = {r["module"] for r in aot_results}
    for expected in (
        "score.kernels.fused_linear_logprob",
        "score.kernels.kl_penalty",
        "score.kernels.rms_norm",
        "score.kernels.rope",
        "score.kernels.rope_kv_store",
        "score.kernels.score_loss",
        "score.kernels.swiglu",
        "score.kernels.varlen_attention",
    ):
        assert expected in modules
    for module in modules:
        assert {r["capability"] for r in aot_results if r["module"] == module} == {80, 90}
    # every launch, every target, without and with the alignment hints GPU tensors get
    variants = {(r["module"], r["launch"], r["capability"], r["aligned"]) for r in aot_results}
    assert variants == {(m, n, c, a) for m, n, c, _ in variants for a in (False, True)}


def test_every_launch_compiles_to_ptx_and_cubin(aot_results):
    failed = [
        f"{r['launch']} sm_{r['capability']} aligned={r['aligned']}: {r['error']}" for r in aot_results if not r["ok"]
    ]
    assert not failed, "\n".join(failed)
    for r in aot_results:
        assert r["has_ptx"] and r["has_cubin"], r["launch"]


def test_shared_memory_within_device_limit(aot_results):
    for r in aot_results:
        assert r["shared_limit"] == SHARED_MEMORY_LIMIT[r["capability"]]
        assert 0 <= r["shared"] <= r["shared_limit"], f"{r['launch']} sm_{r['capability']} uses {r['shared']} B"


def test_the_aligned_variant_pipelines_its_loads(aot_results):
    """With the alignment hints a multi-stage GEMM loop keeps more than one stage of tiles in shared
    memory (if Triton stopped reading the hints, both variants would be the same code)."""
    shared = {}  # (launch, pointer types, target, aligned) -> shared memory
    for r in aot_results:
        if r["module"] == "score.kernels.fused_linear_logprob" and r["launch"].endswith("w8s3]"):
            shared[r["launch"], r["pointers"], r["capability"], r["aligned"]] = r["shared"]
    # the forward and backward kernel, for bf16, fp16 and both with an fp32 weight; two targets, two variants
    assert len(shared) == 2 * 4 * 2 * 2
    for (launch, pointers, capability, aligned), size in shared.items():
        if aligned:
            assert size > shared[launch, pointers, capability, False], (launch, pointers, capability)
