"""The CARL agent loop against a scripted policy server and a fake search tool, then through verl's own code.

Path checked: `CarlTreeAgentLoop.run` -> verl's `AgentLoopWorkerTQ._agent_loop_postprocess` (the real method,
with TransferQueue replaced by a dict) -> verl's `_balance_batch` padding template -> `CARLTrainer._compute_advantage`
(the real method) -> the registered `carl` estimator. No GPU, no vLLM, no Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from carl_core import ForkPlanner, RolloutTree, check_tree_record, score_trees, tree_records
from recipe.carl.agent_loop import CarlTreeAgentLoop
from recipe.carl.settings import read_settings

CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../recipe/carl/config"))
WORDS = "who what is the capital of answer q0 q1 q2 q3 boom a0 a1 a2 a3 doc says blah i think".split()
TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>"]
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
                *overrides,
            ],
        )


def make_loop(config, server, mode="tree", tool=None, **kwargs) -> CarlTreeAgentLoop:
    return CarlTreeAgentLoop(
        DictConfigWrap(config),
        server,
        TOKENIZER,
        None,
        None,
        DictConfigWrap(config.data),
        mode=mode,
        max_action_tokens=kwargs.pop("max_action_tokens", 16),
        tools=ToolListWrap([tool or FakeSearchTool()]),
        **kwargs,
    )


def sample(uid="t0", question="what is the capital of q0"):
    return {
        "raw_prompt": [{"role": "user", "content": question}],
        "uid": uid,
        "session_id": 0,
        "global_steps": 3,
        "data_source": "nq",
        "reward_model": {"ground_truth": {"target": ["a1"]}},
        "extra_info": {},
    }


async def run_loop(loop_factory, *samples):
    loop = loop_factory()  # AgentLoopBase binds the running event loop in its constructor
    return [await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1}, **s) for s in samples]


def grow(config, server, *samples, mode="tree", tool=None, **kwargs):
    return asyncio.run(run_loop(lambda: make_loop(config, server, mode, tool, **kwargs), *samples))


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
        self.written: dict[str, torch.Tensor] = {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        return list_of_dict_to_tensordict([{f: self.rows[k][f] for f in select_fields} for k in keys])

    def kv_batch_put(self, keys, partition_id, fields):
        for name in fields.keys():
            self.written[name] = fields[name]
        return keys


def trainer_advantage(rows, config, monkeypatch, step=1):
    """Runs the real `CARLTrainer._compute_advantage` on stored rows; returns (advantages, rm_scores, metrics)."""
    fake = FakeTQ(rows)
    monkeypatch.setattr(carl_trainer, "tq", fake)
    trainer = object.__new__(carl_trainer.CARLTrainer)
    trainer.config, trainer.carl_settings, trainer.global_steps = config, read_settings(config), step
    metrics: dict = {}

    class Batch:
        keys = [r["key"] for r in rows]
        partition_id = "train"

        def __len__(self):
            return len(self.keys)

    trainer._compute_advantage(Batch(), metrics)
    pad = lambda t: t.to_padded_tensor(0.0) if t.is_nested else t  # noqa: E731
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
        def next_wave(self, tree):
            before = self.rollouts_started
            wave = super().next_wave(tree)
            if before and wave:  # a fork wave: the pick must be the largest h_hat / n_hat (ties: lowest id)
                cands = [n.id for n in tree.nodes if n.children and not n.terminal and n.depth < tree.max_actions]
                density = {c: tree.state_entropy(c)[0] / tree.state_entropy(c)[1] for c in cands}
                best = max(density.values())
                picks.append((wave[0], min(c for c in cands if density[c] >= best - 1e-12)))
            return wave

    monkeypatch.setattr(carl_agent_loop, "ForkPlanner", RecordingPlanner)
    (outputs,) = grow(config, server, sample())
    tree = RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"])
    carl = read_settings(config).carl
    assert len(tree.leaves()) == carl.n0 + carl.n_forks
    assert len(picks) == carl.n_forks and all(chosen == best for chosen, best in picks)
    assert all(tree.nodes[leaf].depth <= carl.max_actions for leaf in tree.leaves())
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves()} <= {"answer", "max_actions"}
    # one request id per tree (prefix cache), turn-ending stop strings kept in the output, log-probs asked for
    assert len({c["request_id"] for c in server.calls}) == 1
    for call in server.calls:
        params = call["params"]
        assert "</search>" in params["stop"] and "</answer>" in params["stop"]
        assert params["include_stop_str_in_output"] and params["logprobs"]
        used = len(call["prompt_ids"]) - len(tree.prompt_ids)
        assert 1 <= params["max_tokens"] <= min(16, 256 - used)
    check_tree_record(tree_records([tree], score_trees([tree], carl), carl)[0])


def test_max_actions_ends_leaves():
    config = make_config("algorithm.carl.max_actions=3", "algorithm.carl.n_forks=3")
    tool = FakeSearchTool()
    always_search = ScriptedServer(lambda d, rng: f"<search> q{rng.randrange(4)} </search>")
    (outputs,) = grow(config, always_search, sample(), tool=tool)
    tree = RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"])
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves()} == {"max_actions"}
    assert {tree.nodes[leaf].depth for leaf in tree.leaves()} == {3}
    # the T_max-th action is not executed: the search tool ran only for actions at depth < T_max
    assert len(tool.queries) == sum(1 for n in tree.nodes if n.action is not None and n.depth < 3)


def test_wave_runs_concurrently():
    config = make_config("algorithm.carl.wave_size=4", "algorithm.carl.n_forks=8")
    server = ScriptedServer(searching_policy)
    grow(config, server, sample())
    assert server.max_in_flight >= 2


# ----------------------------------------------------------------------------------------------------- rows
def check_rows(rows, trees, carl, advantages):
    """Item 2: every trained action once, with its edge advantage on all its tokens; observations never trained."""
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
    trees = [RolloutTree.from_dict(o[0].extra_fields["carl_tree"]) for o in outs]
    # verl's reward trap: every stored row carries the last output's score ...
    for s, o in zip(samples, outs, strict=True):
        mine = [r for r in rows if r["uid"] == s["uid"]]
        assert {round(float(r["rm_scores"].sum()), 5) for r in mine} == {round(o[-1].reward_score, 5)}
    rows.append(padding_row(rows))
    advantages, rm_scores, metrics = trainer_advantage(rows, config, monkeypatch)
    carl = read_settings(config).carl
    check_rows(rows, trees, carl, advantages)
    # ... and the CARL trainer gives each row its own leaf reward back, on its last token.
    for i, row in enumerate(rows[:-1]):
        tree = trees[[t.uid for t in trees].index(f"{row['uid']}_0")]
        assert rm_scores[i].sum() == pytest.approx(tree.nodes[row["extra_fields"]["carl_leaf"]].reward)
        assert rm_scores[i, len(row["responses"]) - 1] != 0 or tree.nodes[row["extra_fields"]["carl_leaf"]].reward == 0
    assert rm_scores[-1].abs().sum() == 0
    assert metrics["carl/trees"] == 2.0  # the padding row's copied tree is not counted twice
    assert metrics["carl/leaves_per_tree"] == carl.n0 + carl.n_forks
    trained = score_trees(trees, carl).trained.sum()
    assert metrics["carl/actions_trained_per_tree"] == pytest.approx(float(trained) / 2)
    assert torch.isfinite(advantages).all()


def test_equal_rewards_give_zero_advantages(monkeypatch):
    config = make_config()
    always_wrong = lambda d, rng: f"<search> q{rng.randrange(3)} </search>" if d < 1 else "<answer> a0 </answer>"  # noqa: E731
    (outputs,) = grow(config, ScriptedServer(always_wrong), sample())
    rows = verl_postprocess(outputs, monkeypatch, sample())
    rows.append(padding_row(rows))
    advantages, _, _ = trainer_advantage(rows, config, monkeypatch)
    assert torch.isfinite(advantages).all() and advantages.abs().max() == 0
    assert sum(int(r["response_mask"].sum()) for r in rows) > 0  # critical actions are still trained (with A = 0)


def test_dump_every(monkeypatch, tmp_path):
    config = make_config(f"trainer.default_local_dir={tmp_path}", "algorithm.carl.dump_every=2")
    (outputs,) = grow(config, ScriptedServer(searching_policy), sample())
    rows = verl_postprocess(outputs, monkeypatch, sample())
    trainer_advantage(rows, config, monkeypatch, step=1)
    assert not (tmp_path / "carl_trees").exists()
    trainer_advantage(rows, config, monkeypatch, step=2)
    dumped = (tmp_path / "carl_trees" / "step_000002.jsonl").read_text().splitlines()
    assert len(dumped) == 1
    import json

    check_tree_record(json.loads(dumped[0]))


def test_chain_agent_is_one_trajectory(monkeypatch):
    config = make_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4")
    (outputs,) = grow(config, ScriptedServer(searching_policy), sample(), mode="chain")
    assert len(outputs) == 1
    tree = RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"])
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
    tree = RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"])
    assert len(tree.leaves()) == leaves


def test_grpo_budget_counts_every_session(monkeypatch):
    """Under GRPO the trainer logs the per-question budget over all rollout.n chains of a question."""
    config = make_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4")
    samples = [{**sample(uid=q), "session_id": i} for q in ("q0", "q1") for i in range(4)]
    results = grow(config, ScriptedServer(searching_policy), *samples, mode="auto")
    pairs = zip(results, samples, strict=True)
    rows = [row for outputs, s in pairs for row in verl_postprocess(outputs, monkeypatch, s)]
    stats, records = carl_trainer.tree_telemetry(
        [r["extra_fields"] for r in rows], [r["uid"] for r in rows], read_settings(config), budget_only=True
    )
    chains = [RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"]) for outputs in results]
    actions = [sum(n.action is not None for n in t.nodes) for t in chains]
    tokens = sum(len(n.action.token_ids) for t in chains for n in t.nodes if n.action is not None)
    assert records == [] and stats["carl/questions"] == 2
    assert (
        stats["carl/actions_generated_per_question"] == stats["carl/actions_trained_per_question"] == sum(actions) / 2
    )
    assert stats["carl/tokens_generated"] == stats["carl/tokens_trained"] == tokens


# ----------------------------------------------------------------------------------------------------- bad input
def test_tree_agent_under_grpo_is_refused():
    """A tree per session under GRPO would train on rollout.n whole trees per prompt: refuse it, naming the fix."""
    config = make_config("algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4")
    with pytest.raises(ValueError, match="carl_tree_agent.*adv_estimator=grpo.*carl_agent"):
        grow(config, ScriptedServer(searching_policy), sample(), mode="tree")
    with pytest.raises(ValueError, match="mode='forest' is unknown"):
        grow(config, ScriptedServer(searching_policy), sample(), mode="forest")


def reasons(outputs):
    tree = RolloutTree.from_dict(outputs[0].extra_fields["carl_tree"])
    return {tree.nodes[leaf].finish_reason for leaf in tree.leaves()}, tree


def test_prompt_too_long(monkeypatch):
    config = make_config("data.max_prompt_length=4")
    server = ScriptedServer(searching_policy)
    (outputs,) = grow(config, server, sample())
    found, tree = reasons(outputs)
    assert found == {"prompt_too_long"} and not server.calls
    assert len(outputs) == 1 and sum(outputs[0].response_mask) == 0
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
    config = make_config()
    (outputs,) = grow(config, ScriptedServer(policy), sample())
    found, tree = reasons(outputs)
    assert found == expected
    assert len(tree.leaves()) == 7  # every rollout still ends in a leaf: N0 + N
    rows = verl_postprocess(outputs, monkeypatch, sample())
    advantages, _, _ = trainer_advantage(rows, config, monkeypatch)
    assert torch.isfinite(advantages).all()


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
        return CarlTreeAgentLoop(DictConfigWrap(config), None, TOKENIZER, None, None, DictConfigWrap(config.data))

    with pytest.raises(ValueError, match="tool_config_path"):
        asyncio.run(build())


def test_padding_rows_copy_extra_fields():
    """Guards the assumption the trainer relies on: verl pads with a copy of a real row's extra_fields."""
    src = {"extra_fields": {"carl_advantages": [1.0]}, "uid": "x", "responses": torch.ones(3, dtype=torch.long)}
    row, _ = construct_minimal_padding_template(src, {}, 2)
    assert row["extra_fields"] == src["extra_fields"] and row["response_mask"].sum() == 0
