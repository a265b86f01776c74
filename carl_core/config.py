"""CARL's knobs in one dataclass, validated once (the recipe converts verl's `algorithm.carl` block into it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SELECTION_RULES = ("density", "spread", "random", "entropy")
UPDATE_SETS = ("critical", "all_inherit", "all", "outcome_only")
VALUE_AGGREGATIONS = ("mean", "leaf_weighted")


class CARLConfigError(ValueError):
    """A CARL setting is invalid; the message names the key and how to fix it."""


@dataclass(frozen=True)
class CARLConfig:
    """Settings of one CARL rollout tree and its update (paper defaults: CARL-Lite; CARL is ``n0=8``)."""

    n0: int = 1
    """N0: full rollouts from the root before any fork (Alg. 1, line 2). 1 = CARL-Lite, 8 = CARL."""
    n_forks: int = 16
    """N: forks after the initial rollouts (Alg. 1, line 5); a tree ends with n0 + n_forks leaves."""
    selection: str = "density"
    """Fork-point rule: `density` (largest h/n, the paper), `spread` (density until a state's outcomes are seen, then
    their observed spread: `carl_core.forking.compute_outcome_criticality`), `random` (ablation #2), `entropy`."""
    spread_prior: float = 8.0
    """lambda of `selection=spread`: the entropy prior's weight, in samples, against the observed spread."""
    merge: bool = True
    """One node per distinct action (a state is a token prefix): a repeated action joins its twin, counted twice in
    values, fork rule and loss (`carl_core.tree`); false keeps every sample as its own node (a literal Alg. 1)."""
    forks_in_flight: int = 1
    """K: forks of one tree that generate at once; the next starts as soon as the oldest ends. 1 is Alg. 1 exactly."""
    max_actions: int = 32
    """T_max: actions per trajectory; a rollout that reaches it ends cleanly as a leaf."""
    update_set: str = "critical"
    """Which actions are trained: `critical` (Eq. 13), `all_inherit` (ablation #3), `all`, `outcome_only` (#1)."""
    value_aggregation: str = "mean"
    """Node value: `mean` of children (Alg. 2, unbiased) or TreeRL's `leaf_weighted` (biased, for comparison)."""
    outcome_eps: float = 1e-6
    """Epsilon of the GRPO std normalisation used only by `update_set=outcome_only`."""
    seed: int = 0
    """Seed of the planner's random generator (ties are broken by node id, never at random)."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise CARLConfigError(f"algorithm.carl.{msg}")

        for key in ("n0", "n_forks", "forks_in_flight", "max_actions"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(f"{key}={value!r} must be an integer.")
        if self.n0 == 0 and self.n_forks == 0:
            fail("n0=0 and n_forks=0 ask for no rollout at all: set n0>=1 (e.g. n0=1, n_forks=16 for CARL-Lite).")
        if self.n0 < 1:
            fail(f"n0={self.n0} must be >= 1: forks need states, and states come from a full rollout from the root.")
        if self.n_forks < 0:
            fail(f"n_forks={self.n_forks} must be >= 0 (the paper uses 16).")
        if self.forks_in_flight < 1:
            fail(f"forks_in_flight={self.forks_in_flight} must be >= 1 (1 reproduces Alg. 1 exactly).")
        if self.max_actions < 1:
            fail(f"max_actions={self.max_actions} must be >= 1 (the paper uses 32, or 10 for Qwen3-4B).")
        if self.selection not in SELECTION_RULES:
            fail(f"selection={self.selection!r} is unknown: use one of {', '.join(SELECTION_RULES)}.")
        if self.update_set not in UPDATE_SETS:
            fail(f"update_set={self.update_set!r} is unknown: use one of {', '.join(UPDATE_SETS)}.")
        if self.value_aggregation not in VALUE_AGGREGATIONS:
            fail(f"value_aggregation={self.value_aggregation!r} is unknown: use {' or '.join(VALUE_AGGREGATIONS)}.")
        if not self.outcome_eps > 0:
            fail(f"outcome_eps={self.outcome_eps!r} must be > 0.")
        if not isinstance(self.spread_prior, (int, float)) or not self.spread_prior > 0:
            fail(f"spread_prior={self.spread_prior!r} must be a number > 0 (the default is 8).")
        if not isinstance(self.merge, bool):
            fail(f"merge={self.merge!r} must be true or false.")

    @property
    def num_leaves(self) -> int:
        """Leaves of a finished tree: N0 + N (the measured |D_roll| of Table 2 fits this, not Eq. 14's N)."""
        return self.n0 + self.n_forks

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> CARLConfig:
        """Builds the config from a plain mapping (e.g. an OmegaConf block), rejecting unknown keys by name."""
        values, known = dict(values or {}), {f.name for f in dataclasses.fields(cls)}
        if "wave_size" in values:  # the key before forks in flight (issue 29)
            k = values["wave_size"]
            raise CARLConfigError(f"algorithm.carl.wave_size={k} was replaced by forks_in_flight (K forks of a tree at "
                                  f"once, the next as soon as the oldest ends): set forks_in_flight={k}.")  # fmt: skip
        if unknown := sorted(set(values) - known):
            raise CARLConfigError(f"algorithm.carl has unknown key(s) {unknown}: the known keys are {sorted(known)} "
                                  "(check the spelling).")  # fmt: skip
        return cls(**values)
