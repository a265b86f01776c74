"""`main_carl.run_carl` up to the hand-over to verl's `run_ppo` (stubbed): what the start-up checks stop, and what the
Ray workers are handed (issue 13: retriever health, worker environment, config paths, mini-batch split, bad rows).

Only `recipe.carl.main_carl` is imported from the recipe, so these tests also run against a main_carl without the
checks, and fail there.
"""

from __future__ import annotations

import os
import pathlib
import socket

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipe.carl.main_carl import run_carl
from recipe.carl.search.server import serve_in_thread

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "recipe/carl/config")
TOOL_YAML = "recipe/carl/search/search_tool.yaml"
AGENT_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
TOOL_KEY = "actor_rollout_ref.rollout.multi_turn.tool_config_path"
# What verl's validate_config needs beyond the recipe's yaml (the run scripts set the same).
BASE = [
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "trainer.val_before_train=False",
    "trainer.logger=[console,file]",  # wandb: its own test below
]


def compose_carl(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="carl_trainer", overrides=[*BASE, *overrides])


def toy_search(queries, topk):
    return [[{"document": {"id": "0", "contents": "T\nx"}, "score": 1.0}] for _ in queries]


@pytest.fixture(autouse=True)
def launching_directory(monkeypatch, tmp_path):
    """Launch from a temporary folder: the default checkpoint folder (relative) is created there, where the driver
    writes its probe file (`preflight.record_driver_view`)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def launched(monkeypatch):
    """The configs `run_carl` hands to verl's `run_ppo` (stubbed, and `ray.init` with it: nothing starts)."""
    configs = []
    monkeypatch.setattr("verl.trainer.main_ppo.run_ppo", lambda config, task_runner_class: configs.append(config))
    monkeypatch.setattr("ray.init", lambda **kwargs: None)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    return configs


@pytest.fixture
def retriever_url(monkeypatch):
    """A live retriever, named to the driver only through RETRIEVER_URL (as the run scripts do)."""
    with serve_in_thread(search_fn=toy_search) as base:
        url = f"{base}/retrieve"
        monkeypatch.setenv("RETRIEVER_URL", url)
        yield url


def dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/retrieve"


def test_workers_get_absolute_config_paths(launched, retriever_url, monkeypatch, tmp_path):
    """The scripts' relative paths exist from the launching directory, but not from a worker's on another node."""
    (tmp_path / "recipe").symlink_to(ROOT / "recipe")  # the scripts' relative paths, from the launching directory
    assert not os.path.isabs(compose_carl().actor_rollout_ref.rollout.agent.agent_loop_config_path)
    run_carl(compose_carl(f"{TOOL_KEY}={TOOL_YAML}", "trainer.default_local_dir=ckpt/run"))
    [config] = launched
    for key in (AGENT_KEY, TOOL_KEY):
        path = OmegaConf.select(config, key)
        assert os.path.isabs(path) and os.path.isfile(path) and path.startswith(str(tmp_path)), (key, path)
    assert config.trainer.default_local_dir == str(tmp_path / "ckpt/run")


def test_config_paths_resolve_from_another_launching_directory(launched, retriever_url, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run_carl(compose_carl(f"{TOOL_KEY}={TOOL_YAML}"))
    assert OmegaConf.select(launched[0], TOOL_KEY) == str(ROOT / TOOL_YAML)


def test_a_missing_tool_yaml_is_named(launched, retriever_url, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="tool_config_path=recipe/carl/search/nope.yaml.*does not exist"):
        run_carl(compose_carl(f"{TOOL_KEY}=recipe/carl/search/nope.yaml"))
    assert launched == []


def test_workers_get_the_drivers_retriever_url(launched, retriever_url):
    """verl forwards a fixed list of variables; on another node the tool yaml would fall back to 127.0.0.1:8000."""
    run_carl(compose_carl(f"{TOOL_KEY}={TOOL_YAML}"))
    env_vars = launched[0].ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars["RETRIEVER_URL"] == retriever_url


def test_a_loopback_retriever_is_refused_on_several_nodes(launched, retriever_url):
    overrides = (f"{TOOL_KEY}={TOOL_YAML}", "trainer.nnodes=2", "trainer.n_gpus_per_node=8")
    with pytest.raises(Exception, match=f"{retriever_url}.*loopback.*trainer.nnodes=2.*RETRIEVER_URL="):
        run_carl(compose_carl(*overrides))
    assert launched == []


def test_a_dead_retriever_stops_the_run_before_any_worker(launched, monkeypatch):
    url = dead_url()
    monkeypatch.setenv("RETRIEVER_URL", url)
    with pytest.raises(Exception, match=f"retriever at {url} does not answer"):
        run_carl(compose_carl(f"{TOOL_KEY}={TOOL_YAML}"))
    assert launched == []


def test_a_run_without_search_tool_skips_the_retriever_check(launched, monkeypatch):
    monkeypatch.setenv("RETRIEVER_URL", dead_url())
    run_carl(compose_carl())
    assert len(launched) == 1


GRPO = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=16"]


@pytest.mark.parametrize("estimator", [[], GRPO], ids=["carl", "grpo"])
def test_an_update_size_in_rows_stops_the_run(launched, estimator):
    """ppo_mini_batch_size counts questions per update: 256 (the old setting in rows) with 128 questions a step."""
    overrides = ["data.train_batch_size=128", "actor_rollout_ref.actor.ppo_mini_batch_size=256", *estimator]
    with pytest.raises(Exception, match=r"ppo_mini_batch_size=256 counts questions .* is more than .*=128 \(1 update"):
        run_carl(compose_carl(*overrides))
    assert launched == []


@pytest.mark.parametrize("estimator", [[], GRPO], ids=["carl", "grpo"])
def test_18_gpus_take_updates_their_ranks_cannot_split_evenly(launched, estimator):
    """16 questions (x 16 chains) per update on 3 nodes x 6 GPUs: the CARL trainer pads each update to a multiple of
    18 rows, so the run starts (verl's own schedule would stop at its `mini_batch_size % dp == 0` assert)."""
    sizes = ["data.train_batch_size=128", "actor_rollout_ref.actor.ppo_mini_batch_size=16"]
    run_carl(compose_carl("trainer.nnodes=3", "trainer.n_gpus_per_node=6", *sizes, *estimator))
    assert len(launched) == 1
    with pytest.raises(Exception, match="do not divide among 18 data-parallel ranks.*trainer_mode=carl"):
        run_carl(
            compose_carl("trainer.nnodes=3", "trainer.n_gpus_per_node=6", *sizes, *GRPO, "trainer.v1.trainer_mode=sync")
        )


def test_bad_training_rows_stop_the_run_naming_file_and_row(launched, tmp_path):
    good = {
        "data_source": "x",
        "prompt": [{"role": "user", "content": "Who wrote Hamlet?"}],
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Shakespeare"]}},
        "extra_info": {"index": 0},
        "agent_name": "carl_agent",
    }
    rows = [
        good,
        {**good, "reward_model": {"style": "rule", "ground_truth": None}},
        {**good, "agent_name": "carl_agnt"},
    ]
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(Exception, match=r"(?s)2 data rows.*train.parquet row 1.*ground_truth.*row 2.*carl_agnt"):
        run_carl(compose_carl(f"data.train_files={path}"))
    assert launched == []


def test_wandb_without_credentials_stops_the_run_before_any_worker(launched, monkeypatch, tmp_path):
    """The recipe's default loggers include wandb: no key, no netrc entry, not offline -> stopped in the driver."""
    for name in [n for n in os.environ if n.startswith("WANDB_") or n == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    wandb = "trainer.logger=[console,file,wandb]"
    with pytest.raises(Exception, match=r"wandb has no credentials for https://api.wandb.ai.*WANDB_MODE=offline"):
        run_carl(compose_carl(wandb))
    assert launched == []
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")  # `wandb login`
    run_carl(compose_carl(wandb))
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_carl(compose_carl(wandb))
    assert len(launched) == 2
