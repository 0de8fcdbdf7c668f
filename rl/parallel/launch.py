"""`score train --nproc G [--nnodes N --node-rank R --master-addr A --master-port P] ...`: the trainer on
G processes per node under torchrun's elastic agent.

`launch(Launch(nproc=G), ["train", "--config", "run.toml", "--out", "runs/x"])` is exactly
`torchrun --standalone --nproc_per_node=G --max-restarts=0 -m score.rl.cli train --config ...`;
with `nnodes=N, node_rank=R, master_addr=A, master_port=P` it is torchrun's static rendezvous,
`torchrun --nnodes=N --node-rank=R --master-addr=A --master-port=P --nproc_per_node=G ...`, run once
on every node: node R's local ranks become global ranks R*G .. R*G+G-1, node 0 hosts the rendezvous
store on A:P. Started through `torch.distributed.launcher.api.elastic_launch` so that a failure
comes back as an object rather than as log text: when any rank of this node exits non-zero (or is
killed), the agent terminates this node's others (SIGTERM, then SIGKILL) and we print which rank
failed first with its exit code or signal, and return 1. No local rank is left waiting in a
collective for a peer that is gone.

A rank that exits 0 while others are still running is not a failure to the agent, and a node's
agent does not watch the other nodes: their ranks' next collective fails after the process-group
timeout (`init_distributed`'s `timeout_s`) and the job still ends non-zero everywhere.

`python -m score.rl.parallel.launch --nproc G [--nnodes N ...] train ...` is the same from the shell.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """Where the ranks run: `nproc` per node on `nnodes` nodes, this one being `node_rank`, the
    rendezvous at `master_addr:master_port` (node 0's address; only for more than one node)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self):
        for name in ("nproc", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} needs a whole number >= 1, got {value!r}")
        endpoint = (self.node_rank, self.master_addr, self.master_port)
        if self.nnodes == 1:
            if endpoint != (0, None, None):
                raise ValueError("--node-rank, --master-addr and --master-port need --nnodes N > 1")
            return
        if self.master_addr is None or self.master_port is None:
            raise ValueError(f"--nnodes {self.nnodes} needs --node-rank, --master-addr and --master-port (node 0's)")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank!r}")
        if not self.master_addr:
            raise ValueError("--master-addr is empty: give node 0's host name or address")
        if not isinstance(self.master_port, int) or not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master-port must be a port number in [1, 65535], got {self.master_port!r}")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def launch(where: Launch, args: list[str], *, module: str = "score.rl.cli") -> int:
    """Run `python -m <module> <args>` on this node's ranks of `where`; 0 when every one exits 0, else 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not module or not isinstance(module, str):
        raise ValueError(f"module must be a module name, got {module!r}")
    if where.nnodes == 1:  # torchrun --standalone: a free local port
        rendezvous = dict(run_id=str(uuid.uuid4()), rdzv_backend="c10d", rdzv_endpoint="localhost:0")
    else:  # torchrun's default, static: node ranks as given, node 0 hosts the store
        rendezvous = dict(
            run_id="score",
            rdzv_backend="static",
            rdzv_endpoint=f"{where.master_addr}:{where.master_port}",
            rdzv_configs={"rank": where.node_rank},
        )
    config = LaunchConfig(
        min_nodes=where.nnodes,
        max_nodes=where.nnodes,
        nproc_per_node=where.nproc,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        **rendezvous,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", module, *args)
    except ChildFailedError as exc:
        print(describe_failure(exc, where.world_size), file=sys.stderr, flush=True)
        return 1
    return 0


_FLAGS = {"--nproc": "nproc", "--nnodes": "nnodes", "--node-rank": "node_rank"}
_TEXT_FLAGS = {"--master-addr": "master_addr", "--master-port": "master_port"}


def split_launch(argv: list[str]) -> tuple[Launch | None, list[str]]:
    """(the launch flags as a `Launch`, or None when there are none; argv without them): how
    `score train --nproc G ...` becomes `launch(Launch(G), ["train", ...])` while the ranks run the
    same command line minus the launch flags."""
    found, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        if flag not in _FLAGS and flag not in _TEXT_FLAGS:
            rest.append(arg)
            i += 1
            continue
        if flag in found:
            raise ValueError(f"{flag} given twice")
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        i += 1 if "=" in arg else 2
        if flag in _FLAGS or flag == "--master-port":
            if not value.isdigit():
                raise ValueError(f"{flag} needs a whole number, got {value!r}")
            value = int(value)
        found[flag] = value
    if not found:
        return None, rest
    names = {**_FLAGS, **_TEXT_FLAGS}
    return Launch(**{names[flag]: value for flag, value in found.items()}), rest


def describe_failure(exc, world_size: int) -> str:
    """One line per failed rank (global ranks), the first (root-cause) failure first."""
    first_rank, first = exc.get_first_failure()
    lines = [f"score train: rank {first_rank} of {world_size} failed first ({_how(first)}); the job was stopped"]
    for rank, failure in sorted(exc.failures.items()):
        if rank != first_rank:
            lines.append(f"  rank {rank}: {_how(failure)}")
    return "\n".join(lines)


def _how(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}, pid {failure.pid}"
    return f"exit code {failure.exitcode}, pid {failure.pid}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m score.rl.parallel.launch",
        description="Run `score <command> ...` on N processes per node (torchrun), on one node or several.",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank in [0, nnodes)")
    parser.add_argument("--master-addr", default=None, help="node 0's host name or address (nnodes > 1)")
    parser.add_argument("--master-port", type=int, default=None, help="a free port on node 0 (nnodes > 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the score command line, e.g. train --config F")
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.error("give the score command to run, e.g. `train --config run.toml --out runs/x`")
    try:
        where = Launch(ns.nproc, ns.nnodes, ns.node_rank, ns.master_addr, ns.master_port)
    except ValueError as e:
        parser.error(str(e))
    return launch(where, ns.command)


if __name__ == "__main__":
    sys.exit(main())
