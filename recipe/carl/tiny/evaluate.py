"""Evaluate a policy checkpoint on held-out SynthHop questions with plain batched Hugging Face generation.

Each episode is played as verl's multi-turn agent loop plays it, token in, token out: the prompt is the chat
template's rendering of the system and user messages with the generation prompt; each turn the policy generates
until its end-of-turn (eos) token, the action is parsed and run by :class:`~recipe.carl.synthhop.env.SynthHopEnv`
with the in-process :class:`~recipe.carl.synthhop.env.LocalSearch`, and the generated ids plus the tokenized tool
turn are appended to the context. Episodes are batched across questions (left padding, sorted by length to cut
padding); ``generate`` keeps a KV cache within a turn and the context is prefilled again each turn.

Layout caveat: this is the chat-template multi-turn layout (tool turns as chat messages, eos-terminated actions,
as verl's ``ToolAgentLoop`` builds them), not the Search-R1 layout of the CARL agent loop (observations appended raw
after the action) that ``recipe.carl.tiny.demo`` trains in. Policies from the demo are measured by verl's own
validation inside the run (``summary.json``); porting this evaluator to the agent-loop layout is open work.

Metrics (overall and by hop count): ``accuracy`` (exact match of the final answer, ``is_success``), ``format`` (no
invalid action in the episode), ``answered`` (the episode ended with an answer, not by the turn or context budget)
and ``actions`` (mean actions per episode).

Usage::

    python -m recipe.carl.tiny.evaluate --model runs/tiny_sft_seed0 --data data/synthhop --temperatures 0 1 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from recipe.carl.synthhop.env import LocalSearch, SynthHopEnv

Policy = Callable[[list[list[int]]], list[list[int]]]
"""A policy maps a batch of contexts (token ids) to the ids it generates for each (ending with eos if it stopped)."""


@dataclass(frozen=True)
class EvalQuestion:
    """One held-out question."""

    prompt: list[dict]
    """System and user chat messages (the parquet's ``prompt``)."""
    answer: str
    """Gold answer."""
    hops: int
    """Hop count."""


@dataclass
class EvalSet:
    """Questions plus what is needed to play them."""

    questions: list[EvalQuestion]
    search: LocalSearch
    max_turns: int = 6


@dataclass
class Episode:
    """One played episode."""

    question: str
    answer: str
    hops: int
    actions: list[str] = field(default_factory=list)
    prediction: str | None = None
    success: bool = False
    format_ok: bool = True
    answered: bool = False
    truncated: bool = False
    generated_tokens: int = 0


def load_eval_set(data_dir: str | os.PathLike, split: str = "test", n: int | None = None) -> EvalSet:
    """Read ``{split}.parquet``, ``corpus.jsonl`` and ``manifest.json`` from a ``synthhop.make_data`` folder.

    Args:
        data_dir: the data folder.
        split: "test" (held out) or "train".
        n: keep the first ``n`` questions (all when None).

    Returns:
        The questions and a search over the corpus with the data set's ``top_k``/``doc_words``/``max_turns``.
    """
    data_dir = Path(data_dir)
    missing = [f for f in (f"{split}.parquet", "corpus.jsonl") if not (data_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{data_dir} lacks {missing}; write it with python -m recipe.carl.synthhop.make_data --out {data_dir}"
        )
    frame = pd.read_parquet(data_dir / f"{split}.parquet")
    if n is not None:
        frame = frame.head(n)
    questions = [
        EvalQuestion(
            prompt=[{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            answer=str(row["reward_model"]["ground_truth"]["target"][0]),
            hops=int(row["extra_info"]["hops"]),
        )
        for _, row in frame.iterrows()
    ]
    corpus = [json.loads(line) for line in (data_dir / "corpus.jsonl").read_text().splitlines() if line.strip()]
    manifest_path = data_dir / "manifest.json"
    knobs = json.loads(manifest_path.read_text())["config"] if manifest_path.is_file() else {}
    search = LocalSearch(corpus, top_k=knobs.get("top_k", 2), doc_words=knobs.get("doc_words", 48))
    return EvalSet(questions, search, knobs.get("max_turns", 6))


class HFPolicy:
    """Batched ``model.generate`` as a :data:`Policy`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (pad and eos must be set).
        temperature: 0 for greedy; otherwise plain sampling at this temperature (top_k=0, top_p=1, so the samples
            follow the policy's own distribution, as RL rollouts do).
        max_new_tokens: tokens per action; a SynthHop action is 4-5 tokens plus eos.
        batch_size: contexts per ``generate`` call.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        temperature: float = 0.0,
        max_new_tokens: int = 24,
        batch_size: int = 64,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens; build the policy with recipe.carl.tiny.policy.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.max_new_tokens, self.batch_size = temperature, max_new_tokens, batch_size
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        self._gen_kwargs = sampling if temperature > 0 else {"do_sample": False}

    @torch.inference_mode()
    def __call__(self, contexts: list[list[int]]) -> list[list[int]]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out: list[list[int]] = [[] for _ in contexts]
        # Similar lengths share a batch, so left padding stays short.
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            width = max(len(contexts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T), left-padded
            attn = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, width - len(contexts[i]) :] = torch.tensor(contexts[i])
                attn[row, width - len(contexts[i]) :] = 1
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                **self._gen_kwargs,
            )[:, width:]  # (B, new)
            for row, i in enumerate(idx):
                tokens = gen[row].tolist()
                out[i] = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        return out


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_turn_ids(tokenizer: PreTrainedTokenizerBase, observation: str) -> list[int]:
    """Ids that close an assistant turn's context with a tool observation and open the next assistant turn.

    Computed as the suffix of two renders (``[a, tool]`` + generation prompt minus ``[a]``), as verl's agent loop
    builds multi-turn contexts.
    """
    base = [{"role": "assistant", "content": "x"}]
    before = _render_ids(tokenizer, base, False)
    after = _render_ids(tokenizer, base + [{"role": "tool", "content": observation}], True)
    if after[: len(before)] != before:
        raise ValueError("the chat template is not prefix-stable; multi-turn contexts cannot be built by appending.")
    return after[len(before) :]


def run_episodes(
    policy: Policy,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    max_context: int = 1024,
    max_new_tokens: int = 24,
    progress: bool = False,
) -> list[Episode]:
    """Play every question of ``eval_set`` with ``policy``, all episodes advancing one turn per batch.

    Args:
        policy: generates one action per context.
        tokenizer: the policy's tokenizer.
        eval_set: questions and search.
        max_context: an episode whose next turn could pass this many tokens ends (failed, ``truncated``).
        max_new_tokens: the policy's per-action budget, for the context check.
        progress: show a tqdm bar over turns.

    Returns:
        One :class:`Episode` per question, in order.
    """
    eos = tokenizer.eos_token_id
    episodes = [Episode(q.prompt[-1]["content"], q.answer, q.hops) for q in eval_set.questions]
    contexts = [_render_ids(tokenizer, q.prompt, True) for q in eval_set.questions]
    envs = [SynthHopEnv(eval_set.search, eval_set.max_turns) for _ in episodes]
    for env, q in zip(envs, eval_set.questions, strict=True):
        env.reset(q.answer)
    for _ in tqdm(range(eval_set.max_turns), desc="turns", disable=not progress, leave=False):
        active = [i for i, env in enumerate(envs) if not env.done]
        if not active:
            break
        generated = policy([contexts[i] for i in active])
        for i, ids in zip(active, generated, strict=True):
            ep = episodes[i]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            result = envs[i].step(text)
            ep.actions.append(" ".join(text.split()))
            ep.generated_tokens += len(ids)
            if result.kind == "invalid":
                ep.format_ok = False
            elif result.kind == "answer":
                ep.answered, ep.prediction, ep.success = True, result.argument, result.success
            if result.done:
                continue
            # Close the turn with eos when the policy hit its token budget instead, so the context stays in format.
            contexts[i] = contexts[i] + ids + ([] if ids and ids[-1] == eos else [eos])
            contexts[i] += tool_turn_ids(tokenizer, result.observation)
            if len(contexts[i]) + max_new_tokens > max_context:
                ep.truncated = True
                envs[i].done = True
    return episodes


def summarize(episodes: Sequence[Episode]) -> dict:
    """Metrics overall and by hop count.

    Returns:
        ``{"n", "accuracy", "format", "answered", "actions", "by_hops": {hops: {"n", "accuracy", ...}}}``.
    """

    def stats(group: Sequence[Episode]) -> dict:
        n = len(group)
        return {
            "n": n,
            "accuracy": sum(e.success for e in group) / n,
            "format": sum(e.format_ok for e in group) / n,
            "answered": sum(e.answered for e in group) / n,
            "actions": sum(len(e.actions) for e in group) / n,
        }

    if not episodes:
        raise ValueError("no episodes to summarize.")
    hops = sorted({e.hops for e in episodes})
    return {**stats(episodes), "by_hops": {h: stats([e for e in episodes if e.hops == h]) for h in hops}}


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    max_new_tokens: int = 24,
    progress: bool = False,
) -> tuple[dict, list[Episode]]:
    """Evaluate one decoding mode; returns the :func:`summarize` metrics (plus timing) and the episodes."""
    policy = HFPolicy(model, tokenizer, temperature, max_new_tokens, batch_size)
    max_context = getattr(model.config, "max_position_embeddings", 1024)
    # fork_rng: sampling is reproducible for a seed and leaves the caller's RNG stream alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = time.perf_counter()
        episodes = run_episodes(policy, tokenizer, eval_set, max_context, max_new_tokens, progress)
        wall = time.perf_counter() - start
    metrics = summarize(episodes)
    metrics["wall_s"] = wall
    metrics["gen_tokens_per_s"] = sum(e.generated_tokens for e in episodes) / max(wall, 1e-9)
    return metrics, episodes


def mode_name(temperature: float) -> str:
    """Row label of a decoding mode: ``greedy`` or ``T=0.7``."""
    return "greedy" if temperature == 0 else f"T={temperature:g}"


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table of ``{mode: metrics}`` (accuracy, format, actions, accuracy by hops, time)."""
    hops = sorted({h for m in results.values() for h in m["by_hops"]})
    header = ["mode", "n", "accuracy", "format", "answered", "actions", *[f"acc {h}-hop" for h in hops], "time"]
    rows = [header]
    for mode, m in results.items():
        by = [f"{m['by_hops'][h]['accuracy']:.1%}" if h in m["by_hops"] else "-" for h in hops]
        rows.append(
            [
                mode,
                str(m["n"]),
                f"{m['accuracy']:.1%}",
                f"{m['format']:.1%}",
                f"{m['answered']:.1%}",
                f"{m['actions']:.2f}",
                *by,
                f"{m.get('wall_s', float('nan')):.1f}s",
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    temperatures: Sequence[float] = (0.0, 1.0, 0.7),
    n: int | None = 200,
    batch_size: int = 64,
    seed: int = 0,
    split: str = "test",
    progress: bool = False,
) -> dict[str, dict]:
    """Evaluate a saved policy folder in several decoding modes.

    Returns:
        ``{mode_name: metrics}``; the episodes of each mode are under ``metrics["episodes"]`` as dicts.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eval_set = load_eval_set(data_dir, split, n)
    results = {}
    for t in temperatures:
        metrics, episodes = evaluate_policy(model, tokenizer, eval_set, t, batch_size, seed, progress=progress)
        metrics["episodes"] = [asdict(e) for e in episodes]
        results[mode_name(t)] = metrics
    return results


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Command-line entry point: prints the table, optionally writes the metrics and episodes as JSON."""
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="policy folder (save_pretrained layout)")
    p.add_argument("--data", required=True, help="SynthHop folder written by recipe.carl.synthhop.make_data")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--n", type=int, default=200, help="questions (first n of the split)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0, 0.7], help="0 means greedy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads; 1 on a shared machine")
    p.add_argument("--json", help="write {mode: metrics, with episodes} here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate_checkpoint(
        args.model, args.data, args.temperatures, args.n, args.batch_size, args.seed, args.split, progress=True
    )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
