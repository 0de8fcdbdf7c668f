"""Rewards: answer checking for math, sandboxed unit tests for code, and the batch front-end."""

from .batch import BatchReward
from .code_problems import load_humaneval, load_mbpp_jsonl
from .code_reward import build_program, code_reward, code_rewards, extract_program
from .math_reward import MathGrader, extract_final_answer

__all__ = [
    "BatchReward",
    "MathGrader",
    "build_program",
    "code_reward",
    "code_rewards",
    "extract_final_answer",
    "extract_program",
    "load_humaneval",
    "load_mbpp_jsonl",
]
