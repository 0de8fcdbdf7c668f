"""Model folders by Hugging Face Hub id: `ORG/NAME` or `ORG/NAME@REVISION` becomes a local snapshot.

A local folder is used as it is. Anything else that looks like a repo id is resolved through
`huggingface_hub.snapshot_download`, which keeps its cache (`HF_HOME`, `HF_HUB_CACHE`), honours
`HF_HUB_OFFLINE=1` (the cached snapshot, no network) and finds the token where `huggingface-cli
login` or `HF_TOKEN` put it. Only the files the loader reads are fetched: config.json, the
safetensors weights and their index, the tokenizer files, generation_config.json and a chat template.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_revision(spec: str) -> tuple[str, str | None]:
    """("ORG/NAME", "REVISION" or None) of `ORG/NAME[@REVISION]`."""
    name, _, revision = spec.partition("@")
    return name, revision or None


def resolve_model_path(spec: str | os.PathLike) -> str:
    """A local folder for `spec`: the folder itself, or the Hub snapshot of a repo id (fetched or cached)."""
    text = os.fspath(spec)
    if Path(text).exists():
        return text
    repo_id, revision = split_revision(text)
    missing = f"no folder {os.path.abspath(text)}"
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"model {text!r}: {missing}, and not a Hub id (ORG/NAME[@REVISION])")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise ValueError(
            f"model {text!r}: loading by Hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from e
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the Hub cache" if offline else "it could not be fetched"
        cache = os.environ.get("HF_HUB_CACHE") or "default cache"
        raise ValueError(f"model {text!r}: {missing}; as a Hub id, {why} ({cache})") from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise ValueError(
            f"model {text!r}: {missing}; as a Hub id, {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    except OSError as e:  # network errors of the underlying HTTP client
        raise ValueError(f"model {text!r}: {missing}; as a Hub id, the Hub could not be reached ({e})") from None
