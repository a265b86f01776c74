"""Start-up checks that need the Ray cluster: run in the TaskRunner (`CARLTrainer.__init__`), before any worker starts.

`recipe.carl.preflight` runs in the driver before Ray starts, so it knows the driver's machine and `trainer.nnodes`
only. A cluster started with `ray start` on each machine may hold more nodes than `trainer.nnodes` says (a run with
`nnodes=1` on a two-machine cluster places its workers on either), and every machine has its own disk. With more than
one alive node, `check_cluster` asks every node that can host workers (any CPU or GPU), with a zero-CPU Ray task
pinned to it (`NodeAffinitySchedulingStrategy`), what it sees, and refuses the run, naming the fix, when

1. **the files are not shared**: a node does not see the probe file the driver wrote into
   `trainer.default_local_dir` (each FSDP rank writes its checkpoint shard into its own node's folder, and verl's
   checkpoint merger expects every shard in one folder), or sees a data file (a `bad_rows=skip` copy included), a
   worker-read yaml or the local model other than the driver does (the TaskRunner and the workers open them on
   whichever node they land);
2. **the retriever URL is a loopback address and the nodes are on several hosts** (distinct node IP addresses):
   agent-loop workers on another host would search their own machine. Several Ray nodes of one host share its
   loopback interface (and its files), so a one-host cluster keeps a loopback URL.

The probe file is removed once the TaskRunner's node has seen it (one-node runs included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ray
from omegaconf import DictConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from carl_core import CARLConfigError
from recipe.carl.preflight import PROBE_NAME, VIEW_ENV, is_loopback, log, retriever_urls

SHARED_FILES_FIX = (
    "Put trainer.default_local_dir and the data files on a filesystem every node mounts at the same path (e.g. NFS), "
    "and launch from a node that mounts it: each FSDP rank writes its checkpoint shard into its own node's folder and "
    "verl's checkpoint merger expects every shard in one folder; the TaskRunner reads the data files (and the "
    "filtered copies of algorithm.carl.bad_rows=skip, which the driver writes under trainer.default_local_dir/"
    "carl_data) on whichever node it runs."
)
PROBE_TIMEOUT_S = 120.0
"""How long a node may take to answer (its first Ray worker process may still be starting)."""


def node_view(paths: list[str], probe: str | None) -> dict[str, Any]:
    """What this process's node sees: each path's size (-1 a folder, None missing) and the probe file's content."""
    sizes = {p: os.path.getsize(p) if os.path.isfile(p) else (-1 if os.path.isdir(p) else None) for p in paths}
    token = None
    if probe and os.path.isfile(probe):
        with open(probe) as f:
            token = f.read()
    return {"sizes": sizes, "probe": token}


def worker_nodes(nodes: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The alive nodes a worker can be placed on (any CPU or GPU)."""
    return [n for n in nodes if n.get("Alive") and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]


def view_problems(driver: Mapping[str, Any], node: Mapping[str, Any], seen: Mapping[str, Any]) -> list[str]:
    """Where `seen` (a node's `node_view`) differs from the `driver`'s view (`preflight.record_driver_view`)."""
    name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
    problems = []
    probe = driver.get("probe")
    if probe and seen["probe"] != probe["token"]:
        problems.append(
            f"{probe['key']}={os.path.dirname(probe['path'])} is not one folder for every node: {name} does not see "
            f"the file {PROBE_NAME} the driver wrote into it"
        )
    for entry in driver["paths"]:
        size = seen["sizes"].get(entry["path"])
        if size != entry["size"]:
            what = "does not see it" if size is None else f"sees {size} bytes, the driver {entry['size']}"
            problems.append(f"{entry['key']} {entry['path']}: {name} {what}")
    return problems


def check_cluster(config: DictConfig, environ: Mapping[str, str] | None = None) -> None:
    """The module docstring's checks; nothing to check without Ray (a trainer built in a test) or on one node.

    Raises:
        CARLConfigError: listing every problem, with the fix.
    """
    environ = os.environ if environ is None else environ
    view = json.loads(environ.get(VIEW_ENV) or "null") or {"paths": []}
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
        if len(nodes) < 2:
            return
        files = shared_file_problems(view, worker_nodes(nodes))
        hosts = sorted({n["NodeManagerAddress"] for n in nodes})
        urls = [url for url in retriever_urls(config, environ) if is_loopback(url)] if len(hosts) > 1 else []
        loopback = [
            f"the retriever URL {url} is a loopback address, but the Ray cluster's nodes are on {len(hosts)} hosts "
            f"({', '.join(hosts)}; trainer.nnodes={config.trainer.nnodes}): agent-loop workers on the other hosts "
            "would search their own machine. Serve the retriever on an address every node reaches "
            "(scripts/launch_retriever.sh --host 0.0.0.0) and export RETRIEVER_URL=http://<that host>:<port>/retrieve "
            "before launching"
            for url in urls
        ]
        if files or loopback:
            raise CARLConfigError(
                "the Ray cluster cannot run this config:\n  - "
                + "\n  - ".join([*files, *loopback])
                + "."
                + (f"\n{SHARED_FILES_FIX}" if files else "")
            )
        log(f"{len(nodes)} Ray nodes on {len(hosts)} host(s): every worker node sees the driver's files")
    finally:
        remove_probe(view.get("probe"))


def shared_file_problems(view: Mapping[str, Any], nodes: list[Mapping[str, Any]]) -> list[str]:
    """`view_problems` of every node in `nodes`, each asked with a zero-CPU task pinned to it."""
    probe = (view.get("probe") or {}).get("path")
    paths = [entry["path"] for entry in view["paths"]]
    task = ray.remote(num_cpus=0)(node_view)
    pending = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            paths, probe
        )
        for node in nodes
    ]
    problems = []
    for node, ref in zip(nodes, pending, strict=True):
        try:
            seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log(
                f"node {node['NodeManagerAddress']} did not answer the file check in {PROBE_TIMEOUT_S:g} s: not checked"
            )
            continue
        problems += view_problems(view, node, seen)
    return problems


def remove_probe(probe: Mapping[str, Any] | None) -> None:
    """Removes the driver's probe file where this node sees it (best effort: it is a few bytes)."""
    if not probe:
        return
    try:
        with open(probe["path"]) as f:
            if f.read() == probe["token"]:
                os.remove(probe["path"])
    except OSError:
        pass
