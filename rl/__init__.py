"""SCoRe: two-attempt self-correction RL (data, prompts, rewards, sandbox, rollout, trainer, eval, CLI)."""
