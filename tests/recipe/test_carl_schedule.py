"""`recipe.carl.schedule` through the CARL trainer: a step's optimizer updates under verl's own balancing and update
split (issue 22, items 2, 3 and 7).

The trainer methods run for real on top of verl's `PPOTrainer._balance_batch` (`get_seqlen_balanced_partitions`) and
`_update_actor`; TransferQueue is a dict, and the actor worker group splits the batch as verl's dispatch
(`KVBatchMeta.chunk`) and `train_mini_batch` (`tu.make_iterator`) do. No Ray, no GPU.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.padding_utils import SYNTHETIC_PADDING_SEQ_LEN
from verl.utils import tensordict_utils as tu
from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

import recipe.carl.schedule as schedule
import recipe.carl.trainer as carl_trainer
from recipe.carl.packing import RUNS_KEY
from recipe.carl.settings import read_settings
from recipe.carl.totals import BudgetTotals
from tests.recipe.test_carl_agent_loop import (
    CONFIG_DIR,
    ScriptedServer,
    grow,
    sample,
    searching_policy,
    trainer_advantage,
    verl_postprocess,
)
from tests.recipe.test_carl_agent_loop import make_config as agent_loop_config

EOS = 2


class DictTQ:
    """TransferQueue's key-value calls over a dict of rows (field name -> value), as `pad_batch` and the trainer use
    them."""

    def __init__(self, rows: dict[str, dict]):
        self.rows = rows

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        rows = [self.rows[key] for key in keys]
        return list_of_dict_to_tensordict([{f: r[f] for f in (select_fields or r)} for r in rows])

    def kv_batch_put(self, keys, partition_id, fields, tags=None):
        for i, key in enumerate(keys):
            self.rows.setdefault(key, {}).update({name: fields[i][name] for name in fields.keys()})
        return keys


class ActorGroup:
    """The actor worker group: `dp` ranks; `update_actor` splits the batch as verl's dispatch and `train_mini_batch`
    do (contiguous shares; mini-batches of `mini_batch_size / dp` rows per rank, in `make_iterator`'s order)."""

    def __init__(self, dp: int):
        self._dispatch_info = {"actor": list(range(dp))}
        self.dp = dp
        self.real_rows: list[int] = []
        self.extra_info: dict = {}

    def update_actor(self, batch):
        self.extra_info = dict(batch.extra_info)
        mini_batch_size = self.extra_info["mini_batch_size"]
        assert mini_batch_size % self.dp == 0  # verl's assert in train_mini_batch
        real: dict[int, int] = {}
        for share in batch.chunk(self.dp):
            flags = torch.tensor(schedule.padding_flags(share))
            loader = tu.make_iterator(
                TensorDict({"padding": flags}, batch_size=len(share)),
                mini_batch_size=mini_batch_size // self.dp,
                epochs=1,
                seed=0,
                dataloader_kwargs=self.extra_info["dataloader_kwargs"],
            )
            for j, mini in enumerate(loader):
                real[j] = real.get(j, 0) + int((~mini["padding"]).sum())
        self.real_rows = [real[j] for j in sorted(real)]
        return {"metrics": {"mfu": 0.0}}


def make_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="carl_trainer", overrides=["actor_rollout_ref.model.path=/x", *overrides])


def make_trainer(config, dp: int, rows: dict[str, dict], monkeypatch):
    monkeypatch.setattr(schedule, "tq", DictTQ(rows))
    trainer = object.__new__(carl_trainer.CARLTrainer)
    trainer.config, trainer.carl_settings, trainer.global_steps = config, read_settings(config), 1
    trainer.carl_totals = BudgetTotals()  # set by CARLTrainer.__init__
    trainer.tokenizer = SimpleNamespace(eos_token_id=EOS)
    trainer.actor_rollout_wg = ActorGroup(dp)
    trainer.use_critic = False
    return trainer


def synthetic_step(rows_per_question: list[int], seed: int = 0, sessions: int = 1):
    """A step's rows as the agent loops store them: keys `{uid}_{session}_{index}`, verl's tags, a tree description
    on each tree's first row; sequence lengths of a 7B run (500-14,000 tokens)."""
    rng = random.Random(seed)
    keys, tags, rows = [], [], {}
    for q, count in enumerate(rows_per_question):
        for session in range(sessions):
            for index in range(count):
                key = f"q{q}_{session}_{index}"
                length = rng.randrange(500, 14_000)
                keys.append(key)
                tags.append({"status": "success", "seq_len": length, "prompt_len": 400, "response_len": length - 400})
                tree = {"parent": [-1]} if index == 0 else None
                rows[key] = {
                    "uid": f"q{q}",
                    "responses": torch.ones(3, dtype=torch.int64),
                    "response_mask": torch.ones(3, dtype=torch.int64),
                    "extra_fields": {"carl_token_nodes": [[1, 3]], "carl_tree": tree},
                }
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train"), rows


def split(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` rows over `parts` questions, at least one each."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def test_verl_alone_leaves_the_last_update_mostly_padding():
    """The problem, with verl's own balancing (the review's CPU reproduction): 1,100 rows padded to lcm(8, 256) =
    1,280; the padding rows come last in every rank's sorted share, so per rank the 5 mini-batches of 32 rows hold
    [32, 32, 32, 32, 9 or 10] real rows: 160 rows per rank, 22 or 23 of them (180 / 8) padding, all in the last."""
    rng = random.Random(0)
    lengths = [rng.randrange(500, 14_000) for _ in range(1100)] + [SYNTHETIC_PADDING_SEQ_LEN] * 180
    partitions = get_seqlen_balanced_partitions(calculate_workload(torch.tensor(lengths)), 8, equal_size=True)
    for share in partitions:
        real = [sum(i < 1100 for i in share[j * 32 : (j + 1) * 32]) for j in range(5)]
        assert real[:4] == [32, 32, 32, 32] and real[4] in (9, 10)


# rows per question, dp, ppo_mini_batch_size (questions), rollout.n, per-GPU micro-batch (None: dynamic bsz),
# and the updates and padded rows worked out by hand.
STEPS = {
    # 128 trees, 1,100 per-path rows, 8 GPUs, 16 questions per update: 128 / 16 = 8 updates; 8 x 8 = 64 rows per
    # unit, ceil(1100 / 64) = 18 units = 1,152 rows, 144 per update, 137 or 138 of them real (1,100 / 8 = 137.5).
    "7b_path": (1100, 128, 1, 8, 16, 1, None, 8, 1152),
    # The same step on 3 nodes x 6 GPUs: 144 rows per update divide by 18 (no divisibility check needed any more).
    "7b_path_18_gpus": (1100, 128, 1, 18, 16, 1, None, 8, 1152),
    # packing=tree: ~1 row per tree (150 rows); still 8 updates: ceil(150 / 64) = 3 units = 192 rows, 24 per update.
    "7b_tree": (150, 128, 1, 8, 16, 1, None, 8, 192),
    # GRPO: 128 prompts x 16 chains = 2,048 rows, 8 updates of 256 rows (16 x 16), no padding: verl's own schedule.
    "grpo": (128, 128, 16, 8, 16, 16, None, 8, 2048),
    # Fixed micro-batches of 4 rows per GPU on 2 GPUs: 10 / 5 = 2 updates; unit 2 x 4 = 8, ceil(37 / 16) = 3 units
    # per update = 24 rows, 48 in all.
    "micro_batches": (37, 10, 1, 2, 5, 1, 4, 2, 48),
    # The CPU end-to-end runs: 2 trees, 6 rows, 1 rank, 2 questions per update: one update of the 6 rows.
    "cpu_e2e": (6, 2, 1, 1, 2, 1, None, 1, 6),
}


@pytest.mark.parametrize("case", STEPS, ids=list(STEPS))
def test_every_update_trains_on_as_many_real_rows(case, monkeypatch):
    rows, questions, sessions, dp, per_update, n, micro, updates, padded = STEPS[case]
    rng = random.Random(1)
    counts = [1] * questions if sessions > 1 else split(rows, questions, rng)
    batch, store = synthetic_step(counts, sessions=sessions)
    real = len(batch)
    overrides = [f"actor_rollout_ref.actor.ppo_mini_batch_size={per_update}", f"actor_rollout_ref.rollout.n={n}"]
    if micro:
        overrides += [
            "actor_rollout_ref.actor.use_dynamic_bsz=False",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        ]
    else:
        overrides += ["actor_rollout_ref.actor.use_dynamic_bsz=True"]
    trainer = make_trainer(make_config(*overrides), dp, store, monkeypatch)
    metrics: dict = {}
    balanced = []  # verl's own balancing, as it left the rows
    verl_balance = carl_trainer.PPOTrainerSync._balance_batch

    def recording(self, b, m, **kwargs):
        out = verl_balance(self, b, m, **kwargs)
        balanced.append(list(out.keys))
        return out

    monkeypatch.setattr(carl_trainer.PPOTrainerSync, "_balance_batch", recording)

    batch = trainer._balance_batch(batch, metrics)  # verl's balancing, with the CARL schedule around it
    assert len(batch) == padded and len(set(batch.keys)) == padded
    # The update gets the batch back from TransferQueue (after the advantage step's put): the same keys and tags.
    trainer._update_actor(KVBatchMeta(keys=batch.keys, tags=batch.tags, partition_id="train"), metrics)
    stale = KVBatchMeta(keys=batch.keys, tags=[{} for _ in batch.keys], partition_id="train")
    assert trainer._plan_updates(stale) == trainer._plan_updates(batch)  # padding is told by key, not only by tag

    group = trainer.actor_rollout_wg
    assert len(group.real_rows) == updates and sum(group.real_rows) == real
    assert set(group.real_rows) <= {real // updates, math.ceil(real / updates)}  # the same share of real rows, +-1
    assert group.extra_info["mini_batch_size"] == group.extra_info["global_batch_size"] == padded // updates
    assert trainer.config.actor_rollout_ref.actor.ppo_mini_batch_size == per_update  # restored after the update
    assert metrics["carl/updates_per_step"] == updates and metrics["carl/padding_rows"] == padded - real
    assert (metrics["carl/real_rows_per_update_min"], metrics["carl/real_rows_per_update_max"]) == (
        min(group.real_rows),
        max(group.real_rows),
    )
    # verl's token balance over the ranks holds: every rank keeps the rows verl's balancer gave it.
    share = padded // dp
    for r in range(dp):
        assert set(batch.keys[r * share : (r + 1) * share]) == set(balanced[0][r * share : (r + 1) * share])


class CriticGroup:
    """The critic worker group: records the update size verl's `_update_critic` sends."""

    def __init__(self):
        self.extra_info: dict = {}

    def train_mini_batch(self, batch):
        self.extra_info = dict(batch.extra_info)
        return SimpleNamespace(get=lambda: {"metrics": {"mfu": 0.0}})


def test_a_critic_updates_on_the_same_schedule(monkeypatch):
    """A critic (GAE baselines) takes the actor's k updates: its mini-batch is this step's rows per update, with its
    fixed micro-batches in the unit (2 ranks x 3 rows: 6; 20 rows in 10 / 5 = 2 updates -> 2 x 12 = 24 rows)."""
    batch, store = synthetic_step(split(20, 10, random.Random(3)))
    config = make_config(
        "actor_rollout_ref.actor.ppo_mini_batch_size=5",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "critic.ppo_mini_batch_size=5",
        "critic.use_dynamic_bsz=False",
        "critic.ppo_micro_batch_size_per_gpu=3",
        "critic.forward_micro_batch_size_per_gpu=3",
    )
    trainer = make_trainer(config, 2, store, monkeypatch)
    trainer.use_critic, trainer.critic_wg = True, CriticGroup()
    batch = trainer._balance_batch(batch, {})
    assert len(batch) == 24
    trainer._update_critic(batch, {})
    assert trainer.critic_wg.extra_info["mini_batch_size"] == trainer.critic_wg.extra_info["global_batch_size"] == 12
    assert config.critic.ppo_mini_batch_size == 5  # restored


def test_the_same_questions_make_the_same_updates_in_both_layouts():
    """`ppo_mini_batch_size` counts questions whatever the row layout: per-path rows and packed rows of the same 128
    trees both make 128 / 16 = 8 updates (verl's row count would give 1,100 / 256 -> 5 and 150 / 256 -> 1)."""
    rng = random.Random(2)
    per_path = [f"q{q}_0_{i}" for q, count in enumerate(split(1100, 128, rng)) for i in range(count)]
    packed = [f"q{q}_0_{i}" for q, count in enumerate(split(150, 128, rng)) for i in range(count)]
    assert schedule.plan_updates(per_path, 16, dp=8).updates == schedule.plan_updates(packed, 16, dp=8).updates == 8


def test_spread_padding_deals_each_ranks_padding_over_its_updates():
    # 2 ranks x 3 updates of 2 rows per rank; rank 0 has 3 padding rows (3, 4, 5), rank 1 has 2 (10, 11).
    padding = [False] * 3 + [True] * 3 + [False] * 4 + [True] * 2
    order = schedule.spread_padding(padding, dp=2, updates=3)
    # Rank 0 deals 3 -> update 0, 4 -> 1, 5 -> 2; the deal goes on at rank 1: 10 -> update 0, 11 -> 1.
    assert order == [0, 3, 1, 4, 2, 5, 6, 10, 7, 11, 8, 9]
    reordered = [padding[i] for i in order]
    assert schedule.real_rows_per_update(reordered, 2, 3) == [2, 2, 3]  # 5 padding rows: 2, 2, 1 per update
    assert schedule.real_rows_per_update(padding, 2, 3) == [4, 3, 0]  # verl's order: the last update all padding


def test_plans_and_bad_inputs():
    # More updates than rows: one update per row at most.
    assert schedule.plan_updates(["a_0_0", "b_0_0", "c_0_0"], 1, dp=1).updates == 3
    assert schedule.plan_updates(["a_0_0", "a_0_1"], 1, dp=4).rows == 4  # a rank never gets an empty share
    with pytest.raises(ValueError, match="without rows"):
        schedule.plan_updates([], 16, dp=8)
    with pytest.raises(ValueError, match="do not split into 2 ranks x 3 updates"):
        schedule.spread_padding([False] * 8, dp=2, updates=3)
    config = make_config("actor_rollout_ref.rollout.n=4")
    with pytest.raises(ValueError, match="not whole groups of rollout.n=4"):
        with schedule.mini_batch_rows(config, 6):
            pass


def test_micro_batch_rows_of_fixed_and_dynamic_batch_sizes():
    fixed = make_config(
        "actor_rollout_ref.actor.use_dynamic_bsz=False",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=6",
    )
    assert schedule.micro_batch_rows(fixed) == 12  # a rank's share divides into both passes' micro-batches
    dynamic = make_config(
        "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"
    )
    assert schedule.micro_batch_rows(dynamic) == 1


# ------------------------------------------------------------------------------------------------------ item 7
def agent_loop_step(config, monkeypatch, mode="auto"):
    """Two questions through the real agent loop and verl's row post-processing: (batch, stored rows)."""
    samples = [sample("t0"), sample("t1", "who is the capital of q1")]
    outputs = grow(config, ScriptedServer(searching_policy, seed=1), *samples, mode=mode)
    stored = [row for o, s in zip(outputs, samples, strict=True) for row in verl_postprocess(o, monkeypatch, dict(s))]
    rows = {r["key"]: {k: v for k, v in r.items() if k not in ("key", "tag")} for r in stored}
    return KVBatchMeta(keys=[r["key"] for r in stored], tags=[r["tag"] for r in stored], partition_id="train"), rows


@pytest.mark.parametrize(
    "overrides, mode",
    [
        (["algorithm.carl.packing=tree"], "auto"),  # one packed row per tree: every key ends in _0
        (["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=1"], "chain"),  # chains: one row each
        ([], "auto"),  # per-path rows
    ],
    ids=["packed_trees", "chains", "per_path"],
)
def test_padding_rows_carry_no_tree_description(overrides, mode, monkeypatch):
    config = agent_loop_config("actor_rollout_ref.actor.ppo_mini_batch_size=1", *overrides)
    batch, rows = agent_loop_step(config, monkeypatch, mode)
    first = batch.keys[0]
    assert rows[first]["extra_fields"]["carl_tree"] is not None  # verl's template row describes its tree
    described = {k for k, r in rows.items() if r["extra_fields"]["carl_tree"] is not None}
    trainer = make_trainer(config, 4, rows, monkeypatch)
    padded = trainer._balance_batch(batch, {})

    pads = [key for key, pad in zip(padded.keys, schedule.padding_flags(padded), strict=True) if pad]
    assert pads and all(key.startswith("pad") for key in pads)
    for key in pads:
        extra = rows[key]["extra_fields"]
        assert extra["carl_tree"] is None and extra.get(RUNS_KEY) is None, key
        assert int(rows[key]["response_mask"].sum()) == 0
    assert {k for k, r in rows.items() if r["extra_fields"]["carl_tree"] is not None} == described  # untouched
    if "algorithm.carl.packing=tree" in overrides:
        assert rows[first]["extra_fields"][RUNS_KEY] is not None
    if mode == "auto" and "algorithm.adv_estimator=grpo" not in overrides:
        # The padded step goes through the estimator: padding rows get no advantage, the trees their usual one.
        stored = [{"key": key, **rows[key]} for key in padded.keys]
        advantages, _, metrics = trainer_advantage(stored, config, monkeypatch)
        for key, row in zip(padded.keys, advantages, strict=True):
            if key in pads:
                assert row.abs().sum() == 0
        assert metrics["carl/trees"] == 2.0
