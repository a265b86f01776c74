"""carl_core: CARL's algorithm (arXiv 2512.04949 v3), framework-free (torch, numpy and the standard library only).

One module per concept of the paper:
    config      CARLConfig, the knobs of Alg. 1/2 and Eq. 13, validated once
    tree        RolloutTree (states are nodes, actions are edges); its compact description; TreeArrays
    entropy     action entropy (Eq. 8) and the state entropy of Alg. 1
    forking     progressive forking (Alg. 1): ForkPlanner, grow_tree
    values      node values and edge advantages (Alg. 2, Eqs. 9-11)
    update_set  which actions are trained (Eq. 13) and with which advantage; score_trees
    layout      trained actions -> verl rows; node advantages -> token advantages
    stats       telemetry and the tree dump record

How a tree flows to the loss::

    grow_tree(RolloutTree)                     rollout: N0 root rollouts, then N forks (Alg. 1)
      -> compute_trained_mask, layout_rows     rows with a structural mask (Eq. 13), no values needed
      -> describe_tree                         per node: parent, leaf reward, entropy (travels with the rows)
    pack_descriptions(batch) -> score_trees    node values, edge advantages, update set (Alg. 2, Eqs. 9-13)
      -> compute_token_advantages              A(e) on every token of each trained action
"""

from carl_core.config import CARLConfig, CARLConfigError
from carl_core.entropy import action_entropy, compute_state_entropy
from carl_core.forking import (
    Draw,
    Environment,
    ForkPlanner,
    Step,
    compute_fork_points,
    compute_outcome_criticality,
    grow_tree,
    rollout_from,
)
from carl_core.layout import TrainingRow, compute_token_advantages, expand_token_nodes, layout_rows
from carl_core.stats import compute_budget_stats, compute_tree_stats, tree_records
from carl_core.tree import (
    NO_OUTCOME_FINISH,
    Action,
    Node,
    RolloutTree,
    TreeArrays,
    TreeError,
    describe_tree,
    has_outcome,
    pack_descriptions,
    pack_trees,
)
from carl_core.update_set import (
    ScoredTrees,
    compute_outcome_advantages,
    compute_trained_mask,
    compute_update_advantages,
    score_trees,
)
from carl_core.values import compute_edge_advantages, compute_has_value, compute_node_values, depth_levels
