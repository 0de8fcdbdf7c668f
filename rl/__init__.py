"""SCoRe: two-attempt self-correction RL (data, prompts, rewards, sandbox, rollout, trainer, eval, CLI)."""

from .config import ConfigError, RunConfig, config_from_dict, describe_config, load_config
from .rewards import build_program, code_reward, code_rewards, extract_program, load_humaneval, load_mbpp_jsonl
from .rewards.sandbox import ExecResult, SandboxError, SandboxPool, SandboxUnavailableError, execute, run_batch

__all__ = [
    "ConfigError",
    "ExecResult",
    "RunConfig",
    "SandboxError",
    "SandboxPool",
    "SandboxUnavailableError",
    "build_program",
    "code_reward",
    "code_rewards",
    "config_from_dict",
    "describe_config",
    "execute",
    "extract_program",
    "load_config",
    "load_humaneval",
    "load_mbpp_jsonl",
    "run_batch",
]
