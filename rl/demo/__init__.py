"""`score demo`: SCoRe end to end on CPU in minutes, with nothing downloaded, as an experiment.

1. A BPE tokenizer is trained on the demo task's texts (`tokenizers`), and a tiny Llama-style decoder
   (score.model.Transformer) is warmed up with supervised training on the procedural task of
   `task.py` (the last digit of a sum of four digits): direct answers, worked answers, and
   two-attempt traces whose second attempts are careless, in the mixture of the chosen setting
   (`task.SETTINGS`: `recall`, where the base model half-remembers the RL training problems,
   or `guess`). That base model is saved in HF format (`DIR/base`) and shared by every RL run.
2. Headroom, measured before any RL on the held-out and on the training problems: the base model's
   greedy accuracy with each answer path forced (direct within attempt 1's budget, worked within
   attempt 2's), and its own two-attempt self-correction (`DIR/eval/headroom{,_train}.jsonl`,
   `DIR/eval/base_seed{S}{,_train}.jsonl`).
3. SCoRe (Stage I then Stage II) from the base model with several RL seeds, through
   `rl.trainer.Trainer` exactly as `score train` runs it (`DIR/runs/NAME_seed{i}/`: config.toml,
   metrics.jsonl, final/); each trained policy is evaluated greedily on the held-out problems
   (`DIR/eval/NAME_seed{i}.jsonl`, one line per problem with `id`, `r1`, `r2`) and on the training
   problems (`..._train.jsonl`).
4. `--ablations` adds multi-turn RL (both attempts trained on their own rewards from the start: the
   baseline that collapses in the paper) and the paper's Table 4 rows, with the same budget:
   single-turn RL, no Stage I, no reward shaping, STaR instead of REINFORCE in Stage II, no online
   turn-1 samples (METHODS). `--baselines` adds the paper's Table 1-2 baselines: Self-Refine prompting
   the base model, and STaR / Pair-SFT with and without correct-to-correct data (`score sft`,
   SFT_BASELINES) per seed.
5. `DIR/results.json` holds the headroom and, per method, every seed's metrics on both problem sets,
   their mean and standard error, and the per-step collapse diagnostics (diagnostics.py); the
   tables are printed with ± s.e.; `DIR/plots/` holds a bar chart, the training curves and the
   collapse diagnostics.

RL runs go to a pool of processes (one intra-op thread each). The modules: settings.py (what each
run is), base_model.py (tokenizer, model, warm-up), measure.py (headroom, one run, summaries),
folder.py (the demo's folder), run.py (the demo itself), task.py (the task), diagnostics.py.
`--quick` shrinks everything to check the pipeline in seconds (not the result).
"""

from .run import run_demo

__all__ = ["run_demo"]
