"""Tree-packed rows against per-path rows (and GRPO's rows): tokens and time of the log-prob and update passes.

Two workloads, in one run:

- `demo`: the CPU demo's trees: the shipped SFT policy (`recipe/carl/tiny/checkpoints/sft_seed0`) grows one step of
  trees (16 SynthHop training questions, N0 = 2, N = 6, T_max = 6, T = 0.7) with the agent loop's own environment
  (`LocalAgent`), and the passes run that policy;
- `7B-shape`: synthetic trees of `scripts/run_carl_qwen7b.sh`'s shape (N0 = 8, N = 16, ~5 actions of ~100 tokens,
  ~500-token observations, a 300-token prompt) grown by CARL's real planner; token counts over `--count-trees`
  trees (128, a full step), passes timed on `--time-trees` of them with a randomly initialised model built from a
  named config (`--model`, nothing downloaded).

For each: rows and tokens per pass of the three layouts (CARL per-path rows as the agent loop lays them out: one
row per leaf path that holds a not-yet-trained critical action, cut after it; CARL packed rows; GRPO: N0 + N
independent trajectories per question), and the wall time of an old-log-prob pass (forward, log-probs and entropy,
no grad) and of an update pass (forward, backward, AdamW step), packed vs per-path, in micro-batches of at most
`micro_batch_tokens` tokens (the demo's 4096; the 7B script's 28672). The passes are the ones verl's engine runs,
through the same mask / position / predecessor-logit code (`recipe.carl.packing.attention`), on plain torch +
transformers; the padded layout and sdpa on CPU (as the CPU yaml), verl's remove-padding layout and flex attention
on a GPU. As a check, the packed and per-path log-probs of every trained token are compared (`max|dlogp|`).

    python benchmarks/bench_packing.py --repeats 5                       # CPU: both workloads (~6 min, 2 cores)
    python benchmarks/bench_packing.py --device cuda --workloads 7B-shape --model qwen2.5-7b --time-trees 2 --repeats 2

On a GPU the defaults are bf16, gradient checkpointing (as the 7B script), verl's remove-padding layout and flex
attention for both layouts. The `demo` workload grows its trees with the recipe's CPU rollout (it needs verl);
`7B-shape` needs only torch and transformers. `--scale` shrinks the synthetic trees (tests).

The output ends with one line per workload: `<name> ratio=<packed/per-path tokens> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from carl_core import CARLConfig, Draw, ForkPlanner, RolloutTree, Step, grow_tree  # noqa: E402
from recipe.carl.packing.attention import (  # noqa: E402
    build_attention_mask,
    dynamic_lengths,
    layout_rows,
    logits_from_predecessors,
    to_model_layout,
)
from recipe.carl.packing.layout import pack_tree  # noqa: E402

SYNTHETIC_VOCAB = 4000
"""Token ids of the synthetic trees are drawn below this (every named model's vocabulary is larger)."""
SFT_POLICY = REPO / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"
#: Named model shapes (Qwen2 architecture), built with random weights: nothing is downloaded.
MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip


@dataclass
class Row:
    """A training row: token ids (prompt + response), prompt length, runs (None: an ordinary causal row), mask."""

    ids: list[int]
    prompt_len: int
    runs: list[list[int]] | None
    response_mask: list[int]
    trained_keys: list[tuple[int, int]]
    """(tree, node) of each trained token, in order: to compare log-probs across layouts."""


def tree_to_json(tree: RolloutTree) -> dict:
    """A tree with every token id and log-prob (the `--dump-demo-trees` format, read back by `tree_from_json`)."""
    nodes = []
    for n in tree.nodes:
        action = None
        if n.action is not None:
            action = {k: getattr(n.action, k) for k in ("token_ids", "log_probs", "observation_ids")}
        nodes.append({"id": n.id, "parent": n.parent, "terminal": n.terminal, "finish_reason": n.finish_reason,
                      "reward": n.reward, "action": action})  # fmt: skip
    return {"uid": tree.uid, "prompt_ids": tree.prompt_ids, "max_actions": tree.max_actions, "nodes": nodes}


def tree_from_json(data: dict) -> RolloutTree:
    """Replays a `tree_to_json` dict through `RolloutTree.add_action` (node ids are creation order)."""
    tree = RolloutTree(data["prompt_ids"], data["max_actions"], uid=data.get("uid", ""))
    for node in data["nodes"][1:]:
        a, reason = node["action"], node["finish_reason"]
        done = node["terminal"] and reason != "max_actions" and not node.get("children")
        nid = tree.add_action(node["parent"], a["token_ids"], a["log_probs"], a["observation_ids"], done=done,
                              finish_reason=reason)  # fmt: skip
        assert nid == node["id"]
    for node in data["nodes"]:
        if node["terminal"] and not tree.nodes[node["id"]].terminal:
            tree.terminate(node["id"], node["finish_reason"])
        if node["reward"] is not None:
            tree.set_reward(node["id"], node["reward"])
    tree.validate()
    return tree


def critical_mask(tree: RolloutTree) -> list[bool]:
    """Eq. 13: an action is trained when its source state has more than one child."""
    return [n.parent is not None and len(tree.nodes[n.parent].children) > 1 for n in tree.nodes]


def per_path_rows(tree: RolloutTree, b: int, trained: list[bool]) -> list[Row]:
    """The agent loop's per-path rows: each leaf path with a not-yet-covered trained action, cut after the last."""
    rows, covered = [], set()
    for leaf in tree.leaves():
        path = tree.path(leaf)[1:]
        new = [v for v in path if trained[v] and v not in covered]
        if not new:
            continue
        ids, mask, keys = list(tree.prompt_ids), [], []
        for v in path[: path.index(new[-1]) + 1]:
            action = tree.nodes[v].action
            on = v in new
            ids += action.token_ids
            mask += [int(on)] * len(action.token_ids)
            keys += [(b, v)] * len(action.token_ids) if on else []
            if v != new[-1]:
                ids += action.observation_ids
                mask += [0] * len(action.observation_ids)
        covered.update(new)
        rows.append(Row(ids, len(tree.prompt_ids), None, mask, keys))
    return rows


def packed_rows(tree: RolloutTree, b: int, trained: list[bool], max_tokens: int) -> list[Row]:
    rows = []
    for r in pack_tree(tree, trained, max_tokens - len(tree.prompt_ids)):
        nodes = [v for v, count in r.token_nodes for _ in range(count)]
        keys = [(b, v) for v, m in zip(nodes, r.response_mask, strict=True) if m]
        rows.append(Row(r.prompt_ids + r.response_ids, len(r.prompt_ids), r.tree_runs, r.response_mask, keys))
    return rows


def micro_batches(rows: list[Row], max_tokens: int) -> list[list[Row]]:
    """Rows in order, as many per micro-batch as fit `max_tokens` (verl's dynamic batch size counts real tokens)."""
    out: list[list[Row]] = [[]]
    used = 0
    for row in rows:
        if out[-1] and used + len(row.ids) > max_tokens:
            out.append([])
            used = 0
        out[-1].append(row)
        used += len(row.ids)
    return out


def model_inputs(batch: list[Row], packed_layout: bool, attn: str, device: str):
    """input_ids, position_ids, attention mask and logits source of one micro-batch, as the engine builds them."""
    lengths = [len(r.ids) for r in batch]
    positions, ends, preds = layout_rows([r.runs for r in batch], lengths)
    positions = torch.as_tensor(positions)
    if packed_layout:
        width = sum(lengths)
        ids = torch.tensor([sum((r.ids for r in batch), [])])
        pos = positions[None]
    else:
        width = max(lengths)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        pos = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (row, p) in enumerate(zip(batch, positions.split(lengths), strict=True)):
            ids[b, : len(row.ids)] = torch.tensor(row.ids)
            pos[b, : len(p)] = p
    span_end, source = to_model_layout(ends, preds, width, packed_layout)
    mask = build_attention_mask(span_end.to(device), attn)
    return ids.to(device), pos.to(device), mask, source.to(device)


def response_positions(batch: list[Row], packed_layout: bool, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into logits viewed as (-1, vocab)) scoring each trained token, and the token ids."""
    index, labels, offset = [], [], 0
    for b, row in enumerate(batch):
        base = offset if packed_layout else b * width
        for j, m in enumerate(row.response_mask):
            if m:
                col = row.prompt_len + j
                index.append(base + col - 1)
                labels.append(row.ids[col])
        offset += len(row.ids)
    return torch.tensor(index), torch.tensor(labels)


def run_pass(model, rows, args, train: bool, optimizer=None) -> tuple[float, torch.Tensor]:
    """One old-log-prob (train=False) or update (train=True) pass; returns seconds and trained-token log-probs."""
    device = args.device
    n_trained = sum(sum(r.response_mask) for r in rows)
    out = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if train:
        optimizer.zero_grad(set_to_none=True)
    scope = dynamic_lengths() if args.attn == "flex_attention" else contextlib.nullcontext()  # as the engine does
    with scope:
        for batch in micro_batches(rows, args.micro_batch_tokens):
            ids, pos, mask, source = model_inputs(batch, args.layout == "packed", args.attn, device)
            with torch.set_grad_enabled(train), logits_from_predecessors(model, lambda source=source: source):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                flat = logits.view(-1, logits.shape[-1])
                index, labels = response_positions(batch, args.layout == "packed", ids.shape[-1])
                index, labels = index.to(device), labels.to(device)
                # fp32 log-softmax over the vocabulary at the trained tokens' positions only (a 7B-vocabulary fp32 copy
                # of every position's logits would not fit next to the model)
                logp = torch.log_softmax(flat[index].float(), -1).gather(-1, labels[:, None]).squeeze(-1)
                if not train:  # verl's old-log-prob pass also computes every token's entropy (here in chunks)
                    for chunk in flat.split(8192):
                        c = chunk.float()
                        lse = c.logsumexp(-1)
                        (lse - (torch.softmax(c, -1) * c).sum(-1)).sum().item()
                if train:
                    # token-mean policy-gradient loss with unit advantages: the cost of verl's update
                    (-logp.sum() / n_trained).backward()
            out.append(logp.detach().float().cpu())
    if train:
        optimizer.step()
    sync()
    return time.perf_counter() - start, torch.cat(out)


def time_layouts(model, layouts: dict[str, list[Row]], args) -> dict[str, dict[str, float]]:
    """Median seconds of each pass per layout (interleaved, after one warm-up), and the log-prob agreement.

    Also per layout: the warm-up round's seconds (`first_logprob`, `first_update`: on a GPU they include compiling
    flex attention, which the first layout's round pays) and, on a GPU, the peak memory of its passes (`peak_gb`).
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # host copy: a 7B fits
    times: dict[str, dict[str, list[float]]] = {k: {"logprob": [], "update": []} for k in layouts}
    first: dict[str, dict[str, float]] = {}
    peak = dict.fromkeys(layouts, 0.0)
    logps = {}
    for rep in range(args.repeats + 1):
        for name, rows in layouts.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t, lp = run_pass(model, rows, args, train=False)
            model.load_state_dict(state)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            u, _ = run_pass(model, rows, args, train=True, optimizer=optimizer)
            del optimizer
            model.load_state_dict(state)
            if args.device == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)
            if rep:  # the first round warms up kernels and allocators
                times[name]["logprob"].append(t)
                times[name]["update"].append(u)
            else:
                first[name] = {"first_logprob": t, "first_update": u}
            logps[name] = trained_logps_by_key(rows, lp)
    result: dict = {
        name: {**{k: statistics.median(v) for k, v in t.items()}, **first[name], "peak_gb": peak[name]}
        for name, t in times.items()
    }
    packed, per_path = logps["packed"], logps["per-path"]
    if packed.keys() != per_path.keys():
        raise RuntimeError("packed and per-path rows train different actions")
    result["check"] = max(abs(x - y) for k in packed for x, y in zip(packed[k], per_path[k], strict=True))
    return result


def trained_logps_by_key(rows: list[Row], logp: torch.Tensor) -> dict[tuple[int, int], list[float]]:
    out: dict[tuple[int, int], list[float]] = {}
    for key, value in zip((k for r in rows for k in r.trained_keys), logp.tolist(), strict=True):
        out.setdefault(key, []).append(value)
    return out


# ---------------------------------------------------------------------------------------------------- workloads
def demo_trees(args) -> tuple[list[RolloutTree], CARLConfig]:
    """One demo step of real trees: the shipped SFT policy in the agent loop's environment on SynthHop."""
    # Here, not at the top: make_data imports transformers.
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
    from recipe.carl.tiny.local_agent import LocalAgent  # here, not at the top: it imports omegaconf (not on a GPU box)

    config = CARLConfig(n0=2, n_forks=6, max_actions=6)
    data_dir = Path(tempfile.mkdtemp(prefix="bench_packing_")) / "data"
    write(build(SynthHopConfig(seed=0, n_entities=300, n_train=3000, n_test=100)), data_dir, overwrite=True)
    agent = LocalAgent(SFT_POLICY, data_dir, max_actions=6, max_action_tokens=384, response_length=384)

    async def grow_all():
        async def one(i, row):
            tree = agent.new_tree(row, f"demo{i}")
            return await grow_tree(tree, ForkPlanner(config, random.Random(i)), agent.env(row, 0.7, f"demo{i}"))

        return await asyncio.gather(*[one(i, r) for i, r in enumerate(agent.rows("train", args.demo_trees))])

    return asyncio.run(grow_all()), config


class SyntheticEnv:
    """~100-token actions, ~500-token observations, trajectories of 4-6 actions (~5), random log-probs."""

    def __init__(self, rng: random.Random, scale: float = 1.0):
        self.rng, self.scale = rng, scale

    def _n(self, low: int, high: int) -> int:
        return max(1, round(self.rng.randint(low, high) * self.scale))

    async def step(self, tree: RolloutTree, node: int, draw: Draw) -> Step:
        rng, depth = self.rng, tree.nodes[node].depth + 1
        n = self._n(80, 120)
        done = depth >= 6 or (depth >= 4 and rng.random() < 0.5)
        return Step(
            [rng.randrange(SYNTHETIC_VOCAB) for _ in range(n)],
            [math.log(rng.uniform(0.05, 1.0)) for _ in range(n)],
            [] if done else [rng.randrange(SYNTHETIC_VOCAB) for _ in range(self._n(450, 550))],
            done=done,
            finish_reason="answer" if done else None,
        )

    async def score(self, tree: RolloutTree, leaf: int) -> float:
        return float(self.rng.random() < 0.4)


def shaped_trees(num: int, seed: int = 0, scale: float = 1.0) -> tuple[list[RolloutTree], CARLConfig]:
    config = CARLConfig(n0=8, n_forks=16, max_actions=32)
    rng = random.Random(seed)

    async def grow_all():
        out = []
        for i in range(num):
            prompt = [rng.randrange(SYNTHETIC_VOCAB) for _ in range(max(1, round(300 * scale)))]
            tree = RolloutTree(prompt, config.max_actions, uid=f"shape{i}")
            out.append(await grow_tree(tree, ForkPlanner(config, random.Random(i)), SyntheticEnv(rng, scale)))
        return out

    return asyncio.run(grow_all()), config


def trajectory_tokens(tree: RolloutTree, leaf: int) -> int:
    """Prompt + response tokens of the trajectory ending at `leaf` (its last observation is never trained on)."""
    action = tree.nodes[leaf].action
    return len(tree.prefix_ids(leaf)) - (len(action.observation_ids) if action else 0)


def grpo_tokens(trees: list[RolloutTree], leaves: int, seed: int, synthetic: bool, scale: float = 1.0) -> int:
    """Tokens of GRPO's rows for the same number of leaves: independent whole trajectories from each root."""
    if not synthetic:  # real trees: N0 + N trajectories of the tree's own mean leaf-path length
        total = 0
        for tree in trees:
            lengths = [trajectory_tokens(tree, leaf) for leaf in tree.leaves()]
            total += round(leaves * sum(lengths) / len(lengths))
        return total
    single = CARLConfig(n0=1, n_forks=0, max_actions=32)
    rng, total = random.Random(seed), 0

    async def one(tree: RolloutTree) -> int:
        t = RolloutTree(tree.prompt_ids, 32)
        await grow_tree(t, ForkPlanner(single), SyntheticEnv(rng, scale))
        return trajectory_tokens(t, t.leaves()[0])

    for tree in trees:
        total += sum(asyncio.run(one(tree)) for _ in range(leaves))
    return total


def layouts_for(trees: list[RolloutTree], max_tokens: int) -> dict[str, list[Row]]:
    packed, per_path = [], []
    for b, tree in enumerate(trees):
        trained = critical_mask(tree)
        packed += packed_rows(tree, b, trained, max_tokens)
        per_path += per_path_rows(tree, b, trained)
    return {"packed": packed, "per-path": per_path}


def build_model(name: str, device: str, bf16: bool, attn: str, checkpointing: bool = False, layers: int | None = None):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name == "sft":
        model = AutoModelForCausalLM.from_pretrained(str(SFT_POLICY), attn_implementation=attn)
    else:
        torch.manual_seed(0)
        shape = {**MODELS[name], **({"num_hidden_layers": layers} if layers else {})}
        with torch.device(device):  # initialised where it runs (a 7B's CPU initialisation takes minutes)
            model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, attn_implementation=attn))
    if checkpointing:  # as the 7B script (enable_gradient_checkpointing=True): activations of 28k-token micro-batches
        model.gradient_checkpointing_enable()
    return model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)


def report(name: str, layouts: dict[str, list[Row]], grpo: int, times: dict | None, lines: list[str]) -> str:
    tokens = {k: sum(len(r.ids) for r in rows) for k, rows in layouts.items()}
    rows = {k: len(v) for k, v in layouts.items()}
    ratio = tokens["packed"] / tokens["per-path"]
    print(f"\n== {name}")
    print(f"  rows      per-path {rows['per-path']:>8}   packed {rows['packed']:>8}")
    print(f"  tokens    per-path {tokens['per-path']:>8}   packed {tokens['packed']:>8}   GRPO {grpo:>8}")
    line = f"{name} ratio={ratio:.3f} grpo_ratio={tokens['packed'] / grpo:.3f}"
    if times:
        for k in ("logprob", "update"):
            print(f"  {k:<9} per-path {times['per-path'][k]:>7.3f}s  packed {times['packed'][k]:>7.3f}s")
        both = {k: times[k]["logprob"] + times[k]["update"] for k in ("packed", "per-path")}
        first = times["packed"]["first_logprob"] + times["packed"]["first_update"]
        line += f" time_ratio={both['packed'] / both['per-path']:.3f} max_abs_logp_diff={times['check']:.2e}"
        line += f" packed_s={both['packed']:.3f} per_path_s={both['per-path']:.3f} first_packed_s={first:.3f}"
        peak = {k: times[k]["peak_gb"] for k in ("packed", "per-path")}
        if peak["packed"]:
            print(f"  peak GPU  per-path {peak['per-path']:>6.1f} GB  packed {peak['packed']:>6.1f} GB")
            line += f" peak_gb_packed={peak['packed']:.1f} peak_gb_per_path={peak['per-path']:.1f}"
    lines.append(line)
    return line


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workloads", default="demo,7B-shape")
    p.add_argument("--model", default=None, help=f"7B-shape model: {', '.join(MODELS)} (cpu: tiny, cuda: qwen2.5-0.5b)")
    p.add_argument("--attn", default=None, help="sdpa | eager | flex_attention (cpu: sdpa, cuda: flex_attention)")
    p.add_argument("--layout", default=None, choices=["padded", "packed"], help="cpu: padded, cuda: packed")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (default on cuda)")
    p.add_argument("--fp32", action="store_true", help="fp32 weights, no autocast, also on cuda (exactness checks)")
    p.add_argument("--layers", type=int, default=None, help="7B-shape model: this many layers of the named shape")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (default on cuda)")
    p.add_argument("--demo-trees", type=int, default=16)
    p.add_argument("--count-trees", type=int, default=128)
    p.add_argument("--time-trees", type=int, default=None, help="7B-shape trees timed (cpu: 1, cuda: 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="7B-shape: multiply every token count (tests: 0.05)")
    p.add_argument("--dump-demo-trees", type=Path, default=None, help="write the grown demo trees (JSON lines)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.attn = args.attn or ("flex_attention" if cuda else "sdpa")
    args.layout = args.layout or ("packed" if cuda else "padded")
    args.bf16 = (args.bf16 or cuda) and not args.fp32
    model_name = args.model or ("qwen2.5-0.5b" if cuda else "tiny")
    args.checkpointing = args.checkpointing or cuda
    time_trees = args.time_trees if args.time_trees is not None else (2 if cuda else 1)
    print(f"device={args.device} attn={args.attn} layout={args.layout} bf16={args.bf16} torch={torch.__version__}")
    lines: list[str] = []
    for workload in args.workloads.split(","):
        if workload == "demo":
            trees, config = demo_trees(args)
            if args.dump_demo_trees:
                args.dump_demo_trees.write_text("".join(json.dumps(tree_to_json(t)) + "\n" for t in trees))
            args.micro_batch_tokens = 4096
            layouts = layouts_for(trees, 4096)
            grpo = grpo_tokens(trees, config.num_leaves, 0, synthetic=False)
            times = time_layouts(build_model("sft", args.device, args.bf16, args.attn), layouts, args)
        elif workload == "7B-shape":
            trees, config = shaped_trees(args.count_trees, scale=args.scale)
            args.micro_batch_tokens = (2048 + 12288) * 2  # MAX_TOKENS_PER_GPU of run_carl_qwen7b.sh
            layouts = layouts_for(trees, args.micro_batch_tokens)
            grpo = grpo_tokens(trees, config.num_leaves, 1, synthetic=True, scale=args.scale)
            timed = layouts_for(trees[:time_trees], args.micro_batch_tokens) if time_trees else None
            model = (
                build_model(model_name, args.device, args.bf16, args.attn, args.checkpointing, args.layers)
                if timed
                else None
            )
            times = time_layouts(model, timed, args) if timed else None
        else:
            raise SystemExit(f"unknown workload {workload!r}: use demo, 7B-shape")
        report(workload, layouts, grpo, times, lines)
    print()
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
