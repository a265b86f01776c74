"""`recipe.carl.run_record`: the agent settings of a run, from the config `scripts/run_carl_qwen3_4b.sh` composes,
written by the CARL trainer beside each checkpoint, found from every form of a checkpoint path, and read back
checked."""

from __future__ import annotations

import json
import pathlib

import pytest

import recipe.carl.trainer as carl_trainer
from recipe.carl import preflight
from recipe.carl.run_record import (
    RUN_RECORD,
    find_run_record,
    read_run_record,
    run_record,
    search_topk,
    write_run_record,
)
from recipe.carl.totals import BudgetTotals
from tests.recipe.test_carl_config import compose_carl, script_overrides

ROOT = pathlib.Path(__file__).resolve().parents[2]


def qwen3_run_config(tmp_path: pathlib.Path, *extra: str):
    """The trainer config of `scripts/run_carl_qwen3_4b.sh` (thinking, T_max 10, 2,048-token turns, 16,384-token
    trajectories), with a tool yaml of top-5 and Qwen3's chat-template switch, checkpoints under `tmp_path`."""
    tool = tmp_path / "tool.yaml"
    tool.write_text(
        "tools:\n  - class_name: recipe.carl.search.search_tool.CarlSearchTool\n    config:\n      type: native\n"
        "      retrieval_service_url: ${oc.env:RETRIEVER_URL,http://127.0.0.1:8000/retrieve}\n      topk: 5\n"
    )
    overrides = script_overrides(ROOT / "scripts" / "run_carl_qwen3_4b.sh", tmp_path)
    overrides += [
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool}",
        "+data.apply_chat_template_kwargs.enable_thinking=true",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        *extra,
    ]
    config = compose_carl(overrides)
    preflight.resolve_paths(config, cwd=str(ROOT))  # as main_carl does before the trainer sees the config
    return config


QWEN3_AGENT = {
    "max_actions": 10,
    "max_action_tokens": 2048,
    "thinking": True,
    "invalid_action": "end",
    "action_space": "search_r1",
    "page_chunk_chars": 4000,
    "prompt_length": 2048,  # rollout.prompt_length = ${data.max_prompt_length}
    "response_length": 16384,
    "chat_template_kwargs": {"enable_thinking": True},
    "topk": 5,
}


def test_the_record_holds_the_agent_settings_of_the_qwen3_run(tmp_path):
    record = run_record(qwen3_run_config(tmp_path), global_step=7)
    assert record["agent"] == QWEN3_AGENT
    assert record["global_step"] == 7 and record["adv_estimator"] == "carl" and record["model"] == "Qwen/Qwen3-4B"
    assert record["sources"]["max_actions"] == "algorithm.carl.max_actions"
    assert set(record["sources"]) == set(QWEN3_AGENT)
    json.dumps(record)  # plain JSON, no OmegaConf containers


def test_the_tool_yamls_topk(tmp_path):
    assert search_topk(str(ROOT / "recipe" / "carl" / "search" / "search_tool.yaml")) == 3  # the recipe's own
    assert search_topk(str(tmp_path / "missing.yaml")) is None and search_topk(None) is None
    no_topk = tmp_path / "t.yaml"
    no_topk.write_text("tools:\n  - class_name: x.Y\n    config:\n      retrieval_service_url: http://h/retrieve\n")
    assert search_topk(str(no_topk)) is None  # not recorded: evaluation then uses its default


def test_the_trainer_writes_the_record_into_each_checkpoint_it_saves(tmp_path, monkeypatch):
    config = qwen3_run_config(tmp_path)
    saved = []
    monkeypatch.setattr(carl_trainer.PPOTrainerSync, "_save_checkpoint", lambda self: saved.append(self.global_steps))
    trainer = object.__new__(carl_trainer.CARLTrainer)
    trainer.config, trainer.global_steps = config, 50
    trainer.carl_totals = BudgetTotals()  # set by CARLTrainer.__init__, saved beside the record
    trainer._save_checkpoint()
    assert saved == [50]  # verl's own save ran first
    step_record = tmp_path / "ckpt" / "global_step_50" / RUN_RECORD
    assert json.loads(step_record.read_text()) == run_record(config, 50)
    assert json.loads((tmp_path / "ckpt" / RUN_RECORD).read_text())["global_step"] == 50  # the latest, at the root
    # A resumed run with other settings: its new checkpoints say so, the old ones keep theirs.
    trainer.config = qwen3_run_config(tmp_path, "algorithm.carl.max_actions=12")
    trainer.global_steps = 100
    trainer._save_checkpoint()
    assert read_run_record(tmp_path / "ckpt" / "global_step_100" / RUN_RECORD)["max_actions"] == 12
    assert read_run_record(step_record)["max_actions"] == 10


def test_the_record_is_found_from_every_form_of_a_checkpoint_path(tmp_path):
    run = tmp_path / "ckpt"
    (run / "global_step_1" / "actor" / "huggingface").mkdir(parents=True)
    (run / "global_step_2" / "actor" / "merged_hf").mkdir(parents=True)
    write_run_record({"agent": {"max_actions": 1}}, run / "global_step_1")
    write_run_record({"agent": {"max_actions": 9}}, run)
    step1 = run / "global_step_1" / RUN_RECORD
    for form in ("global_step_1", "global_step_1/actor", "global_step_1/actor/huggingface"):
        assert find_run_record(run / form) == step1, form
    # a step without its own record: the run folder's
    assert find_run_record(run / "global_step_2" / "actor" / "merged_hf") == run / RUN_RECORD
    assert find_run_record(tmp_path) is None and find_run_record("Qwen/Qwen3-4B") is None  # not checkpoints
    (tmp_path / "model").mkdir()
    assert find_run_record(tmp_path / "model") is None


def test_a_bad_record_is_named_with_the_fix(tmp_path):
    path = tmp_path / RUN_RECORD
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"run record {path}: unreadable \(JSONDecodeError.*fix or delete"):
        read_run_record(path)
    path.write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="no `agent` object"):
        read_run_record(path)
    path.write_text(json.dumps({"agent": {"thinking": "yes"}}))
    with pytest.raises(ValueError, match=r"agent.thinking='yes' is not a bool"):
        read_run_record(path)
    path.write_text(json.dumps({"agent": {"max_actions": True}}))
    with pytest.raises(ValueError, match=r"agent.max_actions=True is not a int"):
        read_run_record(path)
    path.write_text(json.dumps({"agent": {"max_actions": 4, "a_newer_key": 1}}))
    assert read_run_record(path) == {"max_actions": 4}  # what this version does not know is left out


def test_the_record_holds_the_paper_action_space_and_the_tools_snippet(tmp_path):
    """run_carl_asearcher_qwen3_4b.sh records the paper's action space; a tool yaml's snippet_words is recorded."""
    overrides = script_overrides(ROOT / "scripts" / "run_carl_asearcher_qwen3_4b.sh", tmp_path)
    record = run_record(compose_carl([*overrides, f"trainer.default_local_dir={tmp_path / 'ckpt'}"]))
    assert record["agent"]["action_space"] == "paper" and record["agent"]["page_chunk_chars"] == 4000
    assert "snippet_words" not in record["agent"]  # pages_tool.yaml shows whole passages (null)
    tool = tmp_path / "pages.yaml"
    tool.write_text(
        "tools:\n  - class_name: recipe.carl.search.search_tool.CarlSearchTool\n    config:\n      type: native\n"
        "      retrieval_service_url: http://127.0.0.1:8000/retrieve\n      topk: 2\n      snippet_words: 5\n"
    )
    record = run_record(compose_carl([*overrides, f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool}"]))
    assert record["agent"]["snippet_words"] == 5 and record["sources"]["snippet_words"].endswith("snippet_words")
