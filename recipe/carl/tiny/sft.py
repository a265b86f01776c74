"""SFT warm start on the reference agent's demonstrations (the paper's cold start for weak policies).

Which trainer, and why. verl 0.9.1 ships ``verl.trainer.sft_trainer`` (the engine-based ``SFTTrainer`` with
``MultiTurnSFTDataset``; there is no ``fsdp_sft_trainer`` any more). It *does* run on CPU here: with
``CARL_DEVICE=cpu`` + ``recipe.carl.cpu.platform.activate()``, one more patch of
``verl.utils.distributed.initialize_global_process_group`` (it builds the backend string ``"cpu:gloo,cpu:gloo"``,
which torch rejects), ``engine.strategy=fsdp2``, fp32, sdpa and no torch.compile, it trained this 1.1M model at
about 0.7 s per step of 16 demonstrations (1 thread, shared machine), and its dataset gives exactly the ids and
loss masks of :func:`tokenize_messages` (checked on 300 demonstrations; see the tests). It is not used because:

1. this loop took 0.25-0.4 s per step under the same conditions, and the probe needs about 2500 steps;
2. it has no wall-clock budget, writes sharded FSDP checkpoints (the Hugging Face folder needs verl's model
   merger), needs a process group, the CPU platform shim plus a monkeypatch, and a throwaway parquet.

So this module is "the smallest honest equivalent": a plain torch loop with the same data semantics (loss only on
the tokens the policy generates in RL: each assistant action and its end-of-turn token; prompts and observations
masked), AdamW, linear warmup times a cosine decay to ``min_lr_ratio``, length-bucketed batches, gradient clipping,
tqdm, a step and/or wall-clock budget, a fixed seed, and a ``save_pretrained`` checkpoint.

Tokenization matches verl's agent loop: the ids are those of the chat template's full rendering, and a token is
trained when it lies inside an assistant turn's span, i.e. between ``render(messages[:i], add_generation_prompt=
True)`` and ``render(messages[:i + 1])``. With the SynthHop template that is ``<search> X rel </search> <|end|>``,
exactly the tokens the rollout generates after the ``<|assistant|>`` generation prompt.

Usage::

    python -m recipe.carl.tiny.sft --model runs/tiny_init --demos data/synthhop/demos.jsonl \\
        --out runs/tiny_sft_seed0 --max-steps 2600 --time-budget 900
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a masked token (the value ``torch.nn.functional.cross_entropy`` ignores)."""


@dataclass(frozen=True)
class SFTConfig:
    """Knobs of the SFT warm start (defaults: the probe's run F)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio``."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    batch_size: int = 16
    """Sequences per step."""
    max_steps: int = 2600
    """Step budget; the cosine schedule spans it (about 14 epochs of 3000 demonstrations)."""
    time_budget_s: float | None = None
    """Wall-clock budget in seconds; when set, the schedule runs on ``max(step / max_steps, elapsed / budget)``
    so a slow machine still ends with a decayed learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    clip_grad: float = 1.0
    """Gradient-norm clip."""
    bucket_batches: int = 50
    """Batches per length bucket: a shuffled window of ``bucket_batches * batch_size`` sequences is sorted by length
    and cut into batches, so padding stays small while batch order stays random."""
    seed: int = 0
    """Seed of the batch order (the weights come from the input checkpoint)."""
    threads: int | None = None
    """``torch.set_num_threads``; None leaves torch's default (one per core). Use 1 when other processes share the
    cores: with 2 threads on 2 busy cores every op waits at a barrier for a descheduled thread, and a step took
    2-5 s instead of 0.3 s (measured while colleagues' runs held the machine)."""
    only_successful: bool = False
    """Train on successful demonstrations only (the paper's cold start keeps all; the probe kept all)."""

    def __post_init__(self):
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}.")
        if self.batch_size < 1 or self.max_steps < 1 or self.warmup_steps < 0 or self.bucket_batches < 1:
            raise ValueError("batch_size, max_steps and bucket_batches must be >= 1 and warmup_steps >= 0.")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}.")


@dataclass
class Example:
    """One tokenized demonstration: ids and the 0/1 mask of trained (action) tokens."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class SFTResult:
    """What :func:`train_sft` did."""

    steps: int
    """Optimizer steps taken."""
    wall_s: float
    """Training wall time (tokenization and saving excluded)."""
    final_loss: float
    """Mean action-token loss over the last 50 steps."""
    tokens: int
    """Non-pad tokens processed."""
    action_tokens: int
    """Trained (loss) tokens processed."""
    history: list[dict] = field(default_factory=list)
    """Per logged step: ``{"step", "time_s", "loss", "lr"}``."""


def tokenize_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> Example:
    """Token ids of a chat and the mask of its assistant tokens, as verl's multi-turn agent loop trains them.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: ``[{"role", "content"}]``: system, user, then assistant/tool turns.

    Returns:
        The example; ``loss_mask[t] == 1`` for tokens inside an assistant turn (the action and the end-of-turn
        token the template appends), 0 for the prompt, role markers and tool observations.

    Raises:
        ValueError: if the template does not render prefixes as prefixes (then turn-by-turn token building, as in
            verl's agent loop, would disagree with the full rendering).
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
            raise ValueError(
                "the chat template does not render message prefixes as prefixes of the full chat; SFT masking "
                "(and verl's step-by-step token building) needs a prefix-stable template."
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    # A token is trained when it starts inside an assistant span; the whitespace between words is not a token.
    mask = [int(any(a <= s < b for a, b in spans) and e > s) for s, e in enc["offset_mapping"]]
    return Example(list(enc["input_ids"]), mask)


def load_demos(path: str | os.PathLike, only_successful: bool = False) -> list[list[dict]]:
    """The chat ``messages`` of every demonstration in a ``demos.jsonl`` written by ``synthhop.make_data``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or "messages" not in rows[0]:
        raise ValueError(f"{path} has no demonstrations with 'messages'; write it with recipe.carl.synthhop.make_data.")
    return [r["messages"] for r in rows if r.get("success", True) or not only_successful]


def lr_factor(step: int, progress: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup over the first ``warmup_steps`` steps (counted in steps even under a
    wall-clock budget, so a slow machine still warms up), times a cosine from 1 to ``min_lr_ratio`` over
    ``progress`` in [0, 1].

    Args:
        step: 1-based index of the step about to be taken.
        progress: fraction of the budget spent.
        warmup_steps: warmup length.
        min_lr_ratio: final multiplier.
    """
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    cosine = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm * cosine


def bucketed_batches(lengths: Sequence[int], batch_size: int, bucket_batches: int, rng: random.Random) -> list:
    """One epoch of index batches: shuffle, sort each window of ``bucket_batches`` batches by length, shuffle them."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` off the action tokens)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attn[row, :n] = 1
        keep = torch.tensor(e.loss_mask, dtype=torch.bool)
        labels[row, :n] = torch.where(keep, ids[row, :n], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def action_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's action tokens (token mean, as verl's SFT loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    # Token t is predicted from position t-1.
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def train_sft(
    model: PreTrainedModel,
    examples: Sequence[Example],
    pad_id: int,
    config: SFTConfig = SFTConfig(),
    progress: bool = True,
    log_every: int = 25,
) -> SFTResult:
    """Train ``model`` in place on ``examples``.

    Args:
        model: the policy (trained in fp32 on CPU).
        examples: from :func:`tokenize_messages`.
        pad_id: the tokenizer's pad id.
        config: the knobs.
        progress: show a tqdm bar with the running loss.
        log_every: steps between history entries.

    Returns:
        Steps, wall time, final loss and the loss history.
    """
    if not examples:
        raise ValueError("no training examples; check the demonstrations file.")
    if config.threads:
        torch.set_num_threads(config.threads)
    rng = random.Random(f"carl-tiny-sft-{config.seed}")
    torch.manual_seed(config.seed)
    # No weight decay on norms and biases, as usual for transformers.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    lengths = [len(e.input_ids) for e in examples]
    model.train()
    result = SFTResult(steps=0, wall_s=0.0, final_loss=float("nan"), tokens=0, action_tokens=0)
    recent: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=config.max_steps, desc="sft", disable=not progress, unit="step")
    done = False
    while not done:
        for idx in bucketed_batches(lengths, config.batch_size, config.bucket_batches, rng):
            elapsed = time.perf_counter() - start
            progress_frac = result.steps / config.max_steps
            if config.time_budget_s is not None:
                progress_frac = max(progress_frac, elapsed / config.time_budget_s)
            if progress_frac >= 1.0:
                done = True
                break
            lr = config.lr * lr_factor(result.steps + 1, progress_frac, config.warmup_steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = collate([examples[i] for i in idx], pad_id)
            loss = action_token_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            result.steps += 1
            result.tokens += int(batch["attention_mask"].sum())
            result.action_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            recent = (recent + [loss.item()])[-50:]
            if result.steps % log_every == 0 or result.steps == 1:
                entry = {"step": result.steps, "time_s": round(elapsed, 2), "loss": sum(recent) / len(recent), "lr": lr}
                result.history.append(entry)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
    bar.close()
    model.eval()
    result.wall_s = time.perf_counter() - start
    result.final_loss = sum(recent) / len(recent) if recent else float("nan")
    return result


def run(
    model_dir: str | os.PathLike,
    demos_path: str | os.PathLike,
    out: str | os.PathLike,
    config: SFTConfig = SFTConfig(),
    progress: bool = True,
    command: str | None = None,
) -> SFTResult:
    """Load a policy folder, train it on ``demos.jsonl`` and save it (model, tokenizer, ``sft_log.json``) to ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = [tokenize_messages(tokenizer, m) for m in load_demos(demos_path, config.only_successful)]
    result = train_sft(model, examples, tokenizer.pad_token_id, config, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {"command": command, "model": str(model_dir), "demos": str(demos_path), "config": asdict(config)}
    log.update({k: v for k, v in asdict(result).items()})
    (out / "sft_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> SFTResult:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    d = SFTConfig()
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.sft", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="initial policy folder (recipe.carl.tiny.policy's --out)")
    p.add_argument("--demos", required=True, help="demos.jsonl written by recipe.carl.synthhop.make_data")
    p.add_argument("--out", required=True, help="output folder for the trained checkpoint")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="step budget (the cosine spans it)")
    p.add_argument("--time-budget", type=float, default=None, help="wall-clock budget in seconds (optional)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads; 1 on a shared machine (see SFTConfig)")
    p.add_argument("--only-successful", action="store_true", help="drop failed demonstrations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        config = SFTConfig(
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            time_budget_s=args.time_budget,
            seed=args.seed,
            threads=args.threads,
            only_successful=args.only_successful,
        )
    except ValueError as e:
        p.error(str(e))
    command = shlex.join(["python", "-m", "recipe.carl.tiny.sft", *argv])
    result = run(args.model, args.demos, args.out, config, progress=not args.quiet, command=command)
    print(
        f"sft: {result.steps} steps in {result.wall_s:.0f}s, action-token loss {result.final_loss:.3f}, "
        f"{result.tokens / max(result.wall_s, 1e-9):.0f} tokens/s -> {args.out}",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    main()
