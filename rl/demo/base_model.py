"""The demo's base model, made on the spot: a BPE tokenizer trained on the task's texts, a tiny
decoder, and its supervised warm-up on the mixture of a setting (task.SETTINGS)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from score.kernels import fused_linear_logprob
from score.model import (
    ModelConfig,
    Tokenizer,
    Transformer,
)
from score.model.files import write_jsonl

from ..progress import progress_bar
from ..prompts import PromptBuilder
from . import task as demo_task
from .settings import DemoSizes


def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE trained on the demo's texts; digits are always single tokens. Merges may cross
    spaces, so the fixed texts (prompt, instruction) become a few tokens each: short sequences."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(demo_task.tokenizer_corpus(2000, seed), trainer)
    return Tokenizer(backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def build_model(tokenizer: Tokenizer, sizes: DemoSizes) -> Transformer:
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=sizes.hidden,
        intermediate_size=3 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Transformer(cfg)


def encode_warmup(example: demo_task.WarmupExample, builder: PromptBuilder, eos: int) -> tuple[list[int], list[int]]:
    """Token ids of one warm-up sequence (token-in-token-out, like rollouts) and its loss mask."""
    prompt = builder.first_attempt_ids(example.question)
    ids, mask = list(prompt), [0] * len(prompt)
    first = builder.tokenizer.encode(example.attempts[0]) + [eos]
    ids += first
    mask += [int(example.trained[0])] * len(first)
    if len(example.attempts) > 1:
        context, _ = builder.second_attempt_ids(prompt, first, "stop")
        mask += [0] * (len(context) - len(ids))
        ids = context
        second = builder.tokenizer.encode(example.attempts[1]) + [eos]
        start = len(builder.tokenizer.encode(example.untrained_start)) if example.untrained_start else 0
        if second[:start] != builder.tokenizer.encode(example.untrained_start):
            raise RuntimeError(f"{example.untrained_start!r} does not tokenize as the start of {example.attempts[1]!r}")
        ids += second
        mask += [0] * start + [1] * (len(second) - start)
    return ids, mask


def warm_up(
    model: Transformer,
    builder: PromptBuilder,
    sizes: DemoSizes,
    seed: int,
    progress: bool,
    mix: demo_task.WarmupMix,
    recall: tuple[tuple[int, ...], ...],
) -> float:
    """Supervised warm-up on the demo task (`mix`, with `recall` its recall problems); returns the last
    loss. Packed sequences, no logits."""
    rng = random.Random(f"demo-warmup-{seed}")
    eos = builder.tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=sizes.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    bar = None
    if progress:
        bar = progress_bar(sizes.warmup_steps, "warm-up (supervised)", "step")
    loss_value = float("nan")
    for step in range(sizes.warmup_steps):
        ids, targets, mask, cu = [], [], [], [0]
        for _ in range(sizes.warmup_batch):
            seq, m = encode_warmup(demo_task.warmup_example(rng, mix, recall), builder, eos)
            ids += seq
            targets += seq[1:] + [eos]  # the last row predicts nothing (masked)
            mask += m[1:] + [0]
            cu.append(len(ids))
        warm = min(1.0, (step + 1) / 50)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / sizes.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = sizes.warmup_lr * warm * cosine
        hidden = model.hidden_states(torch.tensor(ids), cu_seqlens=torch.tensor(cu, dtype=torch.int32))
        weights = torch.tensor(mask, dtype=torch.float32)
        logp = fused_linear_logprob(hidden, model.lm_head_weight, torch.tensor(targets))
        loss = -(logp * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    if bar is not None:
        bar.close()
    return loss_value


def write_problems(path: Path, problems) -> Path:
    return write_jsonl(path, ({"id": p.id, "problem": p.question, "answer": p.answer} for p in problems))
