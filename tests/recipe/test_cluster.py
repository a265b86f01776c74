"""`recipe.carl.cluster`: the start-up checks inside the Ray cluster (issue 22, item 5), without a cluster.

What each node sees comes from the real `node_view` on this machine's files; the cluster (`ray.nodes()`, the pinned
tasks) is a stand-in. `tests/recipe/cpu/test_multinode_cpu.py` runs the same checks on a real two-node cluster.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from hydra import compose, initialize_config_dir

import recipe.carl.cluster as cluster
from carl_core import CARLConfigError
from recipe.carl import preflight

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOL = f"actor_rollout_ref.rollout.multi_turn.tool_config_path={ROOT}/recipe/carl/search/search_tool.yaml"


def compose_carl(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "recipe/carl/config"), version_base=None):
        return compose(config_name="carl_trainer", overrides=list(overrides))


def node(ip: str, node_id: str, cpus: float = 16.0) -> dict:
    return {"NodeID": node_id * 7, "NodeManagerAddress": ip, "Alive": True, "Resources": {"CPU": cpus}}


class FakeRay:
    """`ray.is_initialized` / `ray.nodes` of a cluster."""

    def __init__(self, nodes):
        self._nodes = nodes

    def is_initialized(self):
        return True

    def nodes(self):
        return self._nodes


def driver_run(tmp_path, *overrides: str):
    """A config after the driver's preflight steps that matter here: a data file, a checkpoint folder, the view."""
    data = tmp_path / "train.parquet"
    data.write_bytes(b"x" * 100)
    cfg = compose_carl(f"data.train_files={data}", f"trainer.default_local_dir={tmp_path / 'ckpt'}", *overrides)
    cfg.trainer.val_before_train = False
    view = preflight.record_driver_view(cfg)
    return cfg, view, {preflight.VIEW_ENV: json.dumps(view)}


def use_cluster(monkeypatch, nodes, blind=()):
    """The stand-in cluster; nodes whose id is in `blind` see none of the driver's files."""
    monkeypatch.setattr(cluster, "ray", FakeRay(nodes))

    def problems(view, workers):
        found = []
        for n in workers:
            paths = [e["path"] for e in view["paths"]]
            probe = (view.get("probe") or {}).get("path")
            seen = cluster.node_view(paths, probe) if n["NodeID"] not in blind else cluster.node_view([], None)
            found += cluster.view_problems(view, n, seen)
        return found

    monkeypatch.setattr(cluster, "shared_file_problems", problems)


def test_the_driver_view_names_the_files_workers_open(tmp_path):
    cfg, view, env = driver_run(tmp_path, TOOL)
    probe = tmp_path / "ckpt" / preflight.PROBE_NAME
    assert view["probe"] == {"key": "trainer.default_local_dir", "path": str(probe), "token": probe.read_text()}
    paths = {e["key"]: (e["path"], e["size"]) for e in view["paths"]}
    assert paths["data.train_files"] == (str(tmp_path / "train.parquet"), 100)
    tool = ROOT / "recipe/carl/search/search_tool.yaml"
    assert paths["actor_rollout_ref.rollout.multi_turn.tool_config_path"] == (str(tool), tool.stat().st_size)
    assert json.loads(preflight.runtime_env_vars(cfg)[preflight.VIEW_ENV]) == view  # it reaches every worker


def test_a_node_that_sees_the_same_files_passes_and_one_that_does_not_is_named(tmp_path):
    cfg, view, _ = driver_run(tmp_path)
    paths = [e["path"] for e in view["paths"]]
    here = node("10.0.0.2", "b")
    assert cluster.view_problems(view, here, cluster.node_view(paths, view["probe"]["path"])) == []
    (tmp_path / "train.parquet").write_bytes(b"y" * 7)  # another copy of the data on that node
    (tmp_path / "ckpt" / preflight.PROBE_NAME).unlink()  # a checkpoint folder of its own
    problems = cluster.view_problems(view, here, cluster.node_view(paths, view["probe"]["path"]))
    assert problems == [
        f"trainer.default_local_dir={tmp_path / 'ckpt'} is not one folder for every node: node 10.0.0.2 (bbbbbbb) "
        f"does not see the file {preflight.PROBE_NAME} the driver wrote into it",
        f"data.train_files {tmp_path / 'train.parquet'}: node 10.0.0.2 (bbbbbbb) sees 7 bytes, the driver 100",
    ]
    (tmp_path / "train.parquet").unlink()
    problems = cluster.view_problems(view, here, cluster.node_view(paths, None))
    assert problems[1].endswith("node 10.0.0.2 (bbbbbbb) does not see it")


def test_unshared_files_stop_the_run_with_the_fix(tmp_path, monkeypatch):
    cfg, view, env = driver_run(tmp_path)
    # A login head (no CPU, no GPU, no shared disk) and a worker node whose disk is its own.
    use_cluster(monkeypatch, [node("10.0.0.1", "a", cpus=0), node("10.0.0.2", "b")], blind={"a" * 7, "b" * 7})
    with pytest.raises(CARLConfigError) as error:
        cluster.check_cluster(cfg, env)
    message = str(error.value)
    assert "node 10.0.0.2 (bbbbbbb) does not see the file" in message and "train.parquet: node 10.0.0.2" in message
    assert "filesystem every node mounts at the same path (e.g. NFS)" in message and "checkpoint merger" in message
    assert "10.0.0.1" not in message  # the head without CPUs or GPUs hosts no worker: not asked


def test_a_loopback_retriever_is_refused_when_the_nodes_are_on_several_hosts(tmp_path, monkeypatch):
    """trainer.nnodes=1 passes the driver's check; the cluster has two hosts."""
    cfg, view, env = driver_run(tmp_path, TOOL, "trainer.nnodes=1")
    env["RETRIEVER_URL"] = "http://127.0.0.1:8000/retrieve"
    preflight.forward_environment(cfg, env)  # the driver's check passes: one node configured
    use_cluster(monkeypatch, [node("10.0.0.1", "a"), node("10.0.0.2", "b")])
    with pytest.raises(CARLConfigError, match=r"127.0.0.1:8000/retrieve is a loopback .* on 2 hosts .*nnodes=1"):
        cluster.check_cluster(cfg, env)
    # Several Ray nodes of one host share its loopback: the run goes on, and the probe file is gone.
    cfg, view, env = driver_run(tmp_path, TOOL, "trainer.nnodes=1")
    env["RETRIEVER_URL"] = "http://127.0.0.1:8000/retrieve"
    use_cluster(monkeypatch, [node("10.0.0.1", "a"), node("10.0.0.1", "b")])
    cluster.check_cluster(cfg, env)
    assert not (tmp_path / "ckpt" / preflight.PROBE_NAME).exists()
    # An address every host reaches passes on two hosts.
    cfg, view, env = driver_run(tmp_path, TOOL, "trainer.nnodes=1")
    env["RETRIEVER_URL"] = "http://10.0.0.1:8000/retrieve"
    use_cluster(monkeypatch, [node("10.0.0.1", "a"), node("10.0.0.2", "b")])
    cluster.check_cluster(cfg, env)


def test_nothing_is_checked_on_one_node_or_without_ray(tmp_path, monkeypatch):
    cfg, view, env = driver_run(tmp_path, TOOL)
    env["RETRIEVER_URL"] = "http://127.0.0.1:8000/retrieve"
    use_cluster(monkeypatch, [node("10.0.0.1", "a")], blind={"a" * 7})
    cluster.check_cluster(cfg, env)
    monkeypatch.setattr(cluster, "ray", type("NoRay", (), {"is_initialized": staticmethod(lambda: False)}))
    cluster.check_cluster(cfg, {})


def test_secrets_are_forwarded_unprinted_and_hidden_from_the_trainers_loggers(capsys, tmp_path, monkeypatch):
    import recipe.carl.trainer as carl_trainer

    environ = {
        "WANDB_API_KEY": "k-123",
        "WANDB_MODE": "offline",
        "HF_TOKEN": "hf-456",
        "HF_HOME": "hf_cache",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "HOME": "/h",
        "HF_": "not a name of the hub",
    }
    cfg = compose_carl("actor_rollout_ref.model.path=/x")
    added = preflight.forward_environment(cfg, environ)
    assert added == {
        "HF_HOME": os.path.abspath("hf_cache"),  # a path: absolute against the launching directory
        "HF_TOKEN": "hf-456",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "WANDB_API_KEY": "k-123",
        "WANDB_MODE": "offline",
    }
    printed = capsys.readouterr().out
    assert "WANDB_API_KEY=***" in printed and "HF_TOKEN=***" in printed and "WANDB_MODE=offline" in printed
    assert "k-123" not in printed and "hf-456" not in printed
    # The TaskRunner's trainer hides them from the config verl hands its loggers (wandb stores it with the run).
    trainer = carl_trainer.CARLTrainer(cfg)
    env = preflight.runtime_env_vars(trainer.config)
    assert env["WANDB_API_KEY"] == env["HF_TOKEN"] == "***" and env["WANDB_MODE"] == "offline"
