"""Helpers shared by the evaluation tests: the shipped tiny policy, the demo's flags, a scripted policy, a fake verl
checkpoint and the CLI on bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from recipe.carl.evaluate.cli import main

SHIPPED = Path(__file__).resolve().parents[3] / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"
#: The SynthHop demo's own limits (32-token turns, top-2, T_max 6), as the demo passes them.
DEMO_FLAGS = ["--topk", "2", "--max-actions", "6", "--max-action-tokens", "32", "--prompt-length", "256"]
DEMO_FLAGS += ["--response-length", "384"]


def rows_of(data_dir, n):
    return pd.read_parquet(data_dir / "test.parquet").head(n).to_dict("records")


class ScriptedServer:
    """Question i (request id `eval{i}`) is played by behaviour i % 3: 0 searches its oracle queries then answers
    right, 1 does the same and answers another question's answer, 2 writes no tag at all."""

    def __init__(self, tokenizer, rows):
        self.tok, self.rows = tokenizer, rows

    def turns(self, i):
        row = self.rows[i]
        queries = [f"<search> {q} </search>" for q in row["extra_info"]["oracle_queries"]]
        gold = row["reward_model"]["ground_truth"]["target"][0]
        answers = [r["reward_model"]["ground_truth"]["target"][0] for r in self.rows]
        other = next((a for a in answers if a != gold), "Nowhere")  # another question's answer
        return [queries + [f"<answer> {gold} </answer>"], queries + [f"<answer> {other} </answer>"], ["hmm ."]][i % 3]

    async def generate(self, request_id, prompt_ids, sampling_params):
        i = int(request_id.removeprefix("eval").split(".")[0])
        done = self.tok.decode(prompt_ids).count("</information>")  # observations so far (the prompt has none)
        ids = self.tok.encode(self.turns(i)[done], add_special_tokens=False)
        return SimpleNamespace(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})


def cli(tmp_path, *extra, model=str(SHIPPED), data=None, url="http://127.0.0.1:9/retrieve"):
    data = data or [str(tmp_path / "none.parquet")]
    return main(["--model", model, "--data", *data, "--out", str(tmp_path / "o"), "--retriever-url", url, *extra])


def fake_fsdp_checkpoint(root: Path, with_hf_weights: bool = False) -> Path:
    """`global_step_1/actor` as verl's FSDP checkpoint manager lays it out (world size 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = root / "exp" / "global_step_1" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED))
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    model.config.save_pretrained(actor / "huggingface")
    AutoTokenizer.from_pretrained(str(SHIPPED)).save_pretrained(actor / "huggingface")
    if with_hf_weights:
        model.save_pretrained(actor / "huggingface")
    return actor
