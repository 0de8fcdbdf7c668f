"""`score ARGS` in a process that can be caught at an exact moment, for the crash tests.

    python tests/helpers/stop_at.py [--stop-at GLOB[@N] | --stop-after-step] [--trace FILE] [--parity-reward] -- ARGS...

`--stop-at`: the N-th time (default 1) a path matching GLOB is about to be renamed into place (every
whole-file and whole-folder write ends with that rename: score.model.files), the process stops
itself with SIGSTOP, so the test can SIGKILL it with the temporary written and the target not yet
there. `--stop-after-step`: the process stops itself the same way once its first step is logged
(metrics.jsonl holds its line), however fast the steps after it would follow. `--trace FILE`
appends every such path to FILE instead (what bench/kills.py kills at).
`--parity-reward`: train and sft runs are rewarded by tests.helpers.tiny_run.ParityReward, which
an untrained model can earn (so score sft has traces to train on).
"""

import fnmatch
import os
import signal
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # tests.helpers, after site-packages


def main(argv: list[str]) -> int:
    split = argv.index("--")
    options, args = argv[:split], argv[split + 1 :]
    if "--stop-at" in options:
        spec = options[options.index("--stop-at") + 1]
        pattern, _, nth = spec.partition("@")
        stop_before_rename(pattern, int(nth or 1))
    if "--stop-after-step" in options:
        stop_after_first_step()
    if "--trace" in options:
        trace_renames(options[options.index("--trace") + 1])
    if "--parity-reward" in options:
        import score.rl.sft
        import score.rl.trainer
        from tests.helpers.tiny_run import ParityReward

        score.rl.sft.make_reward = score.rl.trainer.make_reward = lambda cfg: ParityReward()
    from score.rl.cli import main as score

    return score(args)


def stop_before_rename(pattern: str, nth: int) -> None:
    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(dst), pattern):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGSTOP)
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def stop_after_first_step() -> None:
    from score.rl.run_log import MetricsLogger

    real = MetricsLogger.log

    def log(self, step, metrics):
        logged = real(self, step, metrics)
        MetricsLogger.log = real  # once
        os.kill(os.getpid(), signal.SIGSTOP)
        return logged

    MetricsLogger.log = log


def trace_renames(file: str) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        with open(file, "a", encoding="utf-8") as f:
            f.write(os.fspath(dst) + "\n")
        return real(src, dst, *args, **kwargs)

    os.replace = replace


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
