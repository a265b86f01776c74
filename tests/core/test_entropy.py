"""Action entropy (Eq. 8) and the running state entropy (Alg. 1, line 18)."""

import math

import pytest
import torch

from carl_core import action_entropy, compute_state_entropy

from .support import update_state_entropy


def test_action_entropy_is_length_normalised_nll():
    # -(log 0.5 + log 0.25) / 2 = (0.6931 + 1.3863) / 2
    assert action_entropy([math.log(0.5), math.log(0.25)]) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert action_entropy([0.0]) == 0.0


def test_running_mean_equals_closed_form():
    h, n = float("nan"), 0
    for x in [0.3, 1.2, 0.6, 2.0]:
        h, n = update_state_entropy(h, n, x)
    assert (h, n) == (pytest.approx(sum([0.3, 1.2, 0.6, 2.0]) / 4), 4)
    # Tree 0 -> {1, 2}, 1 -> {3}: h_hat(0) = mean(h1, h2), h_hat(1) = h3, leaves have none.
    parent = torch.tensor([-1, 0, 0, 1])
    ent = torch.tensor([float("nan"), 0.2, 0.6, 1.5], dtype=torch.float64)
    h_hat, n_hat = compute_state_entropy(parent, ent)
    assert n_hat.tolist() == [2, 1, 0, 0]
    assert h_hat[:2].tolist() == pytest.approx([0.4, 1.5]) and torch.isnan(h_hat[2:]).all()


@pytest.mark.parametrize("bad", [[], [float("nan")], [-1.0, float("-inf")]])
def test_bad_log_probs_are_named(bad):
    with pytest.raises(ValueError, match="empty action|non-finite"):
        action_entropy(bad)
