"""The CARL agent loop against a scripted policy server and a fake search tool, then through verl's own code.

Path checked: `CarlAgentLoop.run` -> verl's `AgentLoopWorkerTQ._agent_loop_postprocess` (the real method,
with TransferQueue replaced by a dict) -> verl's `_balance_batch` padding template -> `CARLTrainer._compute_advantage`
(the real method) -> the registered `carl` estimator. No GPU, no vLLM, no Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.trainer.ppo.padding_utils import construct_minimal_padding_template
from verl.trainer.ppo.v1 import agent_loop_tq
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.replica import TokenOutput

import recipe.carl.agent_loop as carl_agent_loop
import recipe.carl.trainer as carl_trainer
from carl_core import ForkPlanner, RolloutTree, compute_state_entropy, describe_tree, score_trees
from carl_core import tree_records as records_of
from recipe.carl.agent_loop import CarlAgentLoop
from recipe.carl.settings import read_settings
from recipe.carl.totals import BudgetTotals
from tests.core.support import check_tree_record, ended


def tree_records(trees, scored, carl):
    return records_of(scored.arrays, scored, carl, [describe_tree(t) for t in trees])


CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../recipe/carl/config"))
WORDS = "who what is the capital of answer q0 q1 q2 q3 boom a0 a1 a2 a3 doc says blah i think maybe ok".split()
WORDS += "your previous turn had no valid action . to search , write one query as finish the final".split()
TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<think>", "</think>"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|> ' + m['content'] + '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif -%}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, built offline (one token per word or tag)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|end|>", *ROLES, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=ROLES,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


TOKENIZER = make_tokenizer()


class ScriptedServer:
    """`LLMServerClient.generate` double: the next action is a deterministic function of (prefix, visit count).

    `script(depth, rng)` returns the action text; each token's log-prob depends on the prefix, so state entropies
    differ and the density rule has something to choose from. Records every call.
    """

    def __init__(self, script, seed: int = 0):
        self.script, self.seed = script, seed
        self.calls: list[dict] = []
        self.visits: dict[tuple, int] = {}
        self.in_flight = self.max_in_flight = 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let the other rollouts of a wave start: the wave must run concurrently
        self.in_flight -= 1
        key = tuple(prompt_ids)
        visit = self.visits[key] = self.visits.get(key, 0) + 1
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids), "params": dict(sampling_params)})
        digest = hashlib.sha256(repr((self.seed, key, visit)).encode()).digest()
        rng = random.Random(digest)
        depth = TOKENIZER.decode(prompt_ids).count("</search>")
        ids = TOKENIZER.encode(self.script(depth, rng), add_special_tokens=False)[: sampling_params["max_tokens"]]
        base = -0.05 - 2.0 * (digest[0] / 255.0)
        return TokenOutput(token_ids=ids, log_probs=[base] * len(ids), stop_reason="completed", extra_fields={})


def searching_policy(depth: int, rng: random.Random) -> str:
    """Searches once or twice, then answers a0..a2 (a1 is right): rewards differ between leaves."""
    if depth < 1 or (depth < 2 and rng.random() < 0.5):
        return f"i think <search> q{rng.randrange(3)} </search>"
    return f"<answer> a{rng.randrange(3)} </answer>"


class FakeSearchTool(BaseTool):
    """A verl `BaseTool` named `search`, deterministic; the query `boom` raises."""

    def __init__(self):
        schema = {
            "type": "function",
            "function": {
                "name": "search",
                "description": "search",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
            },
        }
        super().__init__({}, OpenAIFunctionToolSchema.model_validate(schema))
        self.queries: list[str] = []

    async def execute(self, instance_id, parameters, **kwargs):
        self.queries.append(parameters["query"])
        if parameters["query"] == "boom":
            raise ConnectionError("retriever down")
        return ToolResponse(text=f"doc says {parameters['query']}"), 0.0, {}


def make_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(
            config_name="carl_trainer",
            overrides=[
                "actor_rollout_ref.model.path=/nonexistent",
                "data.max_prompt_length=64",
                "data.max_response_length=256",
                "algorithm.carl.n0=2",
                "algorithm.carl.n_forks=5",
                "algorithm.carl.max_actions=4",
                "algorithm.carl.max_action_tokens=16",
                *overrides,
            ],
        )


class RecordingLoop(CarlAgentLoop):
    """The agent loop, keeping each finished tree (the rows carry only its description)."""

    trees: list[RolloutTree] = []

    def outputs(self, tree, env, kwargs):
        RecordingLoop.trees.append(tree)
        return super().outputs(tree, env, kwargs)


class Outputs(list):
    """One `run()`'s outputs, with the tree it grew."""

    tree: RolloutTree


def make_loop(config, server, mode="auto", tool=None, **kwargs) -> CarlAgentLoop:
    return RecordingLoop(
        DictConfigWrap(config),
        server,
        TOKENIZER,
        None,
        None,
        DictConfigWrap(config.data),
        mode=mode,
        tools=ToolListWrap([tool or FakeSearchTool()]),
        **kwargs,
    )


def sample(uid="t0", question="what is the capital of q0"):
    return {
        "raw_prompt": [{"role": "user", "content": question}],
        "uid": uid,
        "session_id": 0,
        "global_steps": 3,
        "index": 7,
        "data_source": "nq",
        "reward_model": {"ground_truth": {"target": ["a1"]}},
        "extra_info": {"question": question},
    }


async def run_loop(loop_factory, *samples):
    loop = loop_factory()  # AgentLoopBase binds the running event loop in its constructor
    return [await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1}, **s) for s in samples]


def grow(config, server, *samples, mode="auto", tool=None, **kwargs) -> list[Outputs]:
    RecordingLoop.trees = []
    results = asyncio.run(run_loop(lambda: make_loop(config, server, mode, tool, **kwargs), *samples))
    out = []
    for outputs, tree in zip(results, RecordingLoop.trees, strict=True):
        out.append(Outputs(outputs))
        out[-1].tree = tree
    return out


def verl_postprocess(outputs, monkeypatch, kwargs) -> list[dict]:
    """Runs verl's real `AgentLoopWorkerTQ._agent_loop_postprocess` and returns the rows it would store."""
    stored = []

    async def fake_put(keys, fields, tags, partition_id):
        for i, key in enumerate(keys):
            stored.append({"key": key, "tag": tags[i], **{k: fields[k][i] for k in fields.keys()}})

    monkeypatch.setattr(agent_loop_tq.tq, "async_kv_batch_put", fake_put)
    worker_cls = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class
    worker = object.__new__(worker_cls)
    worker.reward_loop_worker_handles, worker.distillation_enabled, worker.processor = None, False, None
    asyncio.run(worker._agent_loop_postprocess(outputs, False, **kwargs))
    return stored


class FakeTQ:
    """The two TransferQueue calls `CARLTrainer._compute_advantage` makes, over a list of stored rows."""

    def __init__(self, rows):
        self.rows = {r["key"]: r for r in rows}
        self.written: dict = {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        return list_of_dict_to_tensordict([{f: self.rows[k][f] for f in select_fields} for k in keys])

    def kv_batch_put(self, keys, partition_id, fields):
        for name in fields.keys():
            self.written[name] = fields[name]
        return keys


WRITTEN: dict = {}
"""What the last `trainer_advantage` wrote back to TransferQueue."""


class Batch:
    """The part of verl's `KVBatchMeta` the trainer hook reads."""

    def __init__(self, keys):
        self.keys, self.partition_id = list(keys), "train"

    def __len__(self):
        return len(self.keys)


def trainer_advantage(rows, config, monkeypatch, step=1):
    """Runs the real `CARLTrainer._compute_advantage` on stored rows; returns (advantages, rm_scores, metrics)."""
    fake = FakeTQ(rows)
    monkeypatch.setattr(carl_trainer, "tq", fake)
    trainer = object.__new__(carl_trainer.CARLTrainer)
    trainer.config, trainer.carl_settings, trainer.global_steps = config, read_settings(config), step
    trainer.carl_totals = BudgetTotals()  # set by CARLTrainer.__init__
    metrics: dict = {}
    WRITTEN.clear()
    fake.written = WRITTEN
    trainer._compute_advantage(Batch(r["key"] for r in rows), metrics)
    pad = lambda t: t.to_padded_tensor(0.0) if t.is_nested else t  # noqa: E731
    if "advantages" not in fake.written:
        return None, None, metrics
    return pad(fake.written["advantages"]), pad(fake.written["rm_scores"]), metrics


def padding_row(rows):
    """The row verl's `_balance_batch` appends (uid "pad...", extra_fields copied from the first row)."""
    row, tag = construct_minimal_padding_template(dict(rows[0]), rows[0]["tag"], TOKENIZER.eos_token_id)
    row.update(key="padabc_0_0", uid="padabc", tag=tag)
    return row


# ----------------------------------------------------------------------------------------------------- trees
def test_tree_shape_forks_and_budget(monkeypatch):
    config = make_config()
    server = ScriptedServer(searching_policy)
    picks = []

    class RecordingPlanner(ForkPlanner):
        def choose(self, tree, seen, running=()):
            pick = super().choose(tree, seen, running)
            # With one fork in flight every rollout has ended when a fork is chosen; the pick must be the largest
            # h_hat / n_hat over the tree (ties: the lowest id in canonical order, i.e. in the view).
            assert not running and seen == set(range(len(tree.rollout_start)))
            view, shows = tree.view(seen)
            cands = [n.id for n in view.nodes if n.children and not n.terminal and n.depth < view.max_actions]
            parent = torch.tensor([-1 if n.parent is None else n.parent for n in view.nodes])
            ent = torch.tensor([n.action.entropy if n.action else 0.0 for n in view.nodes], dtype=torch.float64)
            count = torch.tensor([n.count for n in view.nodes])  # merged identical actions count each sample
            h_hat, n_hat = compute_state_entropy(parent, ent, count)
            density = {c: float(h_hat[c] / n_hat[c]) for c in cands}
            best = max(density.values())
            picks.append((pick, shows[min(c for c in cands if density[c] >= best - 1e-12)]))
            return pick

    monkeypatch.setattr(carl_agent_loop, "ForkPlanner", RecordingPlanner)
    (outputs,) = grow(config, server, sample())
    tree = outputs.tree
    carl = read_settings(config).carl
    assert ended(tree) == carl.n0 + carl.n_forks  # every rollout ends in a leaf (merged ones share it)
    assert len(picks) == carl.n_forks and all(chosen == best for chosen, best in picks)
    assert all(tree.nodes[leaf].depth <= carl.max_actions for leaf in tree.leaves())
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves()} <= {"answer", "max_actions"}
    # one request id per tree (prefix cache), turn-ending stop strings kept in the output, log-probs asked for
    assert len({c["request_id"] for c in server.calls}) == 1
    for call in server.calls:
        params = call["params"]
        assert "</search>" in params["stop"] and "</answer>" in params["stop"]
        assert params["include_stop_str_in_output"] and params["logprobs"] and "seed" not in params
        used = len(call["prompt_ids"]) - len(tree.prompt_ids)
        assert 1 <= params["max_tokens"] <= min(16, 256 - used)
    check_tree_record(tree_records([tree], score_trees([tree], carl), carl)[0])
    # The description on the first row is the tree's, and no row carries token ids or log-probs beyond verl's own.
    assert outputs[0].extra_fields["carl_tree"]["parent"] == describe_tree(tree)["parent"]
    assert all(o.extra_fields["carl_tree"] is None for o in outputs[1:])
    for o in outputs:
        assert set(o.extra_fields) == {
            "min_global_steps",
            "max_global_steps",
            "carl_mode",
            "carl_tree_id",
            "carl_token_nodes",
            "carl_leaf",
            "carl_tree",
            "reward_extra_info",
        }


def test_max_actions_ends_leaves():
    config = make_config("algorithm.carl.max_actions=3", "algorithm.carl.n_forks=3")
    tool = FakeSearchTool()
    always_search = ScriptedServer(lambda d, rng: f"<search> q{rng.randrange(4)} </search>")
    (outputs,) = grow(config, always_search, sample(), tool=tool)
    tree = outputs.tree
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves()} == {"max_actions"}
    assert {tree.nodes[leaf].depth for leaf in tree.leaves()} == {3}
    # the T_max-th action is not executed: the search tool ran only for actions at depth < T_max
    assert len(tool.queries) == sum(1 for n in tree.nodes if n.action is not None and n.depth < 3)


def test_forks_run_concurrently():
    config = make_config("algorithm.carl.forks_in_flight=4", "algorithm.carl.n_forks=8")
    server = ScriptedServer(searching_policy)
    grow(config, server, sample())
    assert server.max_in_flight >= 2


# ----------------------------------------------------------------------------------------------------- rows
def check_rows(rows, trees, carl, advantages):
    """Every trained action once, with its edge advantage on all its tokens; observations never trained."""
    scored = score_trees(trees, carl)
    seen = {}
    for i, row in enumerate(rows):
        if row["uid"].startswith("pad"):
            assert advantages[i].abs().sum() == 0 and row["response_mask"].sum() == 0
            continue
        b = [t.uid for t in trees].index(f"{row['uid']}_0")
        tree, base = trees[b], scored.arrays.offsets[b]
        path = tree.path(row["extra_fields"]["carl_leaf"])[1:]
        mask, pos = row["response_mask"].tolist(), 0
        for v in path:
            action = tree.nodes[v].action
            n = len(action.token_ids)
            if pos >= len(mask):
                break
            assert row["responses"][pos : pos + n].tolist() == action.token_ids
            if all(mask[pos : pos + n]):
                assert (tree.uid, v) not in seen, "an action is trained twice"
                seen[(tree.uid, v)] = True
                want = float(scored.advantage[base + v])
                assert torch.allclose(advantages[i, pos : pos + n], torch.full((n,), want), atol=1e-6)
            else:
                assert not any(mask[pos : pos + n]) and advantages[i, pos : pos + n].abs().sum() == 0
            pos += n
            o = len(action.observation_ids)
            assert not any(mask[pos : pos + o]) and advantages[i, pos : pos + o].abs().sum() == 0
            pos += o
    trained = {
        (t.uid, n.id) for b, t in enumerate(trees) for n in t.nodes if scored.trained[scored.arrays.offsets[b] + n.id]
    }
    assert set(seen) == trained


def test_rows_through_verl_postprocess_and_trainer(monkeypatch):
    config = make_config()
    server = ScriptedServer(searching_policy, seed=1)
    samples = [sample("t0"), sample("t1", "who is the capital of q1")]
    outs = grow(config, server, *samples)
    rows = []
    for s, o in zip(samples, outs, strict=True):
        rows += verl_postprocess(o, monkeypatch, dict(s))
    trees = [o.tree for o in outs]
    # verl's reward trap: every stored row carries the last output's score and reward breakdown ...
    for s, o in zip(samples, outs, strict=True):
        mine = [r for r in rows if r["uid"] == s["uid"]]
        assert {round(float(r["rm_scores"].sum()), 5) for r in mine} == {round(o[-1].reward_score, 5)}
        assert all(r["extra_fields"]["reward_extra_info"] == o[-1].extra_fields["reward_extra_info"] for r in mine)
    rows.append(padding_row(rows))
    advantages, rm_scores, metrics = trainer_advantage(rows, config, monkeypatch)
    carl = read_settings(config).carl
    check_rows(rows, trees, carl, advantages)
    # ... and the CARL trainer gives each row its own leaf reward back, on its last token, and its own breakdown.
    restored = list(WRITTEN["extra_fields"])
    for i, row in enumerate(rows[:-1]):
        tree = trees[[t.uid for t in trees].index(f"{row['uid']}_0")]
        leaf = tree.nodes[row["extra_fields"]["carl_leaf"]]
        assert rm_scores[i].sum() == pytest.approx(leaf.reward)
        assert rm_scores[i, len(row["responses"]) - 1] == pytest.approx(leaf.reward)
        assert restored[i]["reward_extra_info"]["score"] == pytest.approx(leaf.reward)
    assert rm_scores[-1].abs().sum() == 0
    assert metrics["carl/trees"] == 2.0  # the padding row's copied tree is not counted twice
    assert metrics["carl/leaves_per_tree"] == carl.n0 + carl.n_forks
    trained = score_trees(trees, carl).trained.sum()
    assert metrics["carl/actions_trained_per_tree"] == pytest.approx(float(trained) / 2)
    assert metrics["search/calls"] == sum(  # every sample searched, the merged ones too
        n.count for t in trees for n in t.nodes if n.action and n.action.info.get("searched")
    )
    assert metrics["search/errors"] == 0 and metrics["search/error_rate"] == 0
    assert torch.isfinite(advantages).all()


def test_equal_rewards_give_zero_advantages(monkeypatch):
    config = make_config()
    always_wrong = lambda d, rng: f"<search> q{rng.randrange(3)} </search>" if d < 1 else "<answer> a0 </answer>"  # noqa: E731
    (outputs,) = grow(config, ScriptedServer(always_wrong), sample())
    rows = verl_postprocess(outputs, monkeypatch, sample())
    rows.append(padding_row(rows))
    advantages, _, metrics = trainer_advantage(rows, config, monkeypatch)
    assert torch.isfinite(advantages).all() and advantages.abs().max() == 0
    assert sum(int(r["response_mask"].sum()) for r in rows) > 0  # critical actions are still trained (with A = 0)
    assert metrics["carl/degenerate_tree_fraction"] == 1.0 and metrics["carl/zero_advantage_fraction"] == 1.0


def test_dump_every_with_questions_and_action_texts(monkeypatch, tmp_path):
    config = make_config(f"trainer.default_local_dir={tmp_path}", "algorithm.carl.dump_every=2")
    (outputs,) = grow(config, ScriptedServer(searching_policy), {**sample(), "global_steps": 2})
    assert outputs[0].extra_fields["carl_tree"]["question"] == "what is the capital of q0"
    rows = verl_postprocess(outputs, monkeypatch, sample())
    trainer_advantage(rows, config, monkeypatch, step=1)
    assert not (tmp_path / "carl_trees").exists()
    trainer_advantage(rows, config, monkeypatch, step=2)
    dumped = (tmp_path / "carl_trees" / "step_000002.jsonl").read_text().splitlines()
    assert len(dumped) == 1
    import json

    record = json.loads(dumped[0])
    check_tree_record(record)
    assert record["question"] == "what is the capital of q0"
    texts = [n["text"] for n in record["nodes"]]
    assert texts[0] is None and all(t and ("</search>" in t or "</answer>" in t) for t in texts[1:])
    assert [n["finish_reason"] for n in record["nodes"]] == [n.finish_reason for n in outputs.tree.nodes]
    # On other steps the description carries no text: the payload stays small.
    (plain,) = grow(config, ScriptedServer(searching_policy), sample())
    assert "text" not in plain[0].extra_fields["carl_tree"] and "question" not in plain[0].extra_fields["carl_tree"]


def test_chain_agent_is_one_trajectory(monkeypatch):
    config = make_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4")
    (outputs,) = grow(config, ScriptedServer(searching_policy), sample(), mode="chain")
    assert len(outputs) == 1
    tree = outputs.tree
    assert len(tree.leaves()) == 1
    actions = [n.action for n in tree.nodes if n.action is not None]
    assert sum(outputs[0].response_mask) == sum(len(a.token_ids) for a in actions)
    rows = verl_postprocess(outputs, monkeypatch, sample())
    assert float(rows[0]["rm_scores"].sum()) == pytest.approx(tree.nodes[tree.leaves()[0]].reward)


@pytest.mark.parametrize(("estimator", "leaves"), [("carl", 7), ("grpo", 1), ("rloo", 1)])
def test_auto_agent_follows_the_estimator(estimator, leaves):
    """`carl_agent` (the training rows' default) grows a tree only under the carl estimator."""
    extra = ["actor_rollout_ref.rollout.n=4"] if estimator != "carl" else []
    config = make_config(f"algorithm.adv_estimator={estimator}", *extra)
    (outputs,) = grow(config, ScriptedServer(searching_policy), sample(), mode="auto")
    assert ended(outputs.tree) == leaves


def test_grpo_budget_counts_every_session(monkeypatch):
    """Under GRPO the CARL trainer keeps verl's advantages and logs the per-question budget of all chains."""
    config = make_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4")
    samples = [{**sample(uid=q), "session_id": i} for q in ("q0", "q1") for i in range(4)]
    results = grow(config, ScriptedServer(searching_policy), *samples, mode="auto")
    pairs = zip(results, samples, strict=True)
    rows = [row for outputs, s in pairs for row in verl_postprocess(outputs, monkeypatch, s)]
    verl_math = []
    monkeypatch.setattr(carl_trainer.PPOTrainerSync, "_compute_advantage", lambda self, b, m: verl_math.append(b) or b)
    advantages, _, stats = trainer_advantage(rows, config, monkeypatch)
    assert len(verl_math) == 1 and advantages is None  # verl's own GRPO path ran; nothing of CARL was written
    chains = [outputs.tree for outputs in results]
    actions = [sum(n.action is not None for n in t.nodes) for t in chains]
    tokens = sum(len(n.action.token_ids) for t in chains for n in t.nodes if n.action is not None)
    assert stats["carl/questions"] == 2 and "carl/trees" not in stats
    assert (
        stats["carl/actions_generated_per_question"] == stats["carl/actions_trained_per_question"] == sum(actions) / 2
    )
    assert stats["carl/tokens_generated"] == stats["carl/tokens_trained"] == tokens
    assert stats["search/calls"] > 0
    assert {"carl/no_signal_group_fraction", "carl/zero_advantage_fraction"} <= stats.keys()  # where signal goes


# ----------------------------------------------------------------------------------------------------- bad input
def test_unknown_mode_is_refused():
    config = make_config()
    for mode in ("forest", "tree"):
        with pytest.raises(ValueError, match=f"mode='{mode}' is unknown: use 'auto'"):
            grow(config, ScriptedServer(searching_policy), sample(), mode=mode)


def reasons(outputs):
    tree = outputs.tree
    return {tree.nodes[leaf].finish_reason for leaf in tree.leaves()}, tree


def test_prompt_too_long(monkeypatch):
    config = make_config("data.max_prompt_length=4")
    server = ScriptedServer(searching_policy)
    (outputs,) = grow(config, server, sample())
    found, tree = reasons(outputs)
    assert found == {"prompt_too_long"} and not server.calls
    assert len(outputs) == 1 and sum(outputs[0].response_mask) == 0
    assert outputs[0].extra_fields["reward_extra_info"]["finish_prompt_too_long"] == 1.0
    rows = verl_postprocess(outputs, monkeypatch, sample())
    advantages, _, _ = trainer_advantage(rows, config, monkeypatch)
    assert advantages.abs().sum() == 0


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (lambda d, rng: "blah " * 40, {"action_too_long"}),  # never stops
        (lambda d, rng: "i think a1 <|end|>", {"invalid:no_action"}),  # never calls a tool
        (lambda d, rng: "<search> </search>", {"invalid:empty_query"}),  # malformed tool call
        (lambda d, rng: "<search> q0", {"invalid:unclosed_tag"}),
        (lambda d, rng: "<search> boom </search>", {"tool_error"}),  # the tool raises
    ],
)
def test_bad_turns_end_leaves_cleanly(policy, expected, monkeypatch):
    config = make_config("algorithm.carl.max_search_error_rate=1.0")  # train through search failures here
    (outputs,) = grow(config, ScriptedServer(policy), sample())
    found, tree = reasons(outputs)
    assert found == expected
    assert ended(tree) == 7  # every rollout still ends in a leaf: N0 + N (identical ones share it)
    category = next(iter(expected)).split(":")[0]
    assert all(o.extra_fields["reward_extra_info"][f"finish_{category}"] == 1.0 for o in outputs)
    rows = verl_postprocess(outputs, monkeypatch, sample())
    advantages, _, _ = trainer_advantage(rows, config, monkeypatch)
    assert torch.isfinite(advantages).all()


def test_empty_generation_ends_the_trajectory_at_its_state(monkeypatch):
    """The engine returns no token: both root rollouts stop at the root (one stop sampled twice), which is folded
    into the root: the root is the tree's only leaf, with an outcome, and no fork can start there."""
    server = ScriptedServer(lambda d, rng: "")
    (outputs,) = grow(make_config(), server, sample())
    found, tree = reasons(outputs)
    assert found == {"empty_generation"} and tree.leaves() == [0] and tree.fork_points == []
    assert len(server.calls) == 2  # the two root rollouts; no fork
    assert outputs[0].extra_fields["reward_extra_info"]["finish_empty_generation"] == 1.0
    rows = verl_postprocess(outputs, monkeypatch, sample())
    advantages, _, metrics = trainer_advantage(rows, make_config(), monkeypatch)
    assert advantages.abs().sum() == 0 and metrics["carl/finish/empty_generation"] == 1


def test_missing_log_probs_are_a_clear_error():
    class NoLogProbs(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
            return TokenOutput(token_ids=out.token_ids, log_probs=None, stop_reason="completed", extra_fields={})

    with pytest.raises(ValueError, match="no per-token log-probs.*calculate_log_probs=true"):
        grow(make_config(), NoLogProbs(searching_policy), sample())


def test_context_overflow(monkeypatch):
    config = make_config("data.max_response_length=14")
    (outputs,) = grow(config, ScriptedServer(lambda d, rng: f"<search> q{rng.randrange(3)} </search>"), sample())
    found, tree = reasons(outputs)
    assert "context_overflow" in found
    for o in outputs:
        assert len(o.response_ids) <= 14


def test_no_search_backend_is_a_clear_error():
    config = make_config()

    async def build():
        return CarlAgentLoop(DictConfigWrap(config), None, TOKENIZER, None, None, DictConfigWrap(config.data))

    with pytest.raises(ValueError, match="tool_config_path"):
        asyncio.run(build())


def test_padding_rows_copy_extra_fields():
    """Guards the assumption the trainer relies on: verl pads with a copy of a real row's extra_fields."""
    src = {"extra_fields": {"carl_token_nodes": [[1, 1]]}, "uid": "x", "responses": torch.ones(3, dtype=torch.long)}
    row, _ = construct_minimal_padding_template(src, {}, 2)
    assert row["extra_fields"] == src["extra_fields"] and row["response_mask"].sum() == 0


# ----------------------------------------------------------------------------------------------------- issue 13
def dead_search_tool():
    """The recipe's real search tool pointed at a port where nothing listens (one attempt, no backoff)."""
    import socket

    from recipe.carl.search.search_tool import CarlSearchTool

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: connections are refused
    return CarlSearchTool({"retrieval_service_url": f"http://127.0.0.1:{port}/retrieve", "max_retries": 0})


def test_a_failed_search_ends_its_leaf_and_stops_the_run(monkeypatch):
    """The real tool never raises; its failure must still end the leaf (no 'Search failed' observation is trained
    on), be counted in search/*, and stop the run above algorithm.carl.max_search_error_rate."""
    config = make_config()
    always_search = ScriptedServer(lambda d, rng: f"<search> q{rng.randrange(3)} </search>")
    (outputs,) = grow(config, always_search, sample(), tool=dead_search_tool())
    found, tree = reasons(outputs)
    assert found == {"tool_error"}
    for node in tree.nodes[1:]:
        assert node.action.observation_ids == [] and "retrieval service is unavailable" in node.action.info["error"]
    assert all(o.extra_fields["reward_extra_info"]["search_errors"] == 1.0 for o in outputs)
    rows = verl_postprocess(outputs, monkeypatch, sample())
    with pytest.raises(carl_trainer.SearchFailureError, match=r"7 of 7 searches failed in step 1 .*error rate 100%"):
        trainer_advantage(rows, config, monkeypatch)
    assert "advantages" not in WRITTEN  # the step stopped before anything was trained
    _, _, metrics = trainer_advantage(rows, make_config("algorithm.carl.max_search_error_rate=1.0"), monkeypatch)
    assert (metrics["search/calls"], metrics["search/errors"], metrics["search/error_rate"]) == (7, 7, 1.0)
    assert metrics["search/latency_mean_s"] > 0


def test_the_search_cache_of_a_tree_is_dropped_when_its_run_ends():
    tool = FakeSearchTool()
    dropped = []
    tool.drop_tree = dropped.append
    server = ScriptedServer(searching_policy)
    grow(make_config(), server, sample(), sample("t1"), tool=tool)
    assert len(dropped) == 2 and set(dropped) == {c["request_id"] for c in server.calls}


def test_full_determinism_gives_every_request_its_own_reproducible_seed():
    """verl seeds every request of a replica alike under full_determinism (setdefault): the loop must not let it."""
    config = make_config("actor_rollout_ref.rollout.full_determinism=True")
    runs = []
    for _ in range(2):
        server = ScriptedServer(searching_policy)
        grow(config, server, sample())
        runs.append([(len(c["prompt_ids"]), c["params"]["seed"]) for c in server.calls])
    seeds = [seed for _, seed in runs[0]]
    assert len(set(seeds)) == len(seeds)  # no two requests share a seed: root rollouts and forks differ
    assert runs[0] == runs[1]  # and the same run reproduces them (no random uid in the seed)


def test_trainer_runs_verls_sync_paths():
    """trainer.v1.trainer_mode=carl selects the CARL trainer, which must run verl's sync code, as GRPO's does."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    config = make_config("data.train_batch_size=8")
    trainer = carl_trainer.CARLTrainer(config)
    assert trainer.trainer_mode == "sync" and config.trainer.v1.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer
    assert trainer.replay_buffer.gen_batch_size == 8  # not 1: prompts are fetched as one batch


def test_a_stop_inside_a_think_block_does_not_end_the_turn():
    """Qwen3-style thinking (algorithm.carl.thinking=true): a stop inside an unclosed <think> continues the turn."""

    def thinker(depth, rng):
        return "<think> maybe <search> q0 </search>" if depth == 0 else "<answer> a1 </answer>"

    class Continuing(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            text = TOKENIZER.decode(prompt_ids)
            if text.rstrip().endswith("</search>") and text.rfind("<think>") > text.rfind("</think>"):
                ids = TOKENIZER.encode("ok </think> <search> q1 </search>", add_special_tokens=False)
                self.calls.append({"prompt_ids": list(prompt_ids), "params": dict(sampling_params)})
                return TokenOutput(token_ids=ids, log_probs=[-0.3] * len(ids), stop_reason="completed")
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)

    config = make_config("algorithm.carl.thinking=true", "algorithm.carl.n0=1", "algorithm.carl.n_forks=0")
    tool = FakeSearchTool()
    (outputs,) = grow(config, Continuing(thinker), sample(), tool=tool)
    first = outputs.tree.nodes[1].action
    assert TOKENIZER.decode(first.token_ids) == "<think> maybe <search> q0 </search> ok </think> <search> q1 </search>"
    assert tool.queries == ["q1"]  # the search outside the think block ran, the one inside did not
    assert len(first.log_probs) == len(first.token_ids)
    # Without thinking, the same policy searches the mentioned query.
    tool = FakeSearchTool()
    plain = make_config("algorithm.carl.n0=1", "algorithm.carl.n_forks=0")
    grow(plain, Continuing(thinker), sample(), tool=tool)
    assert tool.queries == ["q0"]


def test_invalid_action_feedback_keeps_the_episode_going():
    """algorithm.carl.invalid_action=feedback: Search-R1's behaviour, a feedback observation instead of a leaf."""

    def stumbler(depth, rng):
        return "i think" if "valid" not in depth_text[-1] else "<answer> a1 </answer>"

    class Recording(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            depth_text.append(TOKENIZER.decode(prompt_ids))
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)

    depth_text: list[str] = []
    config = make_config("algorithm.carl.invalid_action=feedback", "algorithm.carl.n0=1", "algorithm.carl.n_forks=0")
    (outputs,) = grow(config, Recording(stumbler), sample())
    tree = outputs.tree
    assert [n.finish_reason for n in tree.nodes] == [None, None, "answer"]
    feedback = TOKENIZER.decode(tree.nodes[1].action.observation_ids)
    assert feedback.startswith("<information>") and "previous turn had no valid" in feedback
    (ended,) = grow(make_config("algorithm.carl.n0=1", "algorithm.carl.n_forks=0"), Recording(stumbler), sample())
    assert [n.finish_reason for n in ended.tree.nodes] == [None, "invalid:no_action"]


def test_validation_metrics_say_why_episodes_ended():
    """Validation rows (one trajectory each) carry finish reasons and search counts in their reward breakdown, which
    verl's own validation aggregates into val-aux/<data_source>/finish_<reason>/mean@n metrics."""
    config = make_config("algorithm.carl.max_search_error_rate=1.0")
    policies = [
        lambda d, rng: "<search> q0 </search>" if d < 1 else "<answer> a1 </answer>",  # answers after a search
        lambda d, rng: "i think a1",  # invalid: no action
        lambda d, rng: "<search> boom </search>",  # the search fails
    ]
    infos = []
    for policy in policies:
        (outputs,) = grow(config, ScriptedServer(policy), sample(), mode="chain")
        infos.append(outputs[-1].extra_fields["reward_extra_info"])
    reward_extra_infos = {"reward": [i["score"] for i in infos]} | {k: [i[k] for i in infos] for k in infos[0]}
    trainer = object.__new__(carl_trainer.CARLTrainer)
    metrics = trainer._val_metrics_update(["nq"] * 3, ["u0", "u1", "u2"], reward_extra_infos, [3, 1, 1])
    assert metrics["val-aux/nq/finish_answer/mean@1"] == pytest.approx(1 / 3)
    assert metrics["val-aux/nq/finish_invalid/mean@1"] == pytest.approx(1 / 3)
    assert metrics["val-aux/nq/finish_tool_error/mean@1"] == pytest.approx(1 / 3)
    assert metrics["val-aux/nq/search_calls/mean@1"] == pytest.approx(2 / 3)
    assert metrics["val-aux/nq/search_errors/mean@1"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------- issue 24
def test_identical_actions_merge_into_one_node_and_are_counted(monkeypatch):
    """Every root sample is the same search; answers differ. With merging the root has one child sampled N0 + (forks
    there) times, its action is not critical (no other action was sampled), and `carl/merged_samples_per_tree`
    counts the samples that joined an existing child. Without merging every sample is its own node."""
    same_start = lambda d, rng: "i think <search> q0 </search>" if d < 1 else f"<answer> a{rng.randrange(3)} </answer>"  # noqa: E731
    (merged,) = grow(make_config(), ScriptedServer(same_start), sample())
    (apart,) = grow(make_config("algorithm.carl.merge=false"), ScriptedServer(same_start), sample())
    tree = merged.tree
    (child,) = tree.root.children
    assert tree.nodes[child].count >= 2 and ended(tree) == 7
    assert all(tree.nodes[c].count == 1 or tree.nodes[c].terminal for c in tree.nodes[child].children)
    assert len(apart.tree.root.children) >= 2 and all(n.count == 1 for n in apart.tree.nodes)
    # No two children of a state hold the same action text.
    for node in tree.nodes:
        texts = [tree.nodes[c].action.info["text"] for c in node.children]
        assert len(texts) == len(set(texts))
    rows = verl_postprocess(merged, monkeypatch, sample())
    advantages, _, metrics = trainer_advantage(rows, make_config(), monkeypatch)
    merges = sum(n.count - 1 for n in tree.nodes[1:])
    assert merges > 0 and metrics["carl/merged_samples_per_tree"] == merges
    assert metrics["carl/actions_generated_per_tree"] == sum(n.count for n in tree.nodes[1:])
    carl = read_settings(make_config()).carl
    scored = score_trees([tree], carl)
    assert not scored.trained[child]  # one distinct action at the root: nothing to compare it with
    check_tree_record(tree_records([tree], scored, carl)[0])
    # Each trained action is in exactly one row, with count * A on its tokens.
    check_rows(rows, [tree], carl, advantages)


def test_a_failed_search_carries_no_outcome(monkeypatch, tmp_path):
    """A `tool_error` leaf is left out of the backup: the action before it is never trained, the valued actions keep
    their advantages, the metric counts such leaves, and the dumped tree re-scores to the same values."""
    import json

    from carl_core import pack_descriptions

    def flaky(d, rng):  # the query "boom" makes the fake tool fail
        if d < 1:
            return f"<search> {rng.choice(['q0', 'boom', 'q1'])} </search>"
        return f"<answer> a{rng.randrange(3)} </answer>"

    dump, keep_going = f"trainer.default_local_dir={tmp_path}", "algorithm.carl.max_search_error_rate=1.0"
    config = make_config(dump, "algorithm.carl.dump_every=1", keep_going)
    (outputs,) = grow(config, ScriptedServer(flaky, seed=3), sample())
    tree = outputs.tree
    failed = [n.id for n in tree.nodes if n.finish_reason == "tool_error"]
    assert failed, "the scripted policy must hit the failing query at least once (change the seed otherwise)"
    rows = verl_postprocess(outputs, monkeypatch, sample())
    advantages, _, metrics = trainer_advantage(rows, config, monkeypatch)
    assert metrics["carl/no_outcome_leaves"] == len(failed) == metrics["carl/finish/tool_error"]
    (record,) = [json.loads(line) for line in (tmp_path / "carl_trees" / "step_000001.jsonl").read_text().splitlines()]
    check_tree_record(record)  # independent reference: failed leaves have no value and nothing trains for them
    for i in failed:
        assert record["nodes"][i]["value"] is None and not record["nodes"][i]["trained"]
    # The dump alone is enough to recompute every value.
    nodes = record["nodes"]
    description = {
        "uid": record["uid"],
        "parent": [-1 if n["parent"] is None else n["parent"] for n in nodes],
        "reward": [n["reward"] for n in nodes],
        "entropy": [n["action_entropy"] for n in nodes],
        "tokens": [n["num_action_tokens"] for n in nodes],
        "count": [n["count"] for n in nodes],
        "finish": [n["finish_reason"] for n in nodes],
        "forks": [],
    }
    again = score_trees(pack_descriptions([description]), read_settings(config).carl)
    assert [None if math.isnan(v) else pytest.approx(v) for v in again.node_value.tolist()] == [
        n["value"] for n in nodes
    ]
    assert again.trained.tolist() == [n["trained"] for n in nodes]
    check_rows(rows, [tree], read_settings(config).carl, advantages)


# ----------------------------------------------------------------------------------------------------- fork pool
def grow_pooled(config, server, n=4):
    """n samples of one worker grown concurrently (as verl's AgentLoopWorker starts them), each its own loop."""
    from recipe.carl.pool import POOLS

    POOLS.pools.clear()
    samples = [{**sample(uid=f"t{i}", question=f"what is the capital of q{i}"), "index": i} for i in range(n)]

    async def main():
        loops = [make_loop(config, server) for _ in samples]
        params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
        return await asyncio.gather(*(loop.run(params, **s) for loop, s in zip(loops, samples, strict=True)),
                                    return_exceptions=True)  # fmt: skip

    RecordingLoop.trees = []
    return asyncio.run(main()), list(RecordingLoop.trees)


POOL = ("algorithm.carl.n_forks=5", "algorithm.carl.fork_pool={floor: 1, prior: 2.0}")


def test_a_pool_spends_exactly_the_budget_and_repeats():
    config = make_config(*POOL)
    results, trees = grow_pooled(config, ScriptedServer(searching_policy))
    records = [out[0].extra_fields["carl_tree"]["pool"] for out in results]
    forks = {t.uid: len(t.fork_points) for t in trees}
    # 4 trees x N = 5 forks: every one handed out, each tree at least its floor, the record = the forks it grew.
    assert sum(r["total"] for r in records) == 20 and all(r["total"] >= 1 for r in records)
    assert sorted(forks.values()) == sorted(r["total"] for r in records)
    again, _ = grow_pooled(config, ScriptedServer(searching_policy))
    assert [out[0].extra_fields["carl_tree"]["pool"] for out in again] == records  # the same allocation
    # The trees' rows go through the estimator as any tree's.
    metrics = in_flight_free_pool_metrics([out[0].extra_fields["carl_tree"] for out in results])
    assert metrics["carl/pool_total"] == 20 and metrics["carl/pool_per_tree_min"] >= 1


def in_flight_free_pool_metrics(descriptions):
    from recipe.carl.pool import pool_metrics

    return pool_metrics([d.get("pool") for d in descriptions])


def test_a_failing_tree_does_not_hang_the_pool():
    class FailsForQ2(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            if "capital of q2" in TOKENIZER.decode(prompt_ids):
                raise ConnectionError("server lost")
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)

    results, trees = grow_pooled(make_config(*POOL), FailsForQ2(searching_policy))
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], ConnectionError)
    records = [out[0].extra_fields["carl_tree"]["pool"] for out in results if not isinstance(out, BaseException)]
    # The failed tree's share (5 forks) went to the three others: 20 - their 3 floors = 17 extras, 20 in all.
    assert len(records) == 3 and sum(r["total"] for r in records) == 20 and records[0]["left_out"] == 1


def test_grpo_with_a_pool_grows_groups_of_different_sizes():
    config = make_config("algorithm.adv_estimator=grpo", "algorithm.carl.fork_pool={floor: 2, group: 4}")
    results, trees = grow_pooled(config, ScriptedServer(searching_policy))
    sizes = [len(t.leaves()) for t in trees]
    # 4 questions x 4 trajectories: 16 chains, at least 2 per question, each a row of its own (GRPO's group).
    assert sum(sizes) == 16 and min(sizes) >= 2
    leaves = {t.uid: len(t.leaves()) for t in trees}
    assert all(len(out) == leaves[out[0].extra_fields["carl_tree_id"]] for out in results)
    assert all(t.fork_points == [] for t in trees)


# ------------------------------------------------------------------------------------------------ the tail boost
def test_a_workers_trees_share_one_tail_boost_that_starts_with_the_last_tree(monkeypatch):
    import recipe.carl.agent_loop as agent_loop
    from recipe.carl.in_flight import TAILS

    seen, real = [], agent_loop.grow_tree

    async def recording(tree, planner, env, forks=None, tail=None):
        seen.append(tail)
        return await real(tree, planner, env, forks, tail)

    monkeypatch.setattr(agent_loop, "grow_tree", recording)
    TAILS.steps.clear()
    config = make_config(
        "algorithm.carl.n_forks=3", "algorithm.carl.tail_forks_in_flight=3", "algorithm.carl.tail_share=0.25"
    )
    results, trees = grow_pooled(config, ScriptedServer(searching_policy))
    assert not any(isinstance(r, BaseException) for r in results) and len(trees) == 4
    (boost,) = TAILS.steps.values()
    # Four trees joined one boost (3 forks at once), which started when ceil(0.25 * 4) = 1 tree was left.
    assert len(seen) == 4 and all(t is boost.tail for t in seen) and boost.tail.forks_in_flight == 3
    assert (boost.trees, boost.ended) == (4, 4) and boost.tail.event.is_set()
    assert all(len(t.fork_points) == 3 for t in trees)
    TAILS.steps.clear()
    grow_pooled(make_config("algorithm.carl.n_forks=3"), ScriptedServer(searching_policy))
    assert not TAILS.steps and seen[4:] == [None] * 4  # off by default
