"""Agreement between the processes of a run: rank 0's verdict raised on every rank.

Used by the trainer, the data-parallel seam (parallel/) and the sharded checkpoint store
(checkpoints/); it lives beside them so neither package imports the other for it.
"""

from __future__ import annotations

import torch.distributed as dist


def raise_on_all_ranks(message: str | None) -> None:
    """Rank 0's verdict on every rank: ValueError(message) everywhere when it is not None, so no rank
    is left waiting in a collective for a peer that gave up (a no-op check without a process group)."""
    box = [message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ValueError(box[0])
