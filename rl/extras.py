"""What the `score` command needs beyond the core install.

`pip install score-rl` installs what score.kernels (and score.kernels.hf) need; the trainer, the
evaluation, the demo and the rest of the command line also need pyproject's `train` extra
(`.[test]` includes it). The list is read from the installed metadata, so it is the extra itself.
"""

from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTION = "score-rl"


def missing_train_packages() -> list[str]:
    """The `train` extra's distributions that are not installed; [] where score-rl's metadata is
    absent (a source tree used without installing it)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requires:
        marker = requirement.partition(";")[2].replace("'", '"')
        if 'extra == "train"' not in marker:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def train_extra_error() -> str | None:
    """The one-line error for a command line run without the `train` extra, else None."""
    missing = missing_train_packages()
    if not missing:
        return None
    return (
        f"the score command needs the trainer's packages, and {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'score-rl[train]'"
    )
