"""A training step's optimizer updates: `ppo_mini_batch_size` counts questions, and every update trains on as many
real rows as every other (+-1), whatever the trees' sizes and the row layout.

Left to verl, a CARL step trains unevenly. verl pads a step's rows to a multiple of lcm(dp, ppo_mini_batch_size x
rollout.n) with 128-token rows that train nothing (`PPOTrainer._balance_batch`, `padding_utils`), which fits GRPO's
fixed 128 x 16 rows. A CARL step has as many rows as its trees give: one per leaf path with a trained action
(`algorithm.carl.packing: path`, up to N0 + N per question) or about one per tree (`packing: tree`). Then

- the padding rows get the highest indices, verl's balancer sorts each rank's indices, the mini-batches run in that
  order (`actor.shuffle: false`) and the loss is normalised per mini-batch (`batch_num_tokens`): 1,100 real rows
  padded to 1,280 on 8 ranks give every rank mini-batches of [32, 32, 32, 32, 9] real rows, so the last update is
  a full step on 30 % of a mini-batch;
- `ppo_mini_batch_size` would count leaf paths under `path` and trees under `tree`: the same setting would give
  12 updates a step in one layout and 1 in the other.

So the CARL trainer (`recipe.carl.trainer`) plans each step's updates with this module:

1. `plan_updates`: `ppo_mini_batch_size` counts questions per update, as verl's prompts do for GRPO, in both row
   layouts. A step of Q questions makes k = ceil(Q / ppo_mini_batch_size) updates (with the start-up check's
   `data.train_batch_size % ppo_mini_batch_size == 0`, the same k every step, for CARL and GRPO alike). The rows are
   padded to k equal updates, each a multiple of the data-parallel ranks (x the per-GPU micro-batch sizes, without
   dynamic batch sizes) and of `rollout.n`: fewer than k x that unit padding rows.
2. `pad_batch`: the padding rows, from verl's own template (`construct_minimal_padding_template`) with the tree
   description removed (verl copies the batch's first row, which under `packing: tree`, or for chains, is a tree's
   first row: its whole description, up to 255 times a step).
3. `spread_padding`, after verl's balancing: each rank's padding rows are dealt round-robin over the updates, the
   deal continuing from rank to rank, so update j holds floor or ceil(padding / k) of them: every update trains on
   the same number of real rows, +-1. (With `actor.shuffle: true` verl shuffles each rank's rows first: equal only on
   average.)
4. `mini_batch_rows`: verl's update runs with this step's rows per update (its `ppo_mini_batch_size x rollout.n`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import transfer_queue as tq
from omegaconf import OmegaConf, open_dict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.padding_utils import construct_minimal_padding_template
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from recipe.carl.estimator import PAD_UID_PREFIX
from recipe.carl.packing import RUNS_KEY

TREE_FIELDS = ("carl_tree", RUNS_KEY)
"""`extra_fields` that describe a tree (a tree's first row) or its packed structure: empty on padding rows."""
MINI_BATCH_KEYS = {
    "actor": "actor_rollout_ref.actor.ppo_mini_batch_size",
    "critic": "critic.ppo_mini_batch_size",
}


@dataclass(frozen=True)
class UpdatePlan:
    """One step's optimizer updates."""

    questions: int
    """Questions (verl uids) with rows in the step."""
    real_rows: int
    """Rows of the agent loops (no padding)."""
    updates: int
    """Optimizer updates of the step (per epoch)."""
    rows_per_update: int
    """Rows of one update, padding included: a multiple of the data-parallel ranks."""
    dp: int
    """Data-parallel ranks of the actor."""

    @property
    def rows(self) -> int:
        """Rows of the padded step."""
        return self.updates * self.rows_per_update

    @property
    def padding(self) -> int:
        return self.rows - self.real_rows


def question_of(key: str) -> str:
    """The question (uid) of a TransferQueue row key `{uid}_{session}_{index}` (verl's `agent_loop_tq`)."""
    return key.rsplit("_", 2)[0]


def is_padding_key(key: str) -> bool:
    """A padding row's key (uid `pad<hex>`; verl's uids are uuid4 strings, which never start so)."""
    return question_of(key).startswith(PAD_UID_PREFIX)


def micro_batch_rows(config: Any, use_critic: bool = False) -> int:
    """Rows a rank's share of one update must be a multiple of: the lcm of the per-GPU micro-batch sizes of the passes
    without dynamic batch sizes (verl asserts `rows % micro_batch_size_per_gpu == 0`; a rank's share of the whole step
    is k of them, so the log-prob passes divide too); 1 when every pass uses dynamic batch sizes."""
    arr = config.actor_rollout_ref
    sizes = []
    if not arr.actor.get("use_dynamic_bsz", False):  # verl asserts the log-prob pass uses the same mode
        sizes += [arr.actor.get("ppo_micro_batch_size_per_gpu"), arr.rollout.get("log_prob_micro_batch_size_per_gpu")]
    if not arr.ref.get("log_prob_use_dynamic_bsz", False):
        sizes.append(arr.ref.get("log_prob_micro_batch_size_per_gpu"))
    critic = config.get("critic") or {}
    if use_critic and not critic.get("use_dynamic_bsz", False):
        sizes += [critic.get("ppo_micro_batch_size_per_gpu"), critic.get("forward_micro_batch_size_per_gpu")]
    return math.lcm(1, *(int(size) for size in sizes if size))


def plan_updates(
    real_keys: Sequence[str], questions_per_update: int, dp: int, rollout_n: int = 1, micro_rows: int = 1
) -> UpdatePlan:
    """The step's updates: ceil(questions / `questions_per_update`) of them (at most one per real row), each of the
    fewest rows that hold the real rows and divide among `dp` ranks, micro-batches of `micro_rows` and `rollout_n`.

    Args:
        real_keys: TransferQueue keys of the step's real rows.
        questions_per_update: `actor.ppo_mini_batch_size`.
        dp: data-parallel ranks of the actor.
        rollout_n: `rollout.n` (verl's update size is `ppo_mini_batch_size x n` rows).
        micro_rows: `micro_batch_rows(config)`.
    """
    rows = len(real_keys)
    if rows == 0:
        raise ValueError("a training step without rows has no updates to plan")
    questions = len({question_of(key) for key in real_keys})
    updates = min(math.ceil(questions / questions_per_update), rows)
    unit = math.lcm(dp * micro_rows, rollout_n)
    return UpdatePlan(questions, rows, updates, unit * math.ceil(rows / (updates * unit)), dp)


def padding_flags(batch: Any) -> list[bool]:
    """Which rows of a `KVBatchMeta` are padding (verl's `is_padding` tag)."""
    return [bool(tag.get("is_padding", False)) for tag in batch.tags]


def pad_batch(batch: KVBatchMeta, rows: int, eos_token_id: int) -> KVBatchMeta:
    """`batch` with padding rows appended up to `rows`: verl's `upsample_batch_to_divisible_size`, whose template is
    the batch's first row, but with that row's tree description (`TREE_FIELDS`) removed from the template.

    The rows are verl's (`construct_minimal_padding_template`: 128 EOS tokens, `response_mask` 0, uid `pad<hex>`,
    tag `is_padding`), so verl's metrics skip them and the estimator gives them no tree (`is_tree_row`).
    """
    missing = rows - len(batch)
    if missing < 0:
        raise ValueError(f"cannot pad {len(batch)} rows down to {rows}")
    if missing == 0:
        return batch
    source = tq.kv_batch_get(keys=[batch.keys[0]], partition_id=batch.partition_id)[0]
    template, tag = construct_minimal_padding_template(source, batch.tags[0], eos_token_id)
    extra = template.get("extra_fields")
    if isinstance(extra, dict):
        template["extra_fields"] = {**extra, **{name: None for name in TREE_FIELDS if name in extra}}
    uid = f"{PAD_UID_PREFIX}{uuid.uuid4().hex}"
    template["uid"] = uid
    keys, fields = [], []
    for session in range(missing):  # verl's key layout: one uid, ascending sessions
        row = copy.deepcopy(template)
        if "session_id" in row:
            row["session_id"] = session
        keys.append(f"{uid}_{session}_0")
        fields.append(row)
    tags = [copy.deepcopy(tag) for _ in keys]
    tq.kv_batch_put(keys=keys, partition_id=batch.partition_id, fields=list_of_dict_to_tensordict(fields), tags=tags)
    return KVBatchMeta(
        keys=batch.keys + keys,
        tags=batch.tags + tags,
        partition_id=batch.partition_id,
        fields=batch.fields,
        extra_info=batch.extra_info,
    )


def spread_padding(padding: Sequence[bool], dp: int, updates: int) -> list[int]:
    """The order that deals every rank's padding rows round-robin over its `updates` mini-batches.

    verl hands rank r the r-th of `dp` contiguous shares and cuts each share into `updates` contiguous mini-batches
    (update j = the j-th mini-batch of every rank). The deal continues from one rank to the next, so update j gets
    floor or ceil(total padding / updates) padding rows, and each mini-batch at most ceil(its rank's padding /
    updates) <= its size. Rows stay on their rank (verl's token balance holds) and keep their order otherwise.

    Args:
        padding: per row, whether it is padding, in verl's balanced order [len: a multiple of dp x updates].

    Returns:
        Indices into `padding` (for `KVBatchMeta.reorder`).
    """
    if len(padding) % (dp * updates):
        raise ValueError(f"{len(padding)} rows do not split into {dp} ranks x {updates} updates")
    share, size = len(padding) // dp, len(padding) // (dp * updates)
    order, dealt = [], 0
    for rank in range(dp):
        rows = range(rank * share, (rank + 1) * share)
        real = iter([i for i in rows if not padding[i]])
        slots: list[list[int]] = [[] for _ in range(updates)]
        for i in (i for i in rows if padding[i]):
            slots[dealt % updates].append(i)
            dealt += 1
        for pads in slots:
            order += [next(real) for _ in range(size - len(pads))] + pads
    return order


def real_rows_per_update(padding: Sequence[bool], dp: int, updates: int) -> list[int]:
    """Real rows of each update, for rows in dispatch order (verl's contiguous shares and mini-batches)."""
    share, size = len(padding) // dp, len(padding) // (dp * updates)
    return [
        sum(not padding[rank * share + j * size + i] for rank in range(dp) for i in range(size)) for j in range(updates)
    ]


def plan_metrics(plan: UpdatePlan, padding: Sequence[bool]) -> dict[str, float]:
    """`carl/updates_per_step`, the real rows of the smallest and largest update, the step's padding rows."""
    real = real_rows_per_update(padding, plan.dp, plan.updates)
    return {
        "carl/updates_per_step": float(plan.updates),
        "carl/real_rows_per_update_min": float(min(real)),
        "carl/real_rows_per_update_max": float(max(real)),
        "carl/padding_rows": float(plan.padding),
    }


@contextlib.contextmanager
def mini_batch_rows(config: Any, rows_per_update: int, roles: Sequence[str] = ("actor",)) -> Iterator[None]:
    """`config` with `ppo_mini_batch_size` of `roles` set to `rows_per_update / rollout.n` for the duration.

    verl's `_update_actor` / `_update_critic` read the update size from the config (`ppo_mini_batch_size x n` rows,
    also the loss's `global_batch_size`): during the update it is this step's, so verl's own update code runs.
    """
    n = int(config.actor_rollout_ref.rollout.n)
    if rows_per_update % n:
        raise ValueError(f"{rows_per_update} rows per update are not whole groups of rollout.n={n}")
    keys = [MINI_BATCH_KEYS[role] for role in roles]
    saved = {key: OmegaConf.select(config, key) for key in keys}
    with open_dict(config):
        for key in keys:
            OmegaConf.update(config, key, rows_per_update // n)
    try:
        yield
    finally:
        with open_dict(config):
            for key, value in saved.items():
                OmegaConf.update(config, key, value)
