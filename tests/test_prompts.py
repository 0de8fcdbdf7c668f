"""Two-attempt prompt ids: token-in-token-out, and equal to what the chat template renders."""

import pytest

from score.model import Tokenizer, load_tokenizer
from score.rl.prompts import (
    CODE_CORRECTION_INSTRUCTION,
    MATH_CORRECTION_INSTRUCTION,
    MATH_SYSTEM_PROMPT,
    PromptBuilder,
)
from tests.helpers.model_fixtures import make_backend_tokenizer, make_chat_tokenizer

QUESTION = "Solve for x: 3x + 5 = 20."
# Replies whose tokenisation does not merge across the reply's edges, so encode(text) is what a model
# could have sampled and the template's rendering of the text is comparable id for id.
REPLIES = ["x = 5. Final Answer: The final answer is $5$. I hope it is correct.", "The answer is 4", "café"]


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def chat_tokenizer(request, tmp_path_factory):
    return load_tokenizer(make_chat_tokenizer(tmp_path_factory.mktemp(request.param), request.param)), request.param


def test_paper_texts():
    assert MATH_SYSTEM_PROMPT.startswith("You are a math expert. When you respond, respond only with the Solution")
    assert MATH_CORRECTION_INSTRUCTION.startswith("There might be an error in the solution above because")
    assert MATH_CORRECTION_INSTRUCTION.endswith('"Final Answer: The final answer is $answer$. I hope it is correct."')
    assert CODE_CORRECTION_INSTRUCTION.endswith("Only output the final correct Python program!")


def test_first_attempt_is_the_chat_template(chat_tokenizer):
    tok, style = chat_tokenizer
    builder = PromptBuilder(tok, chat=True)
    messages = [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": f"Problem:\n{QUESTION}"}]
    assert builder.first_attempt_ids(QUESTION) == tok.apply_chat_template(messages, add_generation_prompt=True)
    turn_end = tok.token_to_id("<|im_end|>" if style == "qwen" else "<|eot_id|>")
    assert turn_end in builder.stop_token_ids and set(tok.eos_token_ids) <= set(builder.stop_token_ids)


@pytest.mark.parametrize("reply", REPLIES)
@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_second_attempt_equals_template_for_user_assistant_user(chat_tokenizer, reply, finish_reason):
    tok, style = chat_tokenizer
    builder = PromptBuilder(tok, chat=True)
    prompt = builder.first_attempt_ids(QUESTION)
    turn_end = tok.token_to_id("<|im_end|>" if style == "qwen" else "<|eot_id|>")
    # "stop": the sampled attempt ends with the end-of-turn token; "length": it was cut before it.
    attempt1 = tok.encode(reply) + ([turn_end] if finish_reason == "stop" else [])
    ids, (start, end) = builder.second_attempt_ids(prompt, attempt1, finish_reason)

    expected = tok.apply_chat_template(
        [
            {"role": "system", "content": MATH_SYSTEM_PROMPT},
            {"role": "user", "content": f"Problem:\n{QUESTION}"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": MATH_CORRECTION_INSTRUCTION},
        ],
        add_generation_prompt=True,
    )
    assert ids == expected
    assert ids[: len(prompt)] == prompt and ids[len(prompt) : len(prompt) + len(attempt1)] == attempt1
    assert start == len(prompt) + len(attempt1) and end == len(ids)
    segment_text = tok.decode(ids[start:end])
    assert MATH_CORRECTION_INSTRUCTION in segment_text
    # The end-of-turn token appears exactly once between the attempt and the instruction.
    closing = ids[len(prompt) : start + 1]
    assert closing.count(turn_end) == 1


def test_attempt_ending_on_another_stop_token_keeps_it_and_closes_the_turn(tmp_path):
    tok = load_tokenizer(make_chat_tokenizer(tmp_path, "qwen"))
    builder = PromptBuilder(tok, chat=True)
    prompt = builder.first_attempt_ids(QUESTION)
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    attempt1 = tok.encode("x = 5") + [endoftext]
    ids, (start, end) = builder.second_attempt_ids(prompt, attempt1, "stop")
    assert ids[len(prompt) : start] == attempt1  # never rewritten
    assert ids[start] == im_end and ids[start:end] == builder.instruction_ids


def test_ids_are_never_re_tokenised(tmp_path):
    # A sampled attempt need not be the canonical tokenisation of its text: keep it id for id.
    tok = load_tokenizer(make_chat_tokenizer(tmp_path, "qwen"))
    builder = PromptBuilder(tok, chat=True)
    prompt = builder.first_attempt_ids(QUESTION)
    odd = [tok.token_to_id(c) for c in "answer"]  # one token per character
    assert odd != tok.encode("answer")
    ids, (start, _) = builder.second_attempt_ids(prompt, odd, "length")
    assert ids[len(prompt) : start] == odd


def test_base_model_plain_text():
    backend = make_backend_tokenizer(["<s>", "</s>"])
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    builder = PromptBuilder(tok, chat=False, correction_instruction=CODE_CORRECTION_INSTRUCTION)
    prompt = builder.first_attempt_ids(QUESTION)
    assert prompt[0] == tok.bos_token_id
    assert builder.stop_token_ids == [tok.eos_token_id]
    assert tok.decode(prompt[1:]) == f"{MATH_SYSTEM_PROMPT}\n\nProblem:\n{QUESTION}\n\nSolution:\n"
    attempt1 = tok.encode("x = 4") + [tok.eos_token_id]
    for finish_reason, a1 in (("stop", attempt1), ("length", attempt1[:-1])):
        ids, (start, end) = builder.second_attempt_ids(prompt, a1, finish_reason)
        assert ids == prompt + a1 + tok.encode(f"\n\n{CODE_CORRECTION_INSTRUCTION}\n\nSolution:\n")
        assert (start, end) == (len(prompt) + len(a1), len(ids))
    no_system = PromptBuilder(tok, chat=False, system_prompt=None)
    assert tok.decode(no_system.first_attempt_ids(QUESTION)[1:]) == f"Problem:\n{QUESTION}\n\nSolution:\n"


def test_system_prompt_in_user_turn(tmp_path):
    tok = load_tokenizer(make_chat_tokenizer(tmp_path, "qwen"))
    builder = PromptBuilder(tok, chat=True, system_role=False)
    assert builder.first_attempt_messages(QUESTION) == [
        {"role": "user", "content": f"{MATH_SYSTEM_PROMPT}\n\nProblem:\n{QUESTION}"}
    ]


def test_errors(tmp_path):
    backend = make_backend_tokenizer(["<s>", "</s>"])
    plain = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="chat=True needs a tokenizer with a chat_template"):
        PromptBuilder(plain, chat=True)
    builder = PromptBuilder(plain, chat=False)
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        builder.second_attempt_ids([1, 2], [3], "eos")
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        builder.first_attempt_ids("  ")
    with pytest.raises(ValueError, match="correction_instruction must be a non-empty string"):
        PromptBuilder(plain, chat=False, correction_instruction="")
