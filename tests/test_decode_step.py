"""The static decode step (model/engine/decode_step.py): a batch padded up to its bucket gives the same
tokens and logprobs as the unpadded eager step, for every bucket size, block sizes 1 and 16, with
preemption, greedy and sampled, the torch and (interpreted) Triton attention; CUDA graphs of it
equal eager CUDA steps (run where CUDA is present)."""

import copy

import pytest
import torch

from score.kernels.rope_kv_store import rope_store_kv
from score.model import Engine, SamplingParams, Transformer
from score.model.engine import attention_context
from score.model.engine.decode_step import DecodeStep, check_batch_sizes, graph_batch_sizes
from tests.helpers.model_fixtures import tiny_decoder
from tests.helpers.op_count import top_level_ops

VOCAB = 97
BUCKETS = [1, 2, 4, 8, 16]
BF16_LOGIT_TOLERANCE = 0.15  # bf16 logits of this tiny model (magnitudes ~10) round by up to ~0.05


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=3, vocab_size=VOCAB, architecture="Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 17, 1, 9, 30, 5, 12, 2, 21, 7, 16, 4, 11]  # 13 prompts: buckets 16 down to 1 as they finish
    return [torch.randint(0, VOCAB - 1, (n,), generator=gen).tolist() for n in lengths]


def run(model, prompts, params, max_tokens=None, **engine_kw):
    engine = Engine(model, max_model_len=96, max_num_seqs=16, **engine_kw)
    used = []
    bucket = DecodeStep.bucket

    def recording(self, n):
        used.append(bucket(self, n))
        return used[-1]

    DecodeStep.bucket = recording
    try:
        outs = engine.generate(prompts, params, max_tokens=max_tokens)
    finally:
        DecodeStep.bucket = bucket
    return outs, engine, set(used)


def assert_same(got, want, logprob_tolerance=1e-5):
    for got_out, want_out in zip(got, want, strict=True):
        for g, w in zip(got_out, want_out, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)) <= logprob_tolerance


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=12, seed=7),
    ],
    ids=["greedy", "sampled"],
)
def test_padded_buckets_equal_the_unpadded_step(model, prompts, block_size, params):
    # every prompt stops at its own length, so the running batch shrinks through every bucket
    max_tokens = [2 + i for i in range(len(prompts))]
    want, _, exact = run(model, prompts, params, max_tokens, block_size=block_size, num_blocks=4096 // block_size)
    got, engine, used = run(
        model,
        prompts,
        params,
        max_tokens,
        block_size=block_size,
        num_blocks=4096 // block_size,
        decode_batch_sizes=BUCKETS,
    )
    assert_same(got, want)
    assert used == set(BUCKETS) and len(exact) > len(BUCKETS)  # padded to each bucket; unpadded not
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("block_size", [1, 16])
def test_padded_buckets_with_preemption(model, prompts, block_size):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=11, ignore_eos=True)
    num_blocks = (96 + 16) // block_size + 2  # room for about one long sequence: preemptions
    want, eager, _ = run(model, prompts, params, block_size=block_size, num_blocks=num_blocks)
    got, padded, _ = run(
        model, prompts, params, block_size=block_size, num_blocks=num_blocks, decode_batch_sizes=[3, 5, 16]
    )
    assert_same(got, want)
    assert padded.stats.preemptions > 0 and padded.stats.preemptions == eager.stats.preemptions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_buckets_through_the_triton_kernels(model, prompts, monkeypatch, dtype):
    """The CUDA path (under the interpreter on a CPU, compiled where CUDA is present): Triton
    attention, the decoder's kernels (norms, SwiGLU) and RoPE inside the KV store (one launch per
    layer and step) against the plain ops, unpadded on the CPU; fp32, and the bf16 an engine over fp32
    master weights generates in (its own bf16 copy of them)."""
    params = SamplingParams(temperature=0, max_tokens=4)
    want, _, _ = run(model, prompts[:5], params, block_size=16, num_blocks=64)
    launches = []

    def counting(*args, **kw):
        launches.append(args[0].shape[0])
        return rope_store_kv(*args, **kw)

    monkeypatch.setattr(attention_context, "rope_store_kv", counting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = Transformer(model.config).to(device).eval()
    on_device.load_state_dict(model.state_dict())
    on_device.set_kernels("triton")
    kw = dict(block_size=16, num_blocks=64, attention_backend="triton", decode_batch_sizes=[8, 16], dtype=dtype)
    got, _, used = run(on_device, prompts[:5], params, **kw)
    if dtype == torch.float32:
        assert_same(got, want)
    else:  # greedy up to bf16's rounding: each token within it of the fp32 model's best, logprobs too
        for prompt, (completion,) in zip(prompts[:5], got, strict=True):
            for i, token in enumerate(completion.token_ids):
                with torch.no_grad():
                    exact = model(torch.tensor([prompt + completion.token_ids[:i]]))[0, -1].double().log_softmax(-1)
                assert exact.max() - exact[token] <= BF16_LOGIT_TOLERANCE
                assert abs(completion.logprobs[i] - exact[token]) <= BF16_LOGIT_TOLERANCE
    assert used == {8}
    if device == "cpu":  # (on CUDA the decode steps are graph replays, which call no Python)
        # one prefill and three decode steps (the last token needs no forward), every layer
        assert len(launches) == 4 * model.config.num_hidden_layers and launches[-1] == 8


@pytest.mark.parametrize("block_size", [1, 4])
def test_block_table_rows_hold_every_sequences_blocks_after_each_step(model, prompts, block_size):
    """Continuing steps write only the blocks a table gained: the rows must still hold each running
    sequence's whole table, through block boundaries, finishes and preemptions (a small pool)."""
    fill, checked = DecodeStep._fill, []

    def checking(self, staging, seqs, b, after, continues):
        incremental = [staging.tables[row] is seq.block_table for row, seq in enumerate(seqs)]
        longest = fill(self, staging, seqs, b, after, continues)
        rows = staging.tables_np.reshape(-1, self.width)
        for row, seq in enumerate(seqs):
            assert rows[row, : len(seq.block_table)].tolist() == seq.block_table
        checked.append(all(incremental))
        return longest

    DecodeStep._fill = checking
    try:
        params = SamplingParams(temperature=1.0, max_tokens=14, seed=3)
        max_tokens = [14 - i % 9 for i in range(len(prompts))]  # sequences finish at different steps
        engine = Engine(model, max_model_len=48, max_num_seqs=16, block_size=block_size, num_blocks=60 // block_size)
        engine.generate(prompts, params, max_tokens=max_tokens)
    finally:
        DecodeStep._fill = fill
    assert engine.stats.preemptions > 0 and True in checked and False in checked


def test_sleep_drops_the_step_buffers_and_wake_rebuilds_them(model, prompts):
    params = SamplingParams(temperature=0, max_tokens=6)
    engine = Engine(model, max_model_len=96, max_num_seqs=16, block_size=4, num_blocks=512, decode_batch_sizes=BUCKETS)
    first = engine.generate(prompts, params)
    step = engine._decode
    assert step is not None and step.kv_cache is engine.kv_cache
    engine.sleep()
    assert engine._decode is None
    engine.wake()
    again = engine.generate(prompts, params)
    assert engine._decode is not step and engine._decode.kv_cache is engine.kv_cache
    assert_same(again, first)


def test_batch_sizes():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert check_batch_sizes((16, 1, 4, 4), 16) == [1, 4, 16]
    with pytest.raises(ValueError, match="must reach max_num_seqs=32"):
        check_batch_sizes([1, 16], 32)
    with pytest.raises(ValueError, match="list of ints >= 1"):
        check_batch_sizes([0, 16], 16)


def test_engine_names_bad_batch_sizes(model):
    with pytest.raises(ValueError, match="decode_batch_sizes must reach max_num_seqs=256"):
        Engine(model, max_model_len=96, num_blocks=64, decode_batch_sizes=[1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_equal_eager_cuda_steps(model, prompts):
    cuda_model = Transformer(model.config).to("cuda").eval()
    cuda_model.load_state_dict(model.state_dict())
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=16, seed=5)
    max_tokens = [4 + i for i in range(len(prompts))]
    graphs = Engine(cuda_model, max_model_len=96, num_blocks=512)
    got = graphs.generate(prompts, params, max_tokens=max_tokens)
    eager = Engine(cuda_model, max_model_len=96, num_blocks=512, enforce_eager=True)
    want = eager.generate(prompts, params, max_tokens=max_tokens)
    assert_same(got, want)
    captured = graphs._decode.num_captures
    assert captured > 0 and eager._decode.num_captures == 0
    again = graphs.generate(prompts, params, max_tokens=max_tokens)  # replays: nothing captured anew
    assert_same(again, want)
    assert graphs._decode.num_captures == captured
    with torch.no_grad():  # weights replaced by new storage: the graphs are dropped and recaptured
        for p in cuda_model.parameters():
            p.data = p.data.clone()
    assert_same(graphs.generate(prompts, params, max_tokens=max_tokens), want)
    assert graphs._decode.num_captures > captured


def test_graphs_only_on_cuda_and_never_under_fsdp2():
    from torch.distributed.fsdp import FSDPModule

    from score.model.engine.decode_step import captures_graphs

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not captures_graphs(plain, torch.device("cpu"))
    assert captures_graphs(plain, torch.device("cuda"))  # decided from the module tree; nothing allocated
    sharded = torch.nn.Sequential(torch.nn.Linear(2, 2))
    # what fully_shard does to a module's class (it needs a process group to do the rest)
    sharded[0].__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
    assert not captures_graphs(sharded, torch.device("cuda"))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0)])
def test_a_cpu_decode_step_of_eight_layers_dispatches_at_most_200_ops_and_samples_once(params):
    """Top-level ops (those Python dispatches: aten's and oneDNN's) per decode step of 16 sequences through an
    8-layer Qwen2-shaped model: (ops of prefill + 1 + n steps - ops of prefill + 1) / n. The count
    does not depend on the sizes, so a small model stands for the benchmark's."""
    model = tiny_decoder(seed=4, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    ids = torch.randint(0, 97, (16, 20), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, block_size=16, max_model_len=128, max_num_seqs=16)

    def counts(tokens):
        engine.clear_cache()
        sampling = SamplingParams(**{**vars(params), "max_tokens": tokens, "ignore_eos": True, "seed": 0})
        with torch.inference_mode():
            names = top_level_ops(lambda: engine.generate(ids, sampling))
        return len(names), names.count("aten::log_softmax")

    counts(2)  # warm: the kept buffers and views
    (base, base_passes), (ops, passes), n = counts(2), counts(10), 8
    assert (ops - base) / n <= 200
    assert passes - base_passes == n  # one sampling pass per step for the whole batch


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_graphs_are_captured_from_inert_inputs_that_store_nothing(model, prompts, backend):
    """What `capture_graphs` runs before a call's first step (here eagerly on the CPU; "triton" is
    the kernels a GPU captures, under the interpreter): every row stores at KV slot -1, so the pool,
    which may hold cached prefixes, is left as it was."""
    kw = dict(max_model_len=96, max_num_seqs=16, block_size=4, num_blocks=64, decode_batch_sizes=BUCKETS)
    if backend == "triton":  # every kernel a GPU step runs: RoPE inside the KV store included
        model = copy.deepcopy(model)
        model.set_kernels("triton")
    engine = Engine(model, attention_backend=backend, **kw)
    engine.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=3))  # cached prefixes in the pool
    step = engine._decode
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, seed=1)
    with torch.inference_mode():
        before = engine.kv_cache.clone()
        for b in sorted(BUCKETS, reverse=True):
            step._write_inert_inputs(b)
            tokens, logprobs = step._compute(b, params, step.max_model_len, None)
            assert tokens.shape == (b,) and bool(torch.isfinite(logprobs).all())
        assert torch.equal(engine.kv_cache, before)
    # and real steps after them are unaffected
    again = engine.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=3))
    fresh = Engine(model, attention_backend=backend, **kw)
    assert_same(again, fresh.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_each_bucket_is_captured_once_per_wake_over_three_training_steps(tmp_path):
    from tests.helpers.tiny_run import tiny_config, trainer_with_parity

    cfg = tiny_config(tmp_path, model__device="cuda", optim__prompts_per_step=4, rollout__samples_per_prompt=4)
    trainer = trainer_with_parity(cfg, tmp_path / "run")
    try:
        counts = []
        for _ in range(3):
            before = trainer.engine.graph_captures if trainer.engine is not None else 0
            trainer.train_step()
            counts.append(trainer.engine.graph_captures - before)
    finally:
        trainer.close()
    # 16 sequences per step at temperature 1: buckets 1, 2, 4, 8, 16, each once per wake, no more
    assert counts == [len(graph_batch_sizes(16))] * 3
