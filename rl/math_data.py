"""`score data math`: the paper's MATH splits from the user's own copies of MATH and MATH500.

Training: MATH train plus the MATH test problems that are not in MATH500 (the paper trains on
these); evaluation: MATH500. MATH500 rows are matched to MATH test rows by problem text (whitespace
collapsed). Every MATH500 problem must be found, or the recipe stops naming the missing ones. With
the full MATH (7,500 train, 5,000 test) the training file has 12,000 problems.

Inputs take the forms of `data.train`: JSONL, a Parquet file or folder, `hf:NAME[:CONFIG][@SPLIT]`,
or a bare Hub dataset id (`hendrycks/competition_math`, `HuggingFaceH4/MATH-500`), read with the
split `train` (--train) or `test` (--test, --math500) unless the source names one.
"""

from __future__ import annotations

import re
from pathlib import Path

from score.model.files import write_jsonl

from .data import is_parquet_source, open_hf_dataset, parquet_tables, parse_hf_source, read_jsonl_objects

FULL_MATH = {"train": 7500, "test": 5000, "math500": 500}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_rows(source: str, split: str) -> list[tuple[str, dict]]:
    """(where, row) of every record of a source (file lines or dataset rows), as plain dicts."""
    path = Path(source)
    if not source.startswith("hf:") and not path.exists() and _HUB_ID.match(source):
        source = f"hf:{source}@{split}"
    if source.startswith("hf:"):
        name, config, named_split = parse_hf_source(source)
        dataset = open_hf_dataset(name, config, named_split if "@" in source else split)
        return [(f"{source} row {i}", dict(row)) for i, row in enumerate(dataset)]
    if is_parquet_source(source):
        return [(f"{file} row {i}", row) for file, table in parquet_tables(path) for i, row in enumerate(table)]
    return [(where, row) for _, where, row in read_jsonl_objects(path, "MATH file")]


def _key(text: str) -> str:
    return " ".join(text.split())


def _problems(rows: list[tuple[str, dict]], source: str, flag: str) -> list[str]:
    if not rows:
        raise ValueError(f"{flag} {source}: no problems (it is empty)")
    for where, row in rows:
        if not isinstance(row.get("problem"), str) or not isinstance(row.get("solution"), str):
            raise ValueError(f"{where}: needs string 'problem' and 'solution' fields (MATH layout)")
    return [_key(row["problem"]) for _, row in rows]


def build_math_splits(train: str, test: str, math500: str, out_dir: str | Path) -> dict:
    """Write OUT/math_train.jsonl and OUT/math500.jsonl; returns the counts."""
    return write_math_splits(math_splits(train, test, math500), out_dir)


def write_math_splits(splits: tuple[list, list, dict], out_dir: str | Path) -> dict:
    """Write what `math_splits` made; returns its counts."""
    training, eval_rows, counts = splits
    out = Path(out_dir)
    write_jsonl(out / "math_train.jsonl", training)
    write_jsonl(out / "math500.jsonl", eval_rows)
    return counts


def math_splits(train: str, test: str, math500: str) -> tuple[list[dict], list[dict], dict]:
    """(training rows, MATH500 rows, counts), every input read and checked; nothing is written."""
    train_rows, test_rows, eval_rows = read_rows(train, "train"), read_rows(test, "test"), read_rows(math500, "test")
    _problems(train_rows, train, "--train")
    test_keys = _problems(test_rows, test, "--test")
    eval_keys = _problems(eval_rows, math500, "--math500")
    first: dict[str, str] = {}
    for (where, _), k in zip(eval_rows, eval_keys, strict=True):
        if k in first:  # MATH500 holds 500 distinct problems: a repeated one would count twice
            raise ValueError(f"{where}: the same problem as {first[k]} (matched by problem text)")
        first[k] = where
    in_test = set(test_keys)
    missing = [i for i, k in enumerate(eval_keys) if k not in in_test]
    if missing:
        shown = ", ".join(f"{eval_rows[i][0]} ({eval_rows[i][1]['problem'][:40]!r})" for i in missing[:5])
        raise ValueError(
            f"{math500}: {len(missing)} of {len(eval_rows)} MATH500 problems are not in {test} "
            f"(matched by problem text): {shown}{' ...' if len(missing) > 5 else ''}"
        )
    held_out = set(eval_keys)
    kept_test = [row for (_, row), k in zip(test_rows, test_keys, strict=True) if k not in held_out]
    training = [row for _, row in train_rows] + kept_test
    counts = {
        "train": len(train_rows),
        "test": len(test_rows),
        "test_kept": len(kept_test),
        "math500": len(eval_rows),
        "training": len(training),
    }
    full = all(counts[k] == n for k, n in FULL_MATH.items())
    if full and counts["training"] != 12000:
        raise ValueError(f"the full MATH should give 12,000 training problems, got {counts['training']}")
    return training, [row for _, row in eval_rows], counts
