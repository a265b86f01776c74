"""carl_core: CARL's algorithm (arXiv 2512.04949 v3), framework-free (torch, numpy and the standard library only).

One module per concept of the paper:
    config      CARLConfig, the knobs of Alg. 1/2 and Eq. 13, validated once
    tree        RolloutTree: states are nodes, actions are edges; JSON round trip; pack_trees
    entropy     action entropy (Eq. 8) and the running state entropy (Alg. 1, line 18)
    forking     progressive forking (Alg. 1): ForkPlanner, grow_tree
    values      node values and edge advantages (Alg. 2, Eqs. 9-11)
    update_set  critical actions (Eq. 13) and the ablations; score_trees
    flatten     trained actions -> verl rows (`response_mask`, `advantages`, ...)
    stats       telemetry, the JSON-lines tree dump and its invariant check
"""

from carl_core.config import CARLConfig, CARLConfigError
from carl_core.entropy import action_entropy, compute_action_entropy, compute_state_entropy, update_state_entropy
from carl_core.flatten import FlatBatch, TrainingRow, collate_rows, flatten_batch, flatten_trees
from carl_core.forking import (
    Environment,
    ForkPlanner,
    Step,
    SyncEnvironment,
    compute_fork_points,
    grow_tree,
    grow_tree_sync,
    rollout_from,
)
from carl_core.stats import (
    check_tree_record,
    compute_budget_stats,
    compute_tree_stats,
    read_jsonl,
    tree_records,
    write_jsonl,
)
from carl_core.tree import Action, Node, RolloutTree, TreeArrays, TreeError, pack_trees
from carl_core.update_set import (
    ScoredTrees,
    compute_critical_mask,
    compute_outcome_advantages,
    compute_update_advantages,
    score_trees,
)
from carl_core.values import compute_edge_advantages, compute_node_values, depth_levels

__all__ = [
    "Action",
    "CARLConfig",
    "CARLConfigError",
    "Environment",
    "FlatBatch",
    "ForkPlanner",
    "Node",
    "RolloutTree",
    "ScoredTrees",
    "Step",
    "SyncEnvironment",
    "TrainingRow",
    "TreeArrays",
    "TreeError",
    "action_entropy",
    "check_tree_record",
    "collate_rows",
    "compute_action_entropy",
    "compute_critical_mask",
    "compute_edge_advantages",
    "compute_fork_points",
    "compute_node_values",
    "compute_outcome_advantages",
    "compute_state_entropy",
    "compute_budget_stats",
    "compute_tree_stats",
    "compute_update_advantages",
    "depth_levels",
    "flatten_batch",
    "flatten_trees",
    "grow_tree",
    "grow_tree_sync",
    "pack_trees",
    "read_jsonl",
    "rollout_from",
    "score_trees",
    "tree_records",
    "update_state_entropy",
    "write_jsonl",
]
