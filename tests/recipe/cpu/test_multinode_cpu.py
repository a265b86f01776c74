"""Simulated multi-node: CARL through `python -m recipe.carl.main_carl` on a Ray cluster of two nodes on this machine.

The head node has no CPU and no GPU (a login node: Ray's own idiom for multi-node tests), so every worker (TaskRunner,
trainer rank, rollout server, agent-loop and reward workers) runs on the second node, which `ray start` launched in
another working directory with a bare environment: only PATH, HOME and the node's installation of the project
(PYTHONPATH), as on a real machine. The driver launches from the repository root with the relative paths the run
scripts use (agent-loop yaml, tool yaml, reward file, policy) and names the retriever only in its own environment
(RETRIEVER_URL). The policy is the shipped SynthHop SFT start, which searches, so the retriever must receive the
second node's searches.

It fails without main_carl's start-up fixes (issue 13, items 1-3): a relative yaml path is not found from the second
node's directory (FileNotFoundError in AgentLoopWorker.__init__), and without RETRIEVER_URL the tool there searches
127.0.0.1:8000. The driver's WANDB_* / HF_* variables must reach the second node's workers too (issue 22, item 5):
a reward function there records what it sees.

A second cluster puts the second node on another address (127.0.0.2: another host, as Ray sees it) and names the
checkpoint folder `/proc/self/cwd/ckpt`, which is a different folder in every process's working directory: a path
that exists on one node only, as on machines without a shared filesystem. With `trainer.nnodes=1`, which the driver's
checks pass, the run must stop in the cluster check (`recipe.carl.cluster`) on both counts.

Slow (~100 s on 2 cores); ``pytest -k multinode`` selects it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/recipe/cpu is a package in this repo; keep working if it stops being one
    from .grpo_smoke import REPO, _kill, _session_pids, run_smoke, serve_retriever
except ImportError:
    from grpo_smoke import REPO, _kill, _session_pids, run_smoke, serve_retriever

pytestmark = pytest.mark.slow

POLICY = "recipe/carl/tiny/checkpoints/sft_seed0"  # relative to the driver's directory, the repository root
WORKER_RESOURCE = "carl_worker_node"
"""A custom resource of the second node: TransferQueue places its storage units round-robin over all alive nodes with
hard node affinity, so without `required_node_resource` a unit may land on the CPU-less head and never start."""
RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bare_environment() -> dict[str, str]:
    """What a fresh machine with the project installed has: no RETRIEVER_URL, no VERL_*, no CARL_*."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(REPO),  # the project, installed on the node
        "RAY_AUTH_MODE": "disabled",
        "LANG": "C.UTF-8",
    }


def ray_start(args: list[str], cwd: Path) -> tuple[int, str]:
    """Runs `ray start` in its own session (its daemons keep that session id); returns the session id and output."""
    proc = subprocess.Popen(
        RAY_START + args, cwd=cwd, env=bare_environment(), start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return proc.pid, out


@contextlib.contextmanager
def two_node_cluster(root: Path, node_ip: str | None = None) -> Iterator[tuple[str, Path]]:
    """A head node without resources and a second node (16 logical CPUs, 1 logical GPU) in `root/node2`.

    Args:
        node_ip: the second node's address; default the head's (one host: Ray resolves 127.0.0.1 to this machine's
            address for the head, and the second node is given the same).

    Yields:
        The cluster address and Ray's temp dir. Every process of both nodes is killed on exit.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="carl-mn-"))  # short: Ray's socket paths must stay under 108 bytes
    head_dir, node_dir = root / "head", root / "node2"
    head_dir.mkdir()
    node_dir.mkdir()
    address = f"127.0.0.1:{free_port()}"
    sessions = []
    try:
        session, out = ray_start(
            [
                "--head",
                "--include-dashboard=false",
                f"--port={address.split(':')[1]}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--object-store-memory=100000000",
                f"--temp-dir={temp_dir}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
            ],
            head_dir,
        )
        sessions.append(session)
        head_ip = re.search(r"Local node IP: (\S+)", re.sub(r"\x1b\[[0-9;]*m", "", out))  # without colour codes
        assert head_ip, out
        session, _ = ray_start(
            [
                f"--address={address}",
                f"--node-ip-address={node_ip or head_ip.group(1)}",
                "--num-cpus=16",
                "--num-gpus=1",
                "--object-store-memory=500000000",
                f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
                f"--dashboard-agent-listen-port={free_port()}",
            ],
            node_dir,
        )
        sessions.append(session)
        yield address, temp_dir
    finally:
        for sid in sessions:
            _kill(_session_pids(sid, str(temp_dir)))
        time.sleep(1.0)
        shutil.rmtree(temp_dir, ignore_errors=True)


def actor_nodes(address: str) -> dict:
    """{"nodes": {node id: logical CPUs}, "actors": {class name: [node ids]}} of the cluster, from Ray's GCS."""
    script = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "actors = {}\n"
        "for a in ray._private.state.actors().values():\n"
        "    actors.setdefault(a['ActorClassName'], []).append(a['Address']['NodeID'])\n"
        "nodes = {n['NodeID']: n['Resources'].get('CPU', 0) for n in ray.nodes()}\n"
        "print(json.dumps({'nodes': nodes, 'actors': actors}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=bare_environment(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthhop(out: Path) -> Path:
    """A small SynthHop set over the shipped policy's knowledge base (seed 0, 300 entities: its vocabulary)."""
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write

    write(build(SynthHopConfig(seed=0, n_entities=300, n_train=16, n_test=4, n_demos=0)), out)
    return out


#: What the driver exports and the second node's workers must see (issue 22, item 5); none is set on that node.
DRIVER_ENV = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
ENV_REWARD = """
import json, os
import ray
from recipe.carl.search.reward import compute_score as project_score

def compute_score(*args, **kwargs):
    seen = {{name: os.environ.get(name) for name in {names!r}}}
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"node": ray.get_runtime_context().get_node_id(), **seen}}) + "\\n")
    return project_score(*args, **kwargs)
"""


def env_reward(folder: Path) -> tuple[Path, Path]:
    """The project's reward, recording the worker's node and its values of `DRIVER_ENV`: (reward file, its log)."""
    log = folder / "reward_env.jsonl"
    path = folder / "env_reward.py"
    path.write_text(ENV_REWARD.format(names=sorted(DRIVER_ENV), log=str(log)))
    return path, log


def test_multinode_carl_runs_its_workers_on_a_second_node(tmp_path):
    from recipe.carl.search.retriever import Retriever, RetrieverConfig

    data = synthhop(tmp_path / "data")
    reward, reward_log = env_reward(tmp_path)
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data / "corpus.jsonl")))
    overrides = [
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}",
        "data.max_response_length=256",
        f"actor_rollout_ref.model.path={POLICY}",
        "actor_rollout_ref.rollout.multi_turn.tool_config_path=recipe/carl/search/search_tool.yaml",
        f"reward.custom_reward_function.path={reward}",
        "actor_rollout_ref.actor.optim.lr=1e-5",
        # Connect to the cluster instead of starting one (its resources are the cluster's).
        "ray_kwargs.ray_init.num_cpus=null",
        "ray_kwargs.ray_init.num_gpus=null",
        f"+transfer_queue.backend.SimpleStorage.required_node_resource={WORKER_RESOURCE}",
    ]
    with serve_retriever(retriever) as (url, searches), two_node_cluster(tmp_path) as (address, temp_dir):
        result = run_smoke(
            steps=2,
            algo="carl",
            workdir=tmp_path / "run",
            cwd=REPO,
            extra_env={"RETRIEVER_URL": url, **DRIVER_ENV},
            timeout_s=480,
            extra_overrides=[
                *overrides,
                f"+ray_kwargs.ray_init.address={address}",
                f"ray_kwargs.ray_init._temp_dir={temp_dir}",
            ],
        )
        placement = actor_nodes(address)

    assert result.returncode == 0 and not result.timed_out, f"see {result.log_path}"
    assert [m["step"] for m in result.metrics] == [1, 2]
    [second] = [node for node, cpus in placement["nodes"].items() if cpus > 0]
    for name in ("TaskRunnerV1", "AgentLoopWorkerTQ"):
        assert set(placement["actors"][name]) == {second}, placement
    # The second node's agent loops searched the retriever only the driver's environment named, and it answered.
    assert sum(searches) > 0 and all(calls > 0 for calls in result.series("search/calls"))
    assert result.series("search/errors") == [0.0, 0.0]
    # The driver's WANDB_* and HF_* variables reached the workers there (the cluster check passed: one host, shared
    # files), and the probe file the driver wrote into the checkpoint folder was removed.
    seen = [json.loads(line) for line in reward_log.read_text().splitlines()]
    assert seen and all(s == {"node": second, **DRIVER_ENV} for s in seen), seen[:3]
    log = Path(result.log_path).read_text(errors="replace")
    assert "every worker node sees the driver's files" in log
    assert not (tmp_path / "run" / "ckpt" / ".carl_shared_fs_probe").exists()


def test_multinode_refuses_unshared_files_and_a_loopback_retriever_on_two_hosts(tmp_path):
    """The second node on 127.0.0.2 (another host to Ray), trainer.nnodes=1 (the driver's checks pass), the
    checkpoint folder /proc/self/cwd/ckpt (the driver's and the second node's are different folders)."""
    driver = tmp_path / "driver"
    driver.mkdir()
    overrides = [  # run_smoke's toy run gives absolute paths for the data, the policy, the tool yaml, the reward
        "trainer.nnodes=1",
        "trainer.default_local_dir=/proc/self/cwd/ckpt",
        "ray_kwargs.ray_init.num_cpus=null",
        "ray_kwargs.ray_init.num_gpus=null",
        f"+transfer_queue.backend.SimpleStorage.required_node_resource={WORKER_RESOURCE}",
    ]
    with serve_retriever() as (url, _), two_node_cluster(tmp_path, node_ip="127.0.0.2") as (address, temp_dir):
        result = run_smoke(
            steps=1,
            algo="carl",
            workdir=tmp_path / "run",
            cwd=driver,
            extra_env={"RETRIEVER_URL": url},
            timeout_s=300,
            extra_overrides=[
                *overrides,
                f"+ray_kwargs.ray_init.address={address}",
                f"ray_kwargs.ray_init._temp_dir={temp_dir}",
            ],
        )
    log = " ".join(Path(result.log_path).read_text(errors="replace").split())
    assert result.returncode != 0 and not result.timed_out and result.metrics == [], f"see {result.log_path}"
    assert (driver / "ckpt" / ".carl_shared_fs_probe").exists()  # the driver's folder; the second node has its own
    assert "the Ray cluster cannot run this config" in log, f"see {result.log_path}"
    assert (
        "trainer.default_local_dir=/proc/self/cwd/ckpt is not one folder for every node: node 127.0.0.2" in log
        and "filesystem every node mounts at the same path (e.g. NFS)" in log
    ), f"see {result.log_path}"
    assert f"the retriever URL {url} is a loopback address, but the Ray cluster's nodes are on 2 hosts" in log
    assert "trainer.nnodes=1" in log
