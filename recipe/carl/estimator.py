"""`algorithm.adv_estimator=carl`: the tree advantages of Alg. 2 / Eq. 13, as verl's estimator registry sees them.

The agent loop grows and scores a whole tree inside one `run()` (all leaf rewards are known there), so every
training row leaves the rollout with its per-token advantages in `extra_fields["carl_advantages"]`: the edge
advantage A(e) = V(v) - V(u) on each token of the actions the row trains, 0 elsewhere. verl calls estimators with
`token_level_rewards, response_mask, config, index` only, so the CARL trainer (`recipe.carl.trainer`) gathers
those lists into a tensor with `gather_row_advantages` and passes it as `carl_advantages=`.

Rows verl adds itself (`_balance_batch` padding: uid "pad...", response_mask all 0, `extra_fields` copied from
another row) get advantage 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

from recipe.carl.settings import ESTIMATOR

PAD_UID_PREFIX = "pad"
"""verl's `padding_utils.upsample_batch_to_divisible_size` names its synthetic rows `pad<hex>`."""


def is_padding_row(uid: str, extra: Any) -> bool:
    """True for rows verl added to fill a batch (they carry another row's `extra_fields`, so check the uid)."""
    return str(uid).startswith(PAD_UID_PREFIX) or not isinstance(extra, dict) or "carl_advantages" not in extra


def gather_row_advantages(
    extra_fields: Sequence[Any], uids: Sequence[str], response_mask: torch.Tensor
) -> torch.Tensor:
    """Lays the rows' `carl_advantages` lists out as verl's right-padded response tensor.

    Args:
        extra_fields: each row's `extra_fields` dict, in batch order [len: bs].
        uids: each row's uid [len: bs].
        response_mask: 1 on trained tokens [shape: (bs, response_length)].

    Returns:
        Per-token advantages [shape: (bs, response_length)], 0 on padding rows and past each row's end.

    Raises:
        ValueError: when a real row's list does not fit its response (a rollout/training layout mismatch).
    """
    bs, width = response_mask.shape
    out = torch.zeros(bs, width, dtype=torch.float32)
    for i, (uid, extra) in enumerate(zip(uids, extra_fields, strict=True)):
        if is_padding_row(uid, extra):
            continue
        adv = extra["carl_advantages"]
        if len(adv) > width:
            raise ValueError(
                f"row {i} (uid {uid}) has {len(adv)} advantages but the batch's responses are {width} tokens wide: "
                "the row was changed after the rollout (check that nothing truncates responses)."
            )
        out[i, : len(adv)] = torch.tensor(adv, dtype=torch.float32)
    return out


@register_adv_est(ESTIMATOR)
def compute_carl_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    carl_advantages: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CARL's advantages: A(e) = V(v) - V(u) on the tokens of each trained action (Eqs. 9-11, 13).

    Math:
        A_t = m_t * A(e_t)      (e_t = the action token t belongs to; no group mean/std, no critic)
        returns = advantages    (there is no value function to regress)

    Args:
        token_level_rewards: verl's rewards (the leaf reward on the row's last token); not used: the tree's
            values already contain every leaf reward [shape: (bs, response_length)].
        response_mask: 1 on trained tokens [shape: (bs, response_length)].
        config: `algorithm` config (unused).
        index: tree uid per row (unused).
        carl_advantages: per-token advantages from `gather_row_advantages` [shape: (bs, response_length)].

    Returns:
        (advantages, returns) [shapes: (bs, response_length)].
    """
    if carl_advantages is None:
        raise ValueError(
            "adv_estimator=carl got no carl_advantages: run it with trainer.v1.trainer_mode=carl, whose "
            "_compute_advantage hands the tree advantages over (verl's default trainer passes rewards only)."
        )
    if carl_advantages.shape != response_mask.shape:
        shapes = f"{tuple(carl_advantages.shape)} != {tuple(response_mask.shape)}"
        raise ValueError(f"carl_advantages and response_mask differ in shape: {shapes}.")
    mask = response_mask.to(carl_advantages.dtype)
    # torch.where rather than a product, so a NaN outside the mask can never leak into the loss.
    advantages = torch.where(mask > 0, carl_advantages, torch.zeros_like(carl_advantages))
    if not torch.isfinite(advantages).all():
        raise ValueError("non-finite CARL advantage on a trained token: check the leaf rewards (they must be finite).")
    return advantages, advantages.clone()


def is_registered() -> bool:
    """Whether verl's registry resolves `carl` to this module's function."""
    return ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR) is compute_carl_advantage
