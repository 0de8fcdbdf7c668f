"""Forward-pass throughput of our decoder against transformers' on the same random weights.

    pytest bench/bench_model_forward.py --benchmark-only -q

Both models hold identical weights (ours is loaded from the checkpoint transformers wrote) and
run a logits forward under `torch.inference_mode`: fp32 on CPU, bf16 on CUDA. transformers uses
its default attention (SDPA), ours SDPA on CPU and flash-attn on CUDA when installed. A third
layout runs ours on the same tokens as one packed varlen batch (the layout training uses).
Each round times both implementations back to back (alternating which goes first), so a busy
machine slows both alike; the speed ratio ours/transformers is the median of the per-round
ratios. It is printed at the end of the module and stored in each row's extra_info. Results: bench/RESULTS.md.
"""

import statistics
import time

import pytest
import torch

from score.model import from_pretrained  # noqa: E402
from tests.helpers.model_fixtures import make_hf_checkpoint

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# A ~15M-parameter model on CPU (a forward takes a fraction of a second on 2 cores); on GPU a
# Qwen2.5-0.5B-shaped one, big enough that launch overheads do not dominate.
SHAPES = {
    "llama_gqa": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
    "qwen3_qknorm": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
}
if CUDA:
    for shape in SHAPES.values():
        shape.update(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=32768,
            head_dim=64,
        )
VARIANT_OF = {"llama_gqa": "llama", "qwen3_qknorm": "qwen3_tied"}
BATCH, SEQ = (2, 256) if not CUDA else (8, 1024)
ROUNDS = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}
    for name, shape in SHAPES.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_checkpoint(path, VARIANT_OF[name], tie_word_embeddings=False, max_position_embeddings=4096, **shape)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()
        ours = from_pretrained(path, dtype=DTYPE, device=DEVICE)
        built[name] = (hf, ours)
    return built


@pytest.fixture(scope="module")
def results(request):
    table = {}
    yield table
    lines = [
        f"model forward, {DEVICE} {str(DTYPE).removeprefix('torch.')}, {BATCH}x{SEQ} tokens "
        f"(tokens/s of the best round; speed ratio ours/transformers = median over {ROUNDS} paired rounds):"
    ]
    for (name, layout), row in table.items():
        lines.append(
            f"  {name:13s} {layout:6s} ours {row['ours']:9.0f}  transformers {row['transformers']:9.0f}"
            f"  ratio {row['ratio']:.3f}"
        )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("\n" + "\n".join(lines))


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_vs_transformers(benchmark, models, results, name, layout):
    """One round = one forward of each implementation, in alternating order, so load from other
    processes hits both alike; the benchmark row times the pair, extra_info holds each side."""
    hf, ours = models[name]
    ids = torch.randint(0, SHAPES[name]["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    cu = torch.arange(0, BATCH * SEQ + 1, SEQ, dtype=torch.int32, device=DEVICE)
    if layout == "dense":

        def run_ours():
            return ours(ids)
    else:  # transformers has no packed layout; it runs the same tokens as a dense batch
        flat = ids.flatten()

        def run_ours():
            return ours(flat, cu_seqlens=cu, max_seqlen=SEQ)

    def run_hf():
        return hf(input_ids=ids, use_cache=False).logits

    times = {"ours": [], "transformers": []}

    def timed(label, fn):
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        sync()
        times[label].append(time.perf_counter() - start)

    def pair():
        order = [("ours", run_ours), ("transformers", run_hf)]
        if len(times["ours"]) % 2:
            order.reverse()
        for label, fn in order:
            timed(label, fn)

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(pair, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    # The last ROUNDS are the timed rounds (before them, the warm-up; under --benchmark-disable one
    # untimed call alone). Per-round ratios compare runs made back to back, so a busy machine
    # slows both sides of each pair alike; their median is the headline figure. Best rounds
    # (least disturbed) and medians in tokens/s are kept alongside.
    ours_t, hf_t = times["ours"][-ROUNDS:], times["transformers"][-ROUNDS:]
    row = {
        "ratio": statistics.median(h / o for o, h in zip(ours_t, hf_t, strict=True)),
        "ours": BATCH * SEQ / min(ours_t),
        "transformers": BATCH * SEQ / min(hf_t),
    }
    benchmark.extra_info.update(
        {
            "ratio_ours_over_transformers_median_of_pairs": row["ratio"],
            "ours_tokens_per_s_best": row["ours"],
            "transformers_tokens_per_s_best": row["transformers"],
            "ours_tokens_per_s_median": BATCH * SEQ / statistics.median(ours_t),
            "transformers_tokens_per_s_median": BATCH * SEQ / statistics.median(hf_t),
        }
    )
    if CUDA:
        benchmark.extra_info["max_memory_allocated_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    results[(name, layout)] = row
