"""`recipe.carl.preflight`: the start-up checks one by one (paths, batch split, data rows, worker env, retriever)."""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import recipe.carl.plugin  # noqa: F401  (registers the carl agent loops, as in main_carl)
from carl_core import CARLConfigError
from recipe.carl import preflight
from recipe.carl.search.server import serve_in_thread

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "recipe/carl/config")
TOOL = "actor_rollout_ref.rollout.multi_turn.tool_config_path"


def compose_carl(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="carl_trainer", overrides=list(overrides))


def row(**changes):
    base = {
        "data_source": "searchR1_nq",
        "prompt": [{"role": "system", "content": "Search."}, {"role": "user", "content": "Who wrote Hamlet?"}],
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Shakespeare", "William Shakespeare"]}},
        "extra_info": {"index": 7, "question": "Who wrote Hamlet?"},
        "agent_name": "carl_agent",
    }
    return {**base, **changes}


def write_rows(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


# ---- paths ---------------------------------------------------------------------------------------------------


def test_relative_paths_are_found_from_the_launching_directory_then_the_project(tmp_path):
    (tmp_path / "tools.yaml").write_text("tools: []\n")
    cfg = compose_carl(f"{TOOL}=tools.yaml", "trainer.default_local_dir=out", "actor_rollout_ref.model.path=Qwen/X")
    preflight.resolve_paths(cfg, cwd=str(tmp_path))
    assert OmegaConf.select(cfg, TOOL) == str(tmp_path / "tools.yaml")
    agent_yaml = cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path
    assert agent_yaml == str(ROOT / "recipe/carl/config/carl_agent_loop.yaml")  # not in tmp_path: the project's
    assert cfg.trainer.default_local_dir == str(tmp_path / "out")
    assert cfg.actor_rollout_ref.model.path == "Qwen/X"  # a hub id stays as it is


def test_data_and_model_paths_become_absolute_when_they_exist(tmp_path):
    (tmp_path / "model").mkdir()
    train = write_rows(tmp_path / "train.parquet", [row()])
    cfg = compose_carl("data.train_files=[train.parquet,hdfs://x/y.parquet]", "actor_rollout_ref.model.path=model")
    preflight.resolve_paths(cfg, cwd=str(tmp_path))
    assert list(cfg.data.train_files) == [train, "hdfs://x/y.parquet"]
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "model")


def test_a_required_file_that_exists_nowhere_is_named(tmp_path):
    cfg = compose_carl("reward.custom_reward_function.path=my_reward.py")
    with pytest.raises(CARLConfigError, match=r"reward.custom_reward_function.path=my_reward.py: the reward function"):
        preflight.resolve_paths(cfg, cwd=str(tmp_path))
    cfg = compose_carl(f"{TOOL}=/nonexistent/tools.yaml")
    with pytest.raises(CARLConfigError, match="tool_config_path=/nonexistent/tools.yaml: the tool yaml does not exist"):
        preflight.resolve_paths(cfg, cwd=str(tmp_path))


# ---- batch ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mini_batch", "n", "dp", "fix"),
    [
        (256, 1, 18, "252 or 270"),  # verl's own trainer modes: rows
        (16, 16, 18, "9 or 18"),  # prompts x 16
        (256, 1, 512, "512"),  # fewer rows than ranks: only the next size up
    ],
)
def test_batch_message_names_the_nearest_sizes(mini_batch, n, dp, fix):
    message = preflight.batch_message(mini_batch, n, dp, 1, dp)
    assert f"ppo_mini_batch_size={fix}, " in message
    for size in fix.split(" or "):
        assert int(size) * n % dp == 0


@pytest.mark.parametrize(
    ("questions", "batch", "fix"),
    [
        (256, 128, "128 (1 update a step)"),  # the old setting in rows
        (48, 128, "32 (4 updates a step) or 64 (2 updates a step)"),
        (0, 64, "1 (64 updates a step)"),
    ],
)
def test_updates_message_names_the_nearest_sizes(questions, batch, fix):
    message = preflight.updates_message(questions, batch)
    assert f"ppo_mini_batch_size={fix}: " in message
    for size in fix.replace(" or ", ",").split(","):
        assert batch % int(size.split()[0]) == 0


def test_the_carl_trainer_checks_questions_and_verls_checks_rows():
    carl = compose_carl("data.train_batch_size=128", "actor_rollout_ref.actor.ppo_mini_batch_size=16")
    assert preflight.updates_message(16, 128) is None
    preflight.check_batch(carl)  # 8 updates; rows are padded to the ranks by the CARL trainer
    OmegaConf.update(carl, "trainer.n_gpus_per_node", 6)
    OmegaConf.update(carl, "trainer.nnodes", 3)
    preflight.check_batch(carl)
    OmegaConf.update(carl, "trainer.v1.trainer_mode", "sync")  # verl's own schedule: 16 rows on 18 ranks
    with pytest.raises(CARLConfigError, match="16 rows per update do not divide among 18 data-parallel ranks"):
        preflight.check_batch(carl)


def test_divisible_batches_and_sequence_parallelism_pass():
    assert preflight.batch_message(256, 1, 8, 1, 8) is None
    cfg = compose_carl(
        "trainer.nnodes=3",
        "trainer.n_gpus_per_node=6",
        "actor_rollout_ref.actor.ppo_mini_batch_size=256",
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=18",
    )
    assert preflight.data_parallel_size(cfg) == 1
    preflight.check_batch_divisibility(cfg)


# ---- data ----------------------------------------------------------------------------------------------------


def ground_truth(value):
    return {"reward_model": {"style": "rule", "ground_truth": value}}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"reward_model": {"style": "rule"}}, "missing reward_model.ground_truth"),
        (ground_truth({"aug_target": ["x"]}), r"target is null"),  # parquet gives the other rows' keys as nulls
        (ground_truth({"target": []}), "no ground-truth answer"),
        (ground_truth({"target": ["", " "]}), "empty ground-truth answer"),
        ({"prompt": [{"role": "user", "content": "  "}]}, "empty question"),
        ({"prompt": [{"role": "system", "content": "x"}]}, "no user message"),
        ({"prompt": []}, "not a non-empty chat list"),
        ({"extra_info": {"index": 7, "question": ""}}, "empty question .extra_info.question"),
        ({"agent_name": "carl_tree_agent"}, "unknown agent_name 'carl_tree_agent'"),  # removed from the recipe
        ({"agent_name": ""}, "empty agent_name"),
    ],
)
def test_each_bad_row_is_named_by_file_and_row(changes, problem, tmp_path):
    path = write_rows(tmp_path / "train.parquet", [row(), row(**changes), row()])
    with pytest.raises(CARLConfigError, match=rf"1 data rows.*\n  data.train_files {path} row 1 .extra_info.index="):
        preflight.check_data(compose_carl(f"data.train_files={path}"))
    with pytest.raises(CARLConfigError, match=problem):
        preflight.check_data(compose_carl(f"data.train_files={path}"))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"answer": "x"}, "has no 'target'"),
        ({"target": [3]}, "non-string ground-truth answer 3"),
        (42, "answers must be strings, got int 42"),
    ],
)
def test_ground_truths_of_another_type_are_named(value, problem, tmp_path):
    """A column of one type throughout (parquet cannot mix types in a column)."""
    path = write_rows(tmp_path / "train.parquet", [row(**ground_truth(value))])
    with pytest.raises(CARLConfigError, match=f"row 0 .extra_info.index=7.: .*{problem}"):
        preflight.check_data(compose_carl(f"data.train_files={path}"))


@pytest.mark.parametrize("value", [{"target": ["Paris", "paris"]}, "Paris", ["Paris", "Lutetia"]])
def test_good_rows_pass(value, tmp_path):
    path = write_rows(tmp_path / "train.parquet", [row(**ground_truth(value))] * 3)
    [report] = preflight.check_data(compose_carl(f"data.train_files={path}"))
    assert report.rows == 3 and report.bad == []


def test_the_error_lists_ten_rows_and_counts_all(tmp_path):
    path = write_rows(tmp_path / "train.parquet", [row(agent_name="nope")] * 25)
    with pytest.raises(CARLConfigError) as error:
        preflight.check_data(compose_carl(f"data.train_files={path}"))
    assert str(error.value).startswith("25 data rows cannot be trained on")
    assert str(error.value).count("unknown agent_name") == 10 and "and 15 more" in str(error.value)
    assert "algorithm.carl.bad_rows=skip" in str(error.value)


def test_skip_trains_on_a_filtered_copy_and_lists_the_skipped_rows(tmp_path):
    path = write_rows(
        tmp_path / "train.parquet", [row(), row(reward_model={"style": "rule"}), row(), row(agent_name="x")]
    )
    cfg = compose_carl(
        f"data.train_files={path}", "algorithm.carl.bad_rows=skip", f"trainer.default_local_dir={tmp_path}"
    )
    preflight.check_data(cfg)
    copy = cfg.data.train_files
    assert copy != path and pathlib.Path(copy).parent == tmp_path / "carl_data"
    assert pq.read_table(copy).num_rows == 2 and pq.read_table(path).num_rows == 4
    skipped = [json.loads(line) for line in (tmp_path / "carl_data/skipped_rows.jsonl").read_text().splitlines()]
    assert [(s["file"], s["row"]) for s in skipped] == [(path, 1), (path, 3)]
    preflight.check_data(cfg)  # the copy itself is clean


def test_skip_refuses_a_file_with_no_good_row(tmp_path):
    path = write_rows(tmp_path / "train.parquet", [row(reward_model={"style": "rule"})])
    cfg = compose_carl(
        f"data.train_files={path}", "algorithm.carl.bad_rows=skip", f"trainer.default_local_dir={tmp_path}"
    )
    with pytest.raises(CARLConfigError, match="none of its 1 rows"):
        preflight.check_data(cfg)


def test_unknown_bad_rows_mode_is_refused():
    with pytest.raises(CARLConfigError, match="algorithm.carl.bad_rows='ignore' is unknown"):
        preflight.read_settings(compose_carl("algorithm.carl.bad_rows=ignore"))


def write_agents(path, agent_names):
    frame = pd.DataFrame([row() for _ in agent_names])
    if agent_names and agent_names[0] is not None:
        frame["agent_name"] = agent_names
    else:
        frame = frame.drop(columns=["agent_name"])
    frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize(
    ("agents", "estimator", "refused"),
    [
        (["carl_chain_agent", "carl_chain_agent"], "carl", None),
        (["carl_chain_agent", "carl_agent"], "carl", "carl_agent"),
        ([None], "carl", "carl_agent"),  # no agent_name column: the yaml's default_agent_loop (carl_agent) applies
        (["carl_agent"], "grpo", None),  # one trajectory per question under GRPO
    ],
)
def test_val_rows_must_not_grow_trees(agents, estimator, refused, tmp_path):
    val = write_agents(tmp_path / "val.parquet", agents)
    extra = ["actor_rollout_ref.rollout.n=16"] if estimator == "grpo" else []
    cfg = compose_carl(f"data.val_files={val}", f"algorithm.adv_estimator={estimator}", *extra)
    if refused is None:
        preflight.check_data(cfg)
    else:
        with pytest.raises(CARLConfigError, match=f"val.parquet: rows name agent loop {refused}.*carl_chain_agent"):
            preflight.check_data(cfg)


def test_val_rows_are_not_checked_when_the_run_never_validates(tmp_path):
    val = write_agents(tmp_path / "val.parquet", ["carl_agent"])
    preflight.check_data(
        compose_carl(f"data.val_files={val}", "trainer.val_before_train=False", "trainer.test_freq=-1")
    )
    with pytest.raises(CARLConfigError, match="rows name agent loop carl_agent"):
        preflight.check_data(
            compose_carl(f"data.val_files={val}", "trainer.val_before_train=False", "trainer.test_freq=5")
        )


def test_missing_files_are_left_to_verl():
    assert preflight.check_data(compose_carl("data.val_files=[/nonexistent/val.parquet]")) == []


# ---- worker environment --------------------------------------------------------------------------------------


def test_the_drivers_variables_are_forwarded_and_explicit_ones_win(tmp_path):
    cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
    environ = {"RETRIEVER_URL": "http://10.0.0.5:8000/retrieve", "VERL_FILE_LOGGER_PATH": "m.jsonl", "HOME": "/h"}
    added = preflight.forward_environment(cfg, environ)
    assert added == {"RETRIEVER_URL": environ["RETRIEVER_URL"], "VERL_FILE_LOGGER_PATH": os.path.abspath("m.jsonl")}
    assert preflight.runtime_env_vars(cfg) == added
    cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
    OmegaConf.update(
        cfg, "ray_kwargs.ray_init.runtime_env", {"env_vars": {"RETRIEVER_URL": "http://b:1/r"}}, force_add=True
    )
    preflight.forward_environment(cfg, environ)
    assert preflight.runtime_env_vars(cfg)["RETRIEVER_URL"] == "http://b:1/r"
    assert preflight.retriever_urls(cfg, environ) == ["http://b:1/r"]  # what the workers will resolve


def test_nccl_settings_are_forwarded_as_wandb_ones_are():
    """Without them, workers on a node started with `ray start` use that shell's NCCL interface, or NCCL's guess."""
    environ = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "WANDB_MODE": "offline", "NCCLX": "no"}
    cfg = compose_carl()
    added = preflight.forward_environment(cfg, environ)
    assert added == {k: v for k, v in environ.items() if k != "NCCLX"}
    # a node-specific value set in the job's env_vars block stays (docs/several_nodes.md)
    cfg = compose_carl("+ray_kwargs.ray_init.runtime_env.env_vars.NCCL_SOCKET_IFNAME='^lo,docker'")
    preflight.forward_environment(cfg, environ)
    assert preflight.runtime_env_vars(cfg)["NCCL_SOCKET_IFNAME"] == "^lo,docker"


def test_the_tool_yamls_own_variables_are_forwarded(tmp_path):
    tools = tmp_path / "tools.yaml"
    tools.write_text(
        "tools:\n  - class_name: x.Y\n    config: {type: native, retrieval_service_url: '${oc.env:MY_SEARCH,http://h:1}'}\n"
    )
    cfg = compose_carl(f"{TOOL}={tools}")
    assert preflight.forward_environment(cfg, {"MY_SEARCH": "http://search:9"}) == {"MY_SEARCH": "http://search:9"}
    assert preflight.retriever_urls(cfg, {}) == ["http://search:9/retrieve"]


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000/retrieve", True),
        ("http://localhost:8000/retrieve", True),
        ("http://[::1]:8000/retrieve", True),
        ("http://0.0.0.0:8000/retrieve", True),
        ("http://10.1.2.3:8000/retrieve", False),
        ("http://retriever.internal:8000/retrieve", False),
    ],
)
def test_loopback_urls(url, loopback):
    assert preflight.is_loopback(url) is loopback


def test_loopback_is_refused_only_on_several_nodes():
    tool = f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml"
    preflight.forward_environment(compose_carl(tool, "trainer.nnodes=1"), {})  # default 127.0.0.1:8000, one node
    with pytest.raises(CARLConfigError, match=r"http://127.0.0.1:8000/retrieve is a loopback address.*nnodes=2"):
        preflight.forward_environment(compose_carl(tool, "trainer.nnodes=2"), {})
    preflight.forward_environment(compose_carl(tool, "trainer.nnodes=2"), {"RETRIEVER_URL": "http://10.0.0.2:8000"})


# ---- retriever -----------------------------------------------------------------------------------------------


def toy_search(queries, topk):
    return [[{"document": {"id": "0", "contents": "T\nx"}, "score": 1.0}] for _ in queries]


def test_the_retriever_is_checked_at_the_url_the_workers_resolve(monkeypatch):
    with serve_in_thread(search_fn=toy_search) as base:
        monkeypatch.setenv("RETRIEVER_URL", base)  # a bare base URL: the client appends /retrieve, as in the workers
        cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
        assert preflight.check_retriever(cfg) == [f"{base}/retrieve"]


def test_a_run_without_retriever_tool_is_not_checked(tmp_path):
    assert preflight.check_retriever(compose_carl()) == []
    tools = tmp_path / "tools.yaml"
    tools.write_text("tools:\n  - class_name: x.Y\n    config: {type: native}\n")
    assert preflight.check_retriever(compose_carl(f"{TOOL}={tools}")) == []


def test_an_unreachable_retriever_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("RETRIEVER_URL", "http://127.0.0.1:9/retrieve")
    cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
    with pytest.raises(preflight.RetrieverUnavailableError, match=r"127.0.0.1:9/retrieve does not answer.*launch_"):
        preflight.check_retriever(cfg, timeout=2)
    monkeypatch.setenv(preflight.SKIP_RETRIEVER_ENV, "1")
    assert preflight.check_retriever(cfg) == []


class _SearchR1Handler(http.server.BaseHTTPRequestHandler):
    """Search-R1's retrieval_server.py answers POST /retrieve only (FastAPI: 404 for any other path)."""

    def do_GET(self):
        self.send_error(404)

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        queries = json.loads(self.rfile.read(length))["queries"]
        body = json.dumps({"result": [[{"document": {"contents": "T\nx"}, "score": 1.0}] for _ in queries]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_without_health_passes_if_it_searches(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SearchR1Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("RETRIEVER_URL", f"http://127.0.0.1:{server.server_address[1]}/retrieve")
        cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
        assert len(preflight.check_retriever(cfg)) == 1
    finally:
        server.shutdown()


def test_a_retriever_that_starts_late_is_waited_for_when_asked(monkeypatch):
    import socket

    from recipe.carl.search import client

    with socket.socket() as sock:  # a free port, for a retriever that starts 1 s after the check
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    starting, stop = threading.Event(), threading.Event()

    def late_server():
        stop.wait(1.0)
        starting.set()  # before the server can answer: set inside `with`, the check could return first (a race)
        with serve_in_thread(search_fn=toy_search, port=port):
            stop.wait(30)

    thread = threading.Thread(target=late_server, daemon=True)
    monkeypatch.setenv("RETRIEVER_URL", f"http://127.0.0.1:{port}/retrieve")
    monkeypatch.setattr(client, "WAIT_EVERY_S", 0.2)
    cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
    with pytest.raises(preflight.RetrieverUnavailableError, match="CARL_RETRIEVER_WAIT_S=600 waits"):
        preflight.check_retriever(cfg, timeout=2)  # no wait by default: a wrong URL fails at once
    monkeypatch.setenv(client.RETRIEVER_WAIT_ENV, "20")
    thread.start()
    try:
        assert preflight.check_retriever(cfg, timeout=2) == [f"http://127.0.0.1:{port}/retrieve"]
        assert starting.is_set()  # the answer came from the late server: the check waited for it
    finally:
        stop.set()
        thread.join(10)


def test_a_bad_wait_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("CARL_RETRIEVER_WAIT_S", "soon")
    cfg = compose_carl(f"{TOOL}={ROOT}/recipe/carl/search/search_tool.yaml")
    with pytest.raises(CARLConfigError, match="CARL_RETRIEVER_WAIT_S='soon'"):
        preflight.check_retriever(cfg)
