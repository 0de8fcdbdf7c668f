"""Problem sets for training and evaluation: JSONL files and (optionally) Hugging Face datasets.

A record becomes a `Problem(id, question, answer, meta)`. The answer comes either from an explicit
field (`answer_key`) or, MATH style, from the last `\\boxed{...}` of a worked solution
(`solution_key`), with nested braces handled. Every error names the file and the 1-based line
(or the dataset row) and says what was expected.

Not done here: prompt rendering (see `prompts.py`) and answer checking (see `rewards/math_reward.py`).
Code problems (HumanEval/MBPP) have their own loaders in `rewards/code_problems.py`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BOXED_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Problem:
    """One problem: `answer` is the reference the reward compares against (a LaTeX string for MATH)."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)
    where: str = field(
        default="", compare=False
    )  # where it was read ("FILE line N", "SOURCE row N"), for error messages


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included.

    `\\boxed 5` (argument without braces, a single token) is accepted as TeX does. Returns None when
    there is no box or the last one is never closed.
    """
    if not isinstance(text, str):
        raise ValueError(f"last_boxed expects a str, got {type(text).__name__}")
    start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
    pos = start + len(cmd)
    if pos < len(text) and text[pos] == " ":
        # `\boxed 5`: TeX takes the next token as the argument.
        rest = text[pos:].split(maxsplit=1)
        if not rest:
            return None
        return rest[0].rstrip("$.") or None
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (`\{`, `\}`, `\\`) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
        i += 1
    return None


def problem_from_record(
    record: Any,
    where: str,
    *,
    question_key: str = "problem",
    answer_key: str | None = None,
    solution_key: str | None = "solution",
    id_key: str | None = None,
    default_id: str,
) -> Problem:
    """Map one record (a dict) to a Problem; `where` ("file.jsonl line 7") prefixes every error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = _required_str(record, question_key, where, "question_key")
    if answer_key is not None:
        if answer_key not in record:
            raise ValueError(
                f"{where}: missing answer field {answer_key!r} (answer_key); keys present: {sorted(record)}"
            )
        value = record[answer_key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(
                f"{where}: answer field {answer_key!r} must be a string or number, got {type(value).__name__}"
            )
        answer = str(value).strip()
        if not answer:
            raise ValueError(f"{where}: answer field {answer_key!r} is empty")
    elif solution_key is not None:
        solution = _required_str(record, solution_key, where, "solution_key")
        answer = last_boxed(solution)
        if answer is None or not answer.strip():
            raise ValueError(f"{where}: solution field {solution_key!r} has no complete \\boxed{{...}} answer")
        answer = answer.strip()
    else:
        raise ValueError("either answer_key or solution_key must be given to know where the reference answer is")
    if id_key is not None:
        if id_key not in record:
            raise ValueError(f"{where}: missing id field {id_key!r} (id_key); keys present: {sorted(record)}")
        problem_id = str(record[id_key])
    else:
        problem_id = default_id
    used = {question_key, answer_key, id_key}
    meta = {k: v for k, v in record.items() if k not in used}
    return Problem(id=problem_id, question=question, answer=answer, meta=meta)


def _required_str(record: dict, key: str, where: str, arg: str) -> str:
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} ({arg}); keys present: {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def read_jsonl_objects(path, what: str = "JSONL file") -> Iterator[tuple[int, str, dict]]:
    """Yield `(line number, "FILE line N", object)` for every non-blank line of a JSONL file.

    The one JSONL reader of score.rl: blank lines are skipped, and a missing file, invalid JSON or a
    line that is not a JSON object is an error naming the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record


def load_jsonl(
    path: str | Path,
    *,
    question_key: str = "problem",
    answer_key: str | None = None,
    solution_key: str | None = "solution",
    id_key: str | None = None,
) -> list[Problem]:
    """Read one problem per non-blank line. Ids default to `<file name>:<line>`; ids must be unique."""
    path = Path(path)
    keys = dict(question_key=question_key, answer_key=answer_key, solution_key=solution_key, id_key=id_key)
    entries = (
        (lineno, where, record, f"{path.name}:{lineno}")
        for lineno, where, record in read_jsonl_objects(path, "problem file")
    )
    return _unique_problems(entries, str(path), "on line", "file", keys)


def problems_from_records(
    records: Iterable[Any],
    source: str,
    *,
    question_key: str = "problem",
    answer_key: str | None = None,
    solution_key: str | None = "solution",
    id_key: str | None = None,
) -> list[Problem]:
    """Map in-memory records (dataset rows) to Problems; errors name `source` and the 0-based row."""
    keys = dict(question_key=question_key, answer_key=answer_key, solution_key=solution_key, id_key=id_key)
    entries = (
        (
            row,
            f"{source} row {row}",
            dict(record) if not isinstance(record, dict) and hasattr(record, "keys") else record,
            f"{source}:{row}",
        )
        for row, record in enumerate(records)
    )
    return _unique_problems(entries, source, "at row", "dataset", keys)


def _unique_problems(entries, source: str, position_word: str, container: str, keys: dict) -> list[Problem]:
    """Problems from `(position, where, record, default id)` entries; ids must be unique, and none is an error."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for position, where, record, default_id in entries:
        problem = problem_from_record(record, where, default_id=default_id, **keys)
        problem = dataclasses.replace(problem, where=where)  # named by the checks before training
        if problem.id in seen:
            raise ValueError(f"{where}: duplicate problem id {problem.id!r} (first {position_word} {seen[problem.id]})")
        seen[problem.id] = position
        problems.append(problem)
    if not problems:
        raise ValueError(f"{source}: no problems (the {container} is empty)")
    return problems


def open_hf_dataset(name: str, config: str | None, split: str):
    """One split through `datasets`: a dataset saved with `save_to_disk` (a folder), or a Hub name
    (its cache, HF_DATASETS_OFFLINE). `datasets` is optional: without it, ImportError says how to get it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "hf: data needs the optional 'datasets' package (pip install 'score-rl[data]'); "
            "alternatively export the split to JSONL or Parquet"
        ) from e
    saved = Path(name)
    if saved.is_dir() and ((saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file()):
        dataset = datasets.load_from_disk(str(saved))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name}: no split {split!r} (splits: {', '.join(dataset)})")
            dataset = dataset[split]
        return dataset
    return datasets.load_dataset(name, config, split=split)


def load_hf_dataset(
    name: str,
    *,
    split: str = "train",
    config: str | None = None,
    question_key: str = "problem",
    answer_key: str | None = None,
    solution_key: str | None = "solution",
    id_key: str | None = None,
) -> list[Problem]:
    """Load a split through the `datasets` package (a local path or a hub name it can reach).

    `datasets` is an optional dependency: without it this raises ImportError saying how to install it.
    """
    dataset = open_hf_dataset(name, config, split)
    return problems_from_records(
        dataset,
        f"{name}[{split}]",
        question_key=question_key,
        answer_key=answer_key,
        solution_key=solution_key,
        id_key=id_key,
    )


def is_parquet_source(source: str) -> bool:
    """A `.parquet` file, or a folder holding some."""
    path = Path(source)
    return source.endswith(".parquet") or (path.is_dir() and any(path.glob("*.parquet")))


def parquet_tables(path: str | Path) -> Iterator[tuple[Path, list[dict]]]:
    """(file, rows) of a Parquet file or of each file of a folder of them, through `pyarrow` (the data
    extra); a file that is not Parquet is an error naming it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install 'score-rl[data]')") from None
    for file in parquet_files(path):
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid and friends for a file that is not Parquet
            raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
        yield file, rows


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a source: the file itself, or a folder's `*.parquet` in name order."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: a folder with no .parquet files")
    return files


def load_parquet(
    path: str | Path,
    *,
    question_key: str = "problem",
    answer_key: str | None = None,
    solution_key: str | None = "solution",
    id_key: str | None = None,
) -> list[Problem]:
    """Problems from a Parquet file or a folder of them (`pyarrow`); errors name the file and 0-based row."""
    keys = dict(question_key=question_key, answer_key=answer_key, solution_key=solution_key, id_key=id_key)
    problems = []
    for file, rows in parquet_tables(path):
        problems += problems_from_records(rows, str(file), **keys)
    seen: dict[str, str] = {}
    for p in problems:
        if p.id in seen:
            raise ValueError(f"{p.where}: duplicate problem id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = p.where
    return problems


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """(name, config, split) of `hf:NAME[:CONFIG][@SPLIT]` (split defaults to train)."""
    body = source.removeprefix("hf:")
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"{source!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or "train"
