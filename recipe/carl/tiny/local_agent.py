"""The CARL agent loop's environment on an in-process policy: rollouts and greedy evaluation without verl's trainer.

`LocalAgent` drives the agent loop's own `SearchEnvironment` (the same action parsing, stop strings, observations,
T_max and reward as training) with the CPU rollout server's batched engine (`HFRolloutServer`, used in-process
without Ray) and SynthHop's BM25 retriever. Concurrent rollouts share forward passes. It serves the criticality
study of `benchmarks/criticality.py` and a quick held-out check of an SFT start in the exact RL layout:

    python -m recipe.carl.tiny.local_agent --policy runs/x/policy_sft --data runs/x/data [--questions 100]
    python -m recipe.carl.tiny.local_agent --policy runs/x/policy_rl --data big --exclude runs/x/data/train.parquet \
        --questions 0 --temperature 0.7 --samples 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from recipe.carl.evaluate.engines import HFEngine
from recipe.carl.evaluate.runner import Evaluator
from recipe.carl.evaluate.settings import EvalSettings
from recipe.carl.search.actions import render_documents
from recipe.carl.search.pages import PageStore
from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.search.reward import compute_score


class LocalAgent(Evaluator):
    """A policy folder + a SynthHop data folder, ready to roll out in the agent loop's layout.

    `recipe.carl.evaluate.runner.Evaluator` with the demo's limits, the CPU rollout server in process and SynthHop's
    BM25 index searched in process (the demo's tool serves the same corpus over HTTP during training).

    Args:
        policy_dir: a Hugging Face model folder with its tokenizer (chat template included).
        data_dir: a SynthHop folder (`corpus.jsonl`, `test.parquet`, ...).
        topk: documents per search (the demo's tool yaml uses 2).
        max_actions: T_max.
        max_action_tokens: token budget of one agent turn.
        response_length: budget of the whole trajectory after the prompt (verl's `data.max_response_length`).
        seed: seed of the engine's sampling generator.
        action_space: `search_r1` or `paper` (pages of the same corpus, opened in process).
        page_chunk_chars: the paper's part size of a page.
        snippet_words: words of each search result shown (None: the whole document).
    """

    def __init__(
        self,
        policy_dir: str | Path,
        data_dir: str | Path,
        *,
        topk: int = 2,
        max_actions: int = 6,
        max_action_tokens: int = 32,
        response_length: int = 384,
        seed: int = 0,
        action_space: str = "search_r1",
        page_chunk_chars: int = 4000,
        snippet_words: int | None = None,
    ):
        from transformers import AutoTokenizer

        self.data_dir = Path(data_dir)
        self.max_actions = max_actions
        settings = EvalSettings(
            max_actions=max_actions,
            max_action_tokens=max_action_tokens,
            prompt_length=256,
            response_length=response_length,
            seed=seed,
            topk=topk,
            action_space=action_space,
            page_chunk_chars=page_chunk_chars,
            snippet_words=snippet_words,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
        retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(self.data_dir / "corpus.jsonl")))
        shown = {"show_ids": action_space == "paper", "snippet_words": snippet_words}
        pages = PageStore(retriever.corpus) if action_space == "paper" else None

        def search(query: str, tree_id: str) -> str:
            return render_documents((hit["document"] for hit in retriever.search_documents([query], topk)[0]), **shown)

        def access(page_id: str, tree_id: str) -> str | None:
            page = pages.get(page_id) if pages is not None else None
            return None if page is None else page.contents

        # No per-request seeds: the engine's own generator (seeded by `seed`), as verl samples without full determinism.
        engine = HFEngine(policy_dir, tokenizer, settings)
        super().__init__(
            engine, tokenizer, search, compute_score, settings, access=access if pages is not None else None
        )
        self.max_action_tokens, self.response_length = max_action_tokens, response_length

    def rows(self, split: str = "test", n: int | None = None) -> list[dict[str, Any]]:
        """The first `n` rows of a split's parquet (verl's RLHFDataset schema)."""
        import pandas as pd

        frame = pd.read_parquet(self.data_dir / f"{split}.parquet")
        return frame.head(n).to_dict("records") if n else frame.to_dict("records")

    def evaluate(self, rows: list[dict[str, Any]], temperature: float = 0.0, samples: int = 1) -> dict[str, float]:
        """Mean reward breakdown over `rows` x `samples` trajectories (greedy by default), all concurrently."""
        jobs = [(r, f"eval{i}" if samples == 1 else f"eval{i}.{j}") for i, r in enumerate(rows) for j in range(samples)]

        async def run_all():
            return await asyncio.gather(*[self.rollout(r, temperature, uid) for r, uid in jobs])

        infos = [info for _, _, info in asyncio.run(run_all())]
        keys = sorted({k for info in infos for k in info})
        return {k: sum(info.get(k, 0.0) for info in infos) / max(len(infos), 1) for k in keys} | {"n": len(infos)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.local_agent", description=__doc__.split("\n")[0])
    p.add_argument("--policy", required=True, help="model folder (e.g. a run's policy_sft)")
    p.add_argument("--data", required=True, help="SynthHop data folder (e.g. a run's data)")
    p.add_argument("--questions", type=int, default=100, help="first N held-out questions (0: all)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--samples", type=int, default=1, help="trajectories per question (with --temperature > 0)")
    p.add_argument(
        "--exclude",
        help="a parquet (e.g. a run's data/train.parquet) whose questions are dropped first: evaluate a larger "
        "SynthHop test split of the same KB seed without the questions that run trained on",
    )
    args = p.parse_args(argv)
    for name in ("policy", "data"):
        if not Path(getattr(args, name)).is_dir():
            raise SystemExit(f"error: --{name} {getattr(args, name)} is not a folder")
    if args.exclude and not Path(args.exclude).is_file():
        raise SystemExit(f"error: --exclude {args.exclude} is not a file")
    if args.samples < 1 or args.questions < 0:
        raise SystemExit(f"error: --samples {args.samples} must be >= 1 and --questions {args.questions} >= 0")
    agent = LocalAgent(args.policy, args.data)
    rows = agent.rows("test")
    if args.exclude:
        import pandas as pd

        seen = {e["question"] for e in pd.read_parquet(args.exclude)["extra_info"]}
        rows = [r for r in rows if r["extra_info"]["question"] not in seen]
    rows = rows[: args.questions] if args.questions else rows
    result = agent.evaluate(rows, args.temperature, args.samples)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
