"""FSDP2 training on 2 CPU ranks (gloo) against 1 rank and a plain process; DCP resume across world
sizes; consolidated HF export; generation on unsharded weights; the launcher on a failing rank.

The ranks run tests/helpers/dist_worker.py under score.rl.parallel.launch (torchrun's agent). One 2-rank run and one
1-rank run are shared by the tests of this module (the process start-up dominates their cost).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from score.rl.checkpoints import latest_checkpoint, load_sharded
from score.rl.parallel import distributed as D
from tests.helpers import dist_worker as W

ROOT = Path(__file__).resolve().parents[1]  # the rank program is tests.helpers.dist_worker, imported from here
STEPS, SAVE_AT = 4, 2
TOL = 1e-5


def _rank_program(nproc: int, args, **where) -> list[str]:
    """The launcher of this node's `nproc` ranks of tests.helpers.dist_worker, as a command line."""
    code = (
        "import sys; from score.rl.parallel.launch import Launch, launch; "
        f"sys.exit(launch(Launch({nproc}, **{where!r}), {list(args)!r}, module='tests.helpers.dist_worker'))"
    )
    return [sys.executable, "-c", code]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


def _launch(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_rank_program(nproc, args), env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_nodes(nnodes: int, *args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """The job on `nnodes` "nodes" of one rank each: one launcher process per node, all on this host,
    meeting at node 0's rendezvous on 127.0.0.1 (torchrun's static rendezvous, as across machines)."""
    where = dict(nnodes=nnodes, master_addr="127.0.0.1", master_port=_free_port())
    return _run_nodes([_rank_program(1, args, node_rank=r, **where) for r in range(nnodes)], timeout)


def _run_nodes(commands: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
    """Every node's command at once (each node's launcher waits for the others at the rendezvous)."""
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    nodes = [
        subprocess.Popen(command, env=_env(), stdout=out, stderr=err, text=True)
        for command, (out, err) in zip(commands, logs, strict=True)
    ]
    try:
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    results = []
    for node, code, (out, err) in zip(nodes, codes, logs, strict=True):
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(node.args, code, out.read(), err.read()))
        out.close()
        err.close()
    return results


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    two = _launch(2, "run2", str(out), str(STEPS), str(SAVE_AT))
    assert two.returncode == 0, two.stderr[-4000:]
    ckpt = latest_checkpoint(out, "sharded")
    assert ckpt is not None and ckpt.name == f"step_{SAVE_AT:08d}.dcp"
    one = _launch(1, "resume1", str(out), str(STEPS), str(ckpt))
    assert one.returncode == 0, one.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def plain_run():
    """The same steps in one process without a process group (what the single-GPU trainer does)."""
    model, snapshots, norms = W.make_model(), {}, []
    optimizer = W.make_optimizer(model)
    for step in range(STEPS):
        norms.append(W.train_step(model, optimizer, step, None))
        snapshots[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, snapshots, norms


def test_two_ranks_match_one_rank_and_plain(runs, plain_run):
    _, snapshots, plain_norms = plain_run
    two = load_file(runs / f"params_step{STEPS}.safetensors")
    one = load_file(runs / f"params_fresh1_step{STEPS}.safetensors")
    changed = _max_rel_diff(two, W.make_model().state_dict())
    assert changed > 1e-2  # the steps really moved the weights
    rel_two_plain = _max_rel_diff(two, snapshots[STEPS])
    rel_two_one = _max_rel_diff(two, one)
    print(
        f"max rel param diff after {STEPS} AdamW steps: 2-rank vs plain {rel_two_plain:.2e}, "
        f"2-rank vs 1-rank {rel_two_one:.2e}"
    )
    assert rel_two_plain <= TOL and rel_two_one <= TOL
    norms_two = json.loads((runs / "run2.json").read_text())["norms"]
    norms_one = json.loads((runs / "resume1.json").read_text())["norms"]
    assert norms_two == pytest.approx(plain_norms, rel=TOL) and norms_one == pytest.approx(plain_norms, rel=TOL)


def test_bf16_compute_keeps_fp32_master_weights_and_gradients(runs, plain_run):
    info = json.loads((runs / "run2.json").read_text())
    assert info["mixed_dtypes"] == {"master": "torch.float32", "grad": "torch.float32", "gathered": "torch.bfloat16"}
    _, _, plain_norms = plain_run
    assert info["mixed_norm"] == pytest.approx(plain_norms[0], rel=1e-2)  # bf16 forward/backward


def test_resume_from_two_rank_checkpoint_on_one_rank(runs, plain_run):
    state = json.loads((runs / "resume1.json").read_text())["state"]
    assert state == {"data_step": SAVE_AT, "step": SAVE_AT, "world_size": 2}
    resumed = load_file(runs / f"params_resumed1_step{STEPS}.safetensors")
    two = load_file(runs / f"params_step{STEPS}.safetensors")
    rel = _max_rel_diff(resumed, two)
    print(f"max rel param diff, 2-rank run vs resumed on 1 rank at step {STEPS}: {rel:.2e}")
    assert rel <= TOL


def test_sharded_checkpoint_loads_into_plain_model(runs):
    model = W.make_model()
    state = load_sharded(latest_checkpoint(runs, "sharded"), model, None)
    assert state["step"] == SAVE_AT
    saved = load_file(runs / f"params_step{SAVE_AT}.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_save_sharded_without_process_group_prunes_and_replaces_a_step(tmp_path):
    from score.rl.checkpoints import list_checkpoints, save_sharded

    model = W.make_model()
    optimizer = W.make_optimizer(model)
    W.train_step(model, optimizer, 0, None)
    for step in (1, 2, 3):
        save_sharded(tmp_path, step, model, optimizer, {"data_step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path, "sharded")] == ["step_00000002.dcp", "step_00000003.dcp"]
    save_sharded(tmp_path, 3, model, optimizer, {"data_step": 3}, keep_last=2)  # replaced, as plain ones are
    assert [p.name for p in list_checkpoints(tmp_path, "sharded")] == ["step_00000002.dcp", "step_00000003.dcp"]
    with pytest.raises(ValueError, match="JSON"):
        save_sharded(tmp_path, 4, model, optimizer, {"bad": object()})
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_sharded(tmp_path, model, optimizer)
    fresh = W.make_model()
    fresh_opt = W.make_optimizer(fresh)
    assert load_sharded(latest_checkpoint(tmp_path, "sharded"), fresh, fresh_opt)["data_step"] == 3
    W.train_step(model, optimizer, 1, None)
    W.train_step(fresh, fresh_opt, 1, None)  # same optimizer state -> same update
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_consolidated_export_loads_in_transformers(runs):
    import transformers

    from score.model import from_pretrained

    final = load_file(runs / f"params_step{STEPS}.safetensors")
    reference = W.make_model()
    reference.load_state_dict(final)
    ids = torch.tensor([[3, 17, 42, 8, 96, 0, 11]])
    with torch.no_grad():
        expected = reference(ids)
        ours = from_pretrained(runs / "hf")(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(runs / "hf", dtype=torch.float32).eval()
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


def test_generation_on_unsharded_weights_and_sharded_reference(runs):
    from score.model import Engine, SamplingParams

    info = json.loads((runs / "run2.json").read_text())
    assert info["resharded_after_generation"]
    model = W.make_model()
    model.load_state_dict(load_file(runs / f"params_step{STEPS}.safetensors"))
    with torch.no_grad():
        expected = model(torch.tensor([W.PROMPTS[0]]))
    torch.testing.assert_close(
        load_file(runs / "unsharded_logits.safetensors")["logits"], expected, rtol=1e-5, atol=1e-5
    )
    reference = W.make_model()
    with torch.no_grad():
        ref_logp = W.sequence_logprobs(reference, W.PROMPTS[0])
    torch.testing.assert_close(
        load_file(runs / "unsharded_logits.safetensors")["ref_logp"], ref_logp, rtol=1e-5, atol=1e-5
    )
    engine = Engine(model, block_size=4, num_blocks=32, max_model_len=32, max_num_seqs=4)
    outs = engine.generate(W.PROMPTS, SamplingParams(n=1, temperature=0.0, max_tokens=5, ignore_eos=True))
    assert info["tokens"] == [o[0].token_ids for o in outs]


def test_rank_failure_stops_job_and_names_rank():
    start = time.monotonic()
    result = _launch(2, "fail", "1", timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 of 2 failed first (exit code 3" in result.stderr, result.stderr[-3000:]
    print(f"failing job ended in {elapsed:.1f} s")


def test_split_launch_for_the_score_train_shortcut():
    from score.rl.parallel.launch import Launch, split_launch

    assert split_launch(["train", "--nproc", "4", "--config", "c.yaml"]) == (Launch(4), ["train", "--config", "c.yaml"])
    assert split_launch(["train", "--nproc=2"]) == (Launch(2), ["train"])
    assert split_launch(["train", "--out", "x"]) == (None, ["train", "--out", "x"])
    nodes = ["--nnodes", "2", "--node-rank=1", "--master-addr", "node0.cluster", "--master-port", "29500"]
    where, rest = split_launch(["train", *nodes, "--config", "c.toml"])
    assert rest == ["train", "--config", "c.toml"]
    assert where == Launch(1, 2, 1, "node0.cluster", 29500) and where.world_size == 2
    for bad, message in (
        (["train", "--nproc"], "--nproc needs a whole number"),
        (["train", "--nproc", "0"], "--nproc needs a whole number >= 1"),
        (["--nproc", "2", "--nproc", "2"], "--nproc given twice"),
        (["train", "--nnodes", "2", "--node-rank", "0"], "needs --node-rank, --master-addr and --master-port"),
        (["train", *nodes[:2], "--node-rank", "2", *nodes[3:]], r"--node-rank must be in \[0, 2\)"),
        (["train", *nodes[:-1], "70000"], "--master-port must be a port number"),
        (["train", *nodes[:-1], "http"], "--master-port needs a whole number"),
        (["train", "--master-addr", "a"], "need --nnodes N > 1"),
    ):
        with pytest.raises(ValueError, match=message):
            split_launch(bad)


def test_shard_groups_contiguous_equal_and_validated():
    class Env:  # only rank/world_size are read
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

    assert [list(D.shard_groups(8, Env(r, 4))) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(D.shard_groups(3, None)) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot be split evenly over 4 ranks"):
        D.shard_groups(6, Env(0, 4))
    with pytest.raises(ValueError, match="num_groups"):
        D.shard_groups(0, Env(0, 1))
    assert D.all_reduce_sum({"b": 2, "a": 1}, None) == {"a": 1.0, "b": 2.0}
    assert D.gather_lists([1, 2], None) == [1, 2]


def test_init_distributed_outside_torchrun_names_missing_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="missing RANK, WORLD_SIZE, LOCAL_RANK"):
        D.init_distributed()


# ---------------------------------------------------------------------------------------------------
# The SCoRe Trainer itself under torchrun (what `score train --nproc G` runs)
# ---------------------------------------------------------------------------------------------------
TRAINER_STEPS = 4  # 2 Stage I + 2 Stage II steps (tiny_config)


def _trainer_config(root: Path):
    from score.rl.config import to_toml
    from tests.helpers.tiny_run import tiny_config

    # 4 prompts x 2 samples per step: 2 groups per rank; half of the Stage II first attempts come
    # from the base model (the reference's engine, gathered too). One group per micro-batch: the
    # plain run by prompt count, the ranks by a token budget below a group's size, so each rank
    # trains the groups the balance hands it (exchanged between ranks), not the ones it sampled.
    cfg = tiny_config(root, optim__prompts_per_step=4, score__base_first_attempt_mix=0.5, run__keep_last=5)
    path = root / "run.toml"
    by_tokens = copy.deepcopy(cfg)
    by_tokens.optim.tokens_per_micro_batch = 30
    path.write_text(to_toml(by_tokens))
    return cfg, path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _copy_at_step(src: Path, dst: Path, step: int) -> Path:
    """The run folder as a run interrupted after `step`: later checkpoints and final/ removed."""
    import shutil

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1].removesuffix(".dcp")) > step:
            shutil.rmtree(ckpt)
    return dst


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    from tests.helpers.tiny_run import trainer_with_parity

    root = tmp_path_factory.mktemp("dist_trainer")
    cfg, config = _trainer_config(root)
    with contextlib.closing(trainer_with_parity(cfg, root / "plain")) as plain:  # closed also when fit() fails
        plain.fit()
    two = _launch(2, "train", str(config), str(root / "two"))
    assert two.returncode == 0, two.stderr[-4000:]
    resumed = _copy_at_step(root / "two", root / "resumed1", 2)
    one = _launch(1, "train", str(config), str(resumed), "resume")
    assert one.returncode == 0, one.stderr[-4000:]
    return root, cfg, load_file(root / "plain" / "final" / "model.safetensors")


def test_trainer_on_two_ranks_equals_one_process(trainer_runs):
    root, _, plain = trainer_runs
    two = load_file(root / "two" / "final" / "model.safetensors")
    diff = _max_rel_diff(two, plain)
    print(f"SCoRe trainer, 2 ranks vs plain process after {TRAINER_STEPS} steps: max rel diff {diff:.3g}")
    assert diff <= TOL
    base = load_file(root / "base" / "model.safetensors")
    assert _max_rel_diff(base, plain) > 1e-3  # the steps did move the weights
    ours, reference = _metrics(root / "two"), _metrics(root / "plain")
    assert [m["step"] for m in ours] == list(range(1, TRAINER_STEPS + 1))
    for a, b in zip(ours, reference, strict=True):
        # same samples and rewards (seeds keyed on whole-batch positions), same loss and norm
        for key in ("stage", "reward_1", "reward_2", "len_1", "len_2", "skipped"):
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "kl_1", "kl_2", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert any(m["grad_norm"] > 0 for m in ours)
    names = sorted(p.name for p in (root / "two" / "checkpoints").iterdir())
    assert names == ["step_00000002.dcp", "step_00000004.dcp"]  # DCP folders (plain runs write step_00000002)


def test_trainer_resumes_two_rank_checkpoint_on_one_rank_and_in_a_plain_process(trainer_runs, closes):
    from tests.helpers.tiny_run import trainer_with_parity

    root, cfg, plain = trainer_runs
    one = load_file(root / "resumed1" / "final" / "model.safetensors")
    assert _max_rel_diff(one, plain) <= TOL
    assert [m["step"] for m in _metrics(root / "resumed1")] == list(range(1, TRAINER_STEPS + 1))
    # a plain `score train --resume` continues from a sharded checkpoint too
    resumed = closes(trainer_with_parity(cfg, _copy_at_step(root / "two", root / "resumed_plain", 2), resume=True))
    assert resumed.step == 2
    resumed.fit()
    resumed.close()
    assert _max_rel_diff(load_file(root / "resumed_plain" / "final" / "model.safetensors"), plain) <= TOL


def test_two_nodes_of_one_rank_equal_two_ranks_on_one_node_and_resume_on_one_node(trainer_runs):
    """2 nodes x 1 rank (torchrun's static rendezvous on localhost, gloo) against 1 node x 2 ranks;
    then the 2-node run's step-2 checkpoint (each node wrote its shards) resumed on one node."""
    root, _, plain = trainer_runs
    config = str(root / "run.toml")
    nodes = _launch_nodes(2, "train", config, str(root / "nodes2"))
    for node_rank, node in enumerate(nodes):
        assert node.returncode == 0, node.stderr[-4000:]
        groups = [0, 1] if node_rank == 0 else [2, 3]  # data shards follow the global rank
        assert f"rank {node_rank} of 2, local rank 0, groups {groups}" in node.stdout
    two = load_file(root / "two" / "final" / "model.safetensors")
    across = load_file(root / "nodes2" / "final" / "model.safetensors")
    diff = _max_rel_diff(across, two)
    print(f"SCoRe trainer, 2 nodes x 1 rank vs 1 node x 2 ranks after {TRAINER_STEPS} steps: max rel diff {diff:.3g}")
    assert diff <= 1e-6
    assert _max_rel_diff(across, plain) <= TOL
    ours, reference = _metrics(root / "nodes2"), _metrics(root / "two")
    assert [m["step"] for m in ours] == list(range(1, TRAINER_STEPS + 1))  # rank 0 alone logs
    for a, b in zip(ours, reference, strict=True):
        for key in ("stage", "reward_1", "reward_2", "loss", "grad_norm", "kl_1", "kl_2"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert sorted(p.name for p in (root / "nodes2" / "checkpoints").iterdir()) == [
        "step_00000002.dcp",
        "step_00000004.dcp",
    ]
    resumed = _copy_at_step(root / "nodes2", root / "nodes2_resumed_on_one_node", 2)
    one_node = _launch(2, "train", config, str(resumed), "resume")
    assert one_node.returncode == 0, one_node.stderr[-4000:]
    resumed_diff = _max_rel_diff(load_file(resumed / "final" / "model.safetensors"), two)
    print(f"2-node checkpoint resumed on 1 node x 2 ranks vs the uninterrupted run: max rel diff {resumed_diff:.3g}")
    assert resumed_diff <= 1e-6


def test_a_run_folder_the_ranks_do_not_share_is_an_error_on_every_rank(tmp_path):
    result = _launch(2, "unshared", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        message = f"rank {rank}: {tmp_path / f'rank{rank}'} is not on a file system that every rank shares"
        assert message in result.stdout
    assert "rank 1 on " in result.stdout and "rank 0 on " not in result.stdout
    assert not list((tmp_path / "rank0").iterdir())  # rank 0's probe is removed


def test_score_train_on_two_nodes_from_the_command_line(tmp_path):
    """`score train --nnodes 2 --node-rank R --master-addr A --master-port P`, once per node: one job,
    global rank 0 alone prints, writes final/ and evaluates."""
    from tests.helpers.tiny_run import write_problems

    _, config = _trainer_config(tmp_path)
    evals = write_problems(tmp_path / "eval.jsonl", 4, split="eval")
    port = str(_free_port())
    command = [sys.executable, "-m", "score.rl.cli", "train", "--config", str(config), "--out", str(tmp_path / "run")]
    command += ["--max-steps", "1", "--set", f'data.eval="{evals}"', "--quiet"]
    nodes = _run_nodes(
        [
            command + ["--nnodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port]
            for r in (0, 1)
        ],
        timeout=240,
    )
    for node in nodes:
        assert node.returncode == 0, node.stderr[-4000:]
    assert nodes[0].stdout.count("final policy:") == 1 and "Acc@t1" in nodes[0].stdout
    assert "final policy:" not in nodes[1].stdout and "Acc@t1" not in nodes[1].stdout
    assert json.load(open(tmp_path / "run" / "eval_metrics.json"))["n"] == 4
    assert len(_metrics(tmp_path / "run")) == 1


def test_score_train_nproc_runs_the_job_and_rank_0_evaluates(tmp_path):
    """The real command line: `score train --nproc 2` with an eval set, and a batch that cannot split."""
    from tests.helpers.tiny_run import write_problems

    _, config = _trainer_config(tmp_path)
    evals = write_problems(tmp_path / "eval.jsonl", 4, split="eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "-m",
        "score.rl.cli",
        "train",
        "--config",
        str(config),
        "--max-steps",
        "1",
        "--set",
        f'data.eval="{evals}"',
        "--set",
        "run.plots=true",
    ]
    ok = subprocess.run(
        base + ["--nproc", "2", "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=240
    )
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert ok.stdout.count("final policy:") == 1 and "Acc@t1" in ok.stdout
    run = tmp_path / "run"
    assert json.load(open(run / "eval_metrics.json"))["n"] == 4
    assert (run / "final" / "tokenizer.json").exists() and (run / "plots").is_dir()
    assert len(_metrics(run)) == 1

    bad = subprocess.run(
        base + ["--nproc", "2", "--out", str(tmp_path / "bad"), "--set", "optim.prompts_per_step=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode != 0
    assert "cannot be split evenly over 2 ranks" in bad.stderr and "failed first" in bad.stderr, bad.stderr[-3000:]

    # rank 0 alone reads the weights (sharded_from_pretrained); its failure is every rank's error
    import shutil

    empty = shutil.copytree(tmp_path / "base", tmp_path / "no_weights")
    (empty / "model.safetensors").unlink()
    broken = subprocess.run(
        base + ["--nproc", "2", "--out", str(tmp_path / "broken"), "--set", f'model.path="{empty}"'],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert broken.returncode != 0
    assert broken.stderr.count("score train: error:") == 2 and "safetensors" in broken.stderr, broken.stderr[-3000:]
