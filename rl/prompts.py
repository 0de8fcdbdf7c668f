"""The paper's prompts, and two-attempt contexts built from token ids (token-in-token-out).

Attempt 1 sees the problem; attempt 2 sees `prompt_ids + attempt1_ids + instruction_ids`, where the
attempt-1 ids are exactly the sampled ones (never decoded and re-encoded: re-tokenising can change
the ids, which would make the update off-policy and the attempt-1 KV cache unusable).

Chat models (`chat=True`): the system prompt and the problem are rendered with the tokenizer's chat
template. The instruction segment is whatever the template renders after an assistant reply and
before attempt 2's generation, for the turns [system, user, assistant, user]: for a Qwen-style
template `<|im_end|>\\n<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n`. It is
computed once, by rendering a conversation whose reply is a sentinel string and cutting after it.
How attempt 1 ended decides the first token:
- it ended with the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`): that token is
  attempt 1's own last token, so the segment starts after it;
- it was cut by `max_tokens` (finish_reason "length"), or stopped on another token: the attempt is
  kept as it is and the segment starts with the template's end-of-turn token, closing the turn the
  way the template would, so attempt 2 sees a well-formed conversation whose first reply ended early.
The ids then equal `apply_chat_template([system, user, assistant(y1), user(instruction)],
add_generation_prompt=True)` whenever tokenising y1's text gives y1's ids back (tests check this).
Templates that rewrite history (e.g. Qwen3 dropping `<think>` blocks from past replies) are not
imitated: the model's own attempt 1 is kept verbatim, as the public SCoRe reproductions chose.

Base models (`chat=False`): plain text, `{system}\\n\\nProblem:\\n{question}\\n\\nSolution:\\n` (BOS
first when the tokenizer has one), and the instruction segment `\\n\\n{instruction}\\n\\nSolution:\\n`
after attempt 1 whatever its ending (an EOS attempt 1 sampled stays in the context: it is one of
the policy's actions).
"""

from __future__ import annotations

from collections.abc import Sequence

# The SCoRe paper's prompts, verbatim (Kumar et al. 2024, appendix C).
MATH_SYSTEM_PROMPT = (
    "You are a math expert. When you respond, respond only with the Solution of the final Problem, thinking "
    "step by step. At the end of the Solution, when you give your final answer, write it in the form "
    '"Final Answer: The final answer is $answer$. I hope it is correct."'
)
MATH_CORRECTION_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. Please "
    "correct the error, if any, and rewrite the solution. Only output the final solution! At the end of the "
    'Solution, when you give your final answer, write it in the form "Final Answer: The final answer is '
    '$answer$. I hope it is correct."'
)
# The same two, asking for an answer format a small model can keep: one integer.
INTEGER_SYSTEM_PROMPT = (
    "You are a math expert. Solve the problem step by step. At the end, write your final answer in the form "
    '"The final answer is N." where N is a number.'
)
INTEGER_CORRECTION_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. At the end, write your final answer in the "
    'form "The final answer is N." where N is a number.'
)
CODE_CORRECTION_INSTRUCTION = (
    "There might be an error in the code above because of lack of understanding of the question. Please "
    "correct the error, if any, and rewrite the solution. Only output the final correct Python program!"
)
# Self-Refine's feedback turn (Madaan et al. 2023), asked between attempt 1 and the rewrite.
CRITIQUE_INSTRUCTION = (
    "Review the solution above step by step. Point out every error you find in it, or say that it is "
    "correct. Do not write a new solution yet."
)

QUESTION_TEMPLATE = "Problem:\n{question}"
BASE_ANSWER_CUE = "\n\nSolution:\n"
FINISH_REASONS = ("stop", "length")

_SENTINEL = "SCORE_ATTEMPT_ONE_SENTINEL_7f3a"


class PromptBuilder:
    """Token ids of attempt-1 prompts and attempt-2 contexts for one tokenizer and prompt setting.

    `system_prompt` may be None (no system turn / no preamble). With `system_role=False` a chat
    model gets the system prompt at the top of the user turn instead (templates without a system role).
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat: bool,
        system_prompt: str | None = MATH_SYSTEM_PROMPT,
        correction_instruction: str = MATH_CORRECTION_INSTRUCTION,
        system_role: bool = True,
    ):
        if not isinstance(chat, bool):
            raise ValueError(f"chat must be a bool, got {chat!r}")
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise ValueError("system_prompt must be a non-empty string or None")
        if not isinstance(correction_instruction, str) or not correction_instruction.strip():
            raise ValueError("correction_instruction must be a non-empty string")
        if chat and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True needs a tokenizer with a chat_template; use chat=False for base models")
        self.tokenizer = tokenizer  # anything with score.model.Tokenizer's encode/apply_chat_template/bos_token_id
        self.chat = chat
        self.system_prompt = system_prompt
        self.correction_instruction = correction_instruction
        self.system_role = system_role
        if chat:
            self.instruction_ids, self.turn_end_id = self._chat_instruction_segment()
        else:
            self.instruction_ids = list(tokenizer.encode(f"\n\n{correction_instruction}{BASE_ANSWER_CUE}"))
            self.turn_end_id = None

    def with_instruction(self, instruction: str) -> PromptBuilder:
        """The same prompts with another user turn between attempts (Self-Refine's critique/refine turns)."""
        return PromptBuilder(
            self.tokenizer,
            chat=self.chat,
            system_prompt=self.system_prompt,
            correction_instruction=instruction,
            system_role=self.system_role,
        )

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an attempt: the tokenizer's EOS ids plus, for chat, the template's end-of-turn token."""
        ids = [int(i) for i in (getattr(self.tokenizer, "eos_token_ids", None) or [])]
        if self.turn_end_id is not None and self.turn_end_id not in ids:
            ids.append(self.turn_end_id)
        return ids

    # --- attempt 1 ---------------------------------------------------------------------------------
    def first_attempt_messages(self, question: str) -> list[dict]:
        user = QUESTION_TEMPLATE.format(question=question)
        if self.system_prompt is None:
            return [{"role": "user", "content": user}]
        if self.system_role:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        return [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]

    def first_attempt_text(self, question: str) -> str:
        _check_question(question)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                self.first_attempt_messages(question), add_generation_prompt=True, tokenize=False
            )
        preamble = f"{self.system_prompt}\n\n" if self.system_prompt is not None else ""
        return preamble + QUESTION_TEMPLATE.format(question=question) + BASE_ANSWER_CUE

    def first_attempt_ids(self, question: str) -> list[int]:
        text = self.first_attempt_text(question)
        ids = list(self.tokenizer.encode(text))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if not self.chat and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # chat templates write their own BOS; plain text gets it here
        return ids

    # --- attempt 2 ---------------------------------------------------------------------------------
    def second_attempt_ids(
        self, first_attempt_prompt_ids: Sequence[int], attempt1_ids: Sequence[int], finish_reason: str
    ) -> tuple[list[int], tuple[int, int]]:
        """(context ids for attempt 2, (start, end) of the instruction segment within them)."""
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
        if len(first_attempt_prompt_ids) == 0:
            raise ValueError("first_attempt_prompt_ids is empty")
        prompt = [int(t) for t in first_attempt_prompt_ids]
        attempt1 = [int(t) for t in attempt1_ids]
        segment = self.instruction_ids
        if self.turn_end_id is not None and finish_reason == "stop" and attempt1 and attempt1[-1] == self.turn_end_id:
            segment = segment[1:]  # attempt 1 already closed its turn with the template's own token
        start = len(prompt) + len(attempt1)
        return prompt + attempt1 + segment, (start, start + len(segment))

    def _chat_instruction_segment(self) -> tuple[list[int], int | None]:
        tok = self.tokenizer
        first = self.first_attempt_messages("What is 1 + 1?")
        prompt_text = tok.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
        full_text = tok.apply_chat_template(
            first
            + [{"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": self.correction_instruction}],
            add_generation_prompt=True,
            tokenize=False,
        )
        if not full_text.startswith(prompt_text):
            raise NotImplementedError(
                "the chat template renders the first turn differently once a reply follows it (it rewrites "
                "the generation prompt in history), so attempt 2 cannot extend attempt 1's ids token-in-token-out"
            )
        at = full_text.find(_SENTINEL, len(prompt_text))
        if at < 0:
            raise ValueError("the chat template drops the assistant reply from the history")
        after_reply = full_text[at + len(_SENTINEL) :]
        segment = list(tok.encode(after_reply))
        if not segment or self.correction_instruction.strip() not in after_reply:
            raise ValueError("the chat template does not render the correction instruction after the reply")
        # segment[0] is the first token the template writes after a reply: its end-of-turn token.
        return segment, segment[0]


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
