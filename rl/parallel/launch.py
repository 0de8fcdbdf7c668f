"""`score train --nproc G ...`: run the trainer on G local processes under torchrun's elastic agent.

`launch(G, ["train", "--config", "run.yaml", "--out", "runs/x"])` is exactly
`torchrun --standalone --nproc_per_node=G --max-restarts=0 -m score.rl.cli train --config ...`,
started through `torch.distributed.launcher.api.elastic_launch` so that the failure comes back as
an object rather than as log text: when any rank exits non-zero (or is killed), the agent
terminates the others (SIGTERM, then SIGKILL) and we print which rank failed first with its exit
code or signal, and return 1. No rank is left waiting in a collective for a peer that is gone.

A rank that exits 0 while others are still running is not a failure to the agent; the
survivors' next collective then fails after the process-group timeout (`init_distributed`'s
`timeout_s`) and the job still ends non-zero.

`python -m score.rl.parallel.launch --nproc G train ...` is the same from the shell. Not done: multi-node
rendezvous (use torchrun's own --nnodes/--rdzv-* flags directly for that).
"""

from __future__ import annotations

import argparse
import sys
import uuid


def launch(nproc: int, args: list[str], *, module: str = "score.rl.cli") -> int:
    """Run `python -m <module> <args>` on `nproc` local ranks; 0 when every rank exits 0, else 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if not module or not isinstance(module, str):
        raise ValueError(f"module must be a module name, got {module!r}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free local port
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", module, *args)
    except ChildFailedError as exc:
        print(describe_failure(exc, nproc), file=sys.stderr, flush=True)
        return 1
    return 0


def split_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """(`--nproc` value or None, argv without it): how `score train --nproc G ...` becomes
    `launch(G, ["train", ...])` while the ranks run the same command line minus `--nproc`."""
    nproc, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc" or arg.startswith("--nproc="):
            if nproc is not None:
                raise ValueError("--nproc given twice")
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--nproc needs a whole number >= 1, got {value!r}")
            nproc = int(value)
            continue
        rest.append(arg)
        i += 1
    return nproc, rest


def describe_failure(exc, nproc: int) -> str:
    """One line per failed rank, the first (root-cause) failure first."""
    first_rank, first = exc.get_first_failure()
    lines = [f"score train: rank {first_rank} of {nproc} failed first ({_how(first)}); the job was stopped"]
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
        description="Run `score <command> ...` on N local processes (torchrun).",
    )
    parser.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this node")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the score command line, e.g. train --config F")
    ns = parser.parse_args(argv)
    if ns.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {ns.nproc}")
    if not ns.command:
        parser.error("give the score command to run, e.g. `train --config run.yaml --out runs/x`")
    return launch(ns.nproc, ns.command)


if __name__ == "__main__":
    sys.exit(main())
