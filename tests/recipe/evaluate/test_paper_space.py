"""Evaluation under the paper's action space: taken from the checkpoint's run record like the other agent settings,
rolled out with the search results' ids and the retriever's pages, and refused against a retriever without pages."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from recipe.carl.evaluate import cli
from recipe.carl.evaluate.runner import Evaluator
from recipe.carl.run_record import write_run_record
from recipe.carl.search.pages import PageStore
from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.search.server import serve_in_thread
from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from recipe.carl.synthhop.pages import PagesConfig
from tests.recipe.evaluate.test_recorded_settings import main_json


class PaperServer:
    """Every question: search its first hop, open the subject's page, read on once, answer the gold answer."""

    def __init__(self, tokenizer, rows):
        self.tok, self.rows = tokenizer, rows

    async def generate(self, request_id, prompt_ids, sampling_params):
        row = self.rows[int(request_id.removeprefix("eval").split(".")[0])]
        subject = row["extra_info"]["oracle_path"][0]
        turns = [f"<search> {row['extra_info']['oracle_queries'][0]} </search>", f"<access> {subject} </access>"]
        turns += ["<read> </read>", f"<answer> {row['reward_model']['ground_truth']['target'][0]} </answer>"]
        ids = self.tok.encode(turns[self.tok.decode(prompt_ids).count("</information>")], add_special_tokens=False)
        return SimpleNamespace(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})


@pytest.fixture(scope="module")
def pages_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pages")
    data = build(SynthHopConfig(n_entities=300, n_train=20, n_test=6, pages=PagesConfig(), max_turns=14))
    write(data, out)
    return out, data.tokenizer


@pytest.fixture
def recorded_paper_checkpoint(tmp_path, pages_data):
    """`global_step_1/actor` of a run that trained the paper's action space: a tiny policy with the pages variant's
    tokenizer (it has `<access>` and `<read>`) and the record its trainer writes."""
    from recipe.carl.tiny.policy import TinyPolicyConfig, build_tiny_policy, save_policy

    actor = tmp_path / "run" / "exp" / "global_step_1" / "actor"
    tok = pages_data[1]
    shape = TinyPolicyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_policy(build_tiny_policy(tok, shape, seed=0), tok, actor / "huggingface")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    agent = {"max_actions": 8, "max_action_tokens": 32, "prompt_length": 256, "response_length": 768, "topk": 2}
    agent.update(action_space="paper", page_chunk_chars=64, snippet_words=5)
    write_run_record({"format": 1, "agent": agent, "sources": {}}, actor.parent)
    return actor


def test_a_paper_checkpoint_is_evaluated_with_access_and_read(tmp_path, pages_data, recorded_paper_checkpoint,
                                                              monkeypatch):  # fmt: skip
    seen = []

    async def evaluate_model(folder, datasets, settings, engine, search, reward_fn, engine_options=None, done=None,
                             on_record=None, access=None):  # fmt: skip
        from transformers import AutoTokenizer

        seen.append((settings, access))
        tok = AutoTokenizer.from_pretrained(str(folder))
        evaluator = Evaluator(PaperServer(tok, datasets["synthhop"]), tok, search, reward_fn, settings, access=access)
        return {"synthhop": await evaluator.evaluate_rows(datasets["synthhop"])}

    monkeypatch.setattr(cli, "evaluate_model", evaluate_model)
    data_dir = pages_data[0]
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data_dir / "corpus.jsonl")))
    out = tmp_path / "eval"
    argv = ["--model", str(recorded_paper_checkpoint), "--data", str(data_dir / "test.parquet"), "--limit", "2"]
    argv += ["--engine", "hf", "--out", str(out)]
    with serve_in_thread(retriever, pages=PageStore(retriever.corpus)) as url:
        results = main_json(out, [*argv, "--retriever-url", f"{url}/retrieve"])
    ((settings, access),) = seen
    assert (settings.action_space, settings.page_chunk_chars, settings.snippet_words) == ("paper", 64, 5)
    assert access is not None and "search/access/read/answer" in results["settings_summary"]
    (line,) = [json.loads(x) for x in next(out.glob("*/synthhop.jsonl")).read_text().splitlines()[:1]]
    actions = line["samples"][0]["actions"]
    assert [a["kind"] for a in actions] == ["search", "access", "read", "answer"]
    assert "( id :" in actions[0]["observation"] and actions[1]["page_id"] == actions[1]["text"].split()[1]
    assert "part 1 of" in actions[1]["observation"] and actions[2]["part"] == 2
    assert line["samples"][0]["finish_reason"] == "answer" and line["em"] == 1.0
    # The same checkpoint against a retriever that serves no pages: refused before any model loads.
    with serve_in_thread(retriever) as url, pytest.raises(SystemExit, match="serves none: restart it with --pages"):
        cli.main([*argv, "--retriever-url", f"{url}/retrieve", "--overwrite"])


def test_the_action_space_flags_are_checked():
    from recipe.carl.evaluate.settings import EvalError, EvalSettings

    with pytest.raises(EvalError, match="--action-space pages: use search_r1 or paper"):
        EvalSettings(action_space="pages")
    with pytest.raises(EvalError, match="--page-chunk-chars 0 / --snippet-words None: must be >= 1"):
        EvalSettings(page_chunk_chars=0)
