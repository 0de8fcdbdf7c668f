"""Training checkpoints: plain (one process) and sharded (FSDP2, DCP) formats under one store."""

from .plain import load_checkpoint, save_checkpoint
from .sharded import export_consolidated, full_state_dict, load_sharded, save_sharded
from .store import UnreadableCheckpoint, checkpoint_dir, latest_checkpoint, list_checkpoints, set_aside

__all__ = [
    "UnreadableCheckpoint",
    "checkpoint_dir",
    "export_consolidated",
    "full_state_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_sharded",
    "save_checkpoint",
    "save_sharded",
    "set_aside",
]
