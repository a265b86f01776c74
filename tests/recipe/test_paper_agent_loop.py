"""The CARL agent loop with the paper's action space (`algorithm.carl.action_space=paper`): search, access, read and
answer against a scripted policy and fake `search` / `access` tools, then through verl's own row post-processing and
the CARL trainer's advantage step (`tests/recipe/test_carl_agent_loop.py` has the machinery)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.workers.rollout.replica import TokenOutput

from carl_core import score_trees
from recipe.carl.action_kinds import action_kind_stats
from recipe.carl.agent_loop import SearchEnvironment
from recipe.carl.search.action_space import PaperActions
from recipe.carl.settings import read_settings
from tests.core.support import check_tree_record
from tests.recipe import test_carl_agent_loop as base
from tests.recipe.test_carl_agent_loop import (
    RecordingLoop,
    make_config,
    padding_row,
    trainer_advantage,
    verl_postprocess,
)

PAPER_REASONS = ("unknown_page", "read_without_page", "read_past_end", "no_action")
TAGS = [f"<{s}{t}>" for t in ("search", "access", "read", "answer", "information", "think") for s in ("", "/")]
PAGE = "P\none two . three four . four one ."  # 3 parts of at most 12 characters, one sentence each
#: Every text the tests encode or decode, so the word-level vocabulary has each of its words.
TEXTS = ["q1 q2 p1 p9 boom a0 a1 hm 9 Doc 1 (id: p1, Title: P) snippet", PAGE]
TEXTS += [f"Page p1 (Title: P), part {k} of 3:" for k in (1, 2, 3)]
TEXTS += [PaperActions().feedback(r, page=p, parts=3, want=9) for r in PAPER_REASONS for p in ("p1", "p9")]


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = [w for text in TEXTS + base.WORDS for w in text.split() if w not in TAGS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<|end|>", *base.ROLES, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=base.ROLES,
        chat_template=base.CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


TOKENIZER = make_tokenizer()


def reader(text: str, rng: random.Random) -> str:
    """Searches, opens p1 (sometimes reads on once or twice), answers a0 or a1 (a1 is right)."""
    if "</search>" not in text:
        return f"<search> q{rng.randrange(1, 3)} </search>"
    if "</access>" not in text:
        return "<access> p1 </access>"
    if text.count("</read>") < 2 and rng.random() < 0.6:
        return "<read> </read>"
    return f"<answer> a{rng.randrange(2)} </answer>"


class Server:
    """`generate` double: the next action is a function of the decoded prefix and a seeded draw per visit."""

    def __init__(self, policy, seed: int = 0):
        self.policy, self.seed, self.visits, self.calls = policy, seed, {}, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        await asyncio.sleep(0)
        key = tuple(prompt_ids)
        visit = self.visits[key] = self.visits.get(key, 0) + 1
        self.calls.append(dict(sampling_params))
        digest = hashlib.sha256(repr((self.seed, key, visit)).encode()).digest()
        text = self.policy(TOKENIZER.decode(prompt_ids), random.Random(digest))
        ids = TOKENIZER.encode(text, add_special_tokens=False)[: sampling_params["max_tokens"]]
        return TokenOutput(token_ids=ids, log_probs=[-0.1 - digest[0] / 255] * len(ids), stop_reason="completed")


def _schema(name: str, arg: str) -> OpenAIFunctionToolSchema:
    parameters = {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}
    return OpenAIFunctionToolSchema.model_validate(
        {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}
    )


class FakeSearch(BaseTool):
    """A `search` tool that shows ids, as `CarlSearchTool` with `show_ids: true` does."""

    def __init__(self, show_ids: bool = True):
        super().__init__({}, _schema("search", "query"))
        self.settings = {"show_ids": show_ids}

    async def execute(self, instance_id, parameters, **kwargs):
        return ToolResponse(text=f"Doc 1 (id: p1, Title: P) snippet {parameters['query']}"), 0.0, {"search/ok": 1.0}


class FakeAccess(BaseTool):
    """An `access` tool with the metrics of `CarlAccessTool`: p1 is a page, boom fails, anything else is unknown."""

    def __init__(self):
        super().__init__({}, _schema("access", "id"))
        self.ids: list[str] = []

    async def execute(self, instance_id, parameters, **kwargs):
        self.ids.append(parameters["id"])
        if parameters["id"] == "boom":
            return ToolResponse(text="Access failed: down"), 0.0, {"search/ok": 0.0}
        found = parameters["id"] == "p1"
        return ToolResponse(text=PAGE if found else ""), 0.0, {"search/ok": 1.0, "search/page_found": float(found)}


def paper_config(*overrides: str):
    return make_config(
        "algorithm.carl.action_space=paper",
        "algorithm.carl.page_chunk_chars=12",  # PAGE's text in 3 parts: "one two ." "three four ." ...
        "algorithm.carl.max_actions=6",
        "data.max_response_length=512",
        *overrides,
    )


def grow(config, policy, tools=None, mode="auto", seed=0, server=None):
    """One `run()` of the agent loop; returns its outputs and its tree (the server's calls: `grow.server.calls`)."""
    RecordingLoop.trees = []
    tools = tools if tools is not None else [FakeSearch(), FakeAccess()]
    grow.server = server or Server(policy, seed)

    async def run():
        loop = RecordingLoop(
            DictConfigWrap(config), grow.server, TOKENIZER, None, None, DictConfigWrap(config.data),
            mode=mode, tools=ToolListWrap(tools),
        )  # fmt: skip
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1}, **base.sample())

    outputs = asyncio.run(run())
    return outputs, RecordingLoop.trees[-1]


def test_access_and_read_are_actions_whose_page_parts_are_never_trained(monkeypatch):
    monkeypatch.setattr(base, "TOKENIZER", TOKENIZER)  # the verl post-processing helpers decode with it
    config = paper_config()
    outputs, tree = grow(config, reader)
    kinds = [n.action.info["kind"] for n in tree.nodes if n.action is not None]
    assert {"search", "access", "read", "answer"} <= set(kinds)
    carl = read_settings(config).carl
    records = base.tree_records([tree], score_trees([tree], carl), carl)
    check_tree_record(records[0])
    # Every access shows part 1 of PAGE, every read the next part; the part is the next state's, as an observation.
    for node in tree.nodes:
        info = node.action.info if node.action else {}
        if info.get("kind") in ("access", "read"):
            shown = TOKENIZER.decode(node.action.observation_ids)
            assert (
                shown == f"<information> Page p1 (Title: P), part {info['part']} of 3: {info_part(info)} </information>"
            )
    # The rows through verl's own post-processing: no token of a page's part is trained.
    rows = verl_postprocess(outputs, monkeypatch, base.sample())
    parts_seen = 0
    for row in rows:
        nodes = [node for node, count in row["extra_fields"]["carl_token_nodes"] for _ in range(count)]
        mask = row["response_mask"].tolist()
        text = TOKENIZER.convert_ids_to_tokens(row["responses"].tolist())
        for i, token in enumerate(text):
            if token == "Page":  # the first token of a part
                parts_seen += 1
                assert nodes[i] == -1 and mask[i] == 0
        assert all(m == 0 for n, m in zip(nodes, mask, strict=False) if n == -1)
    assert parts_seen > 0
    # Every sampling request stops at the paper's four closing tags.
    assert grow.server.calls and all(
        c["stop"] == ["</search>", "</access>", "</read>", "</answer>"] for c in grow.server.calls
    )


def info_part(info: dict) -> str:
    return ["one two .", "three four .", "four one ."][info["part"] - 1]


def test_the_kind_metrics_count_what_the_tree_did(monkeypatch):
    monkeypatch.setattr(base, "TOKENIZER", TOKENIZER)
    config = paper_config()
    access = FakeAccess()
    outputs, tree = grow(config, reader, seed=1, tools=[FakeSearch(), access])
    rows = verl_postprocess(outputs, monkeypatch, base.sample())
    rows.append(padding_row(rows))
    _, _, metrics = trainer_advantage(rows, config, monkeypatch)
    scored = score_trees([tree], read_settings(config).carl)
    samples = {k: 0 for k in ("search", "access", "read", "answer")}
    trained = dict.fromkeys(samples, 0)
    for node in tree.nodes[1:]:
        samples[node.action.info["kind"]] += node.count
        trained[node.action.info["kind"]] += bool(scored.trained[node.id])
    for kind in samples:  # one question in the step
        assert metrics[f"carl/kind_generated/{kind}"] == samples[kind]
        assert metrics[f"carl/kind_trained/{kind}"] == trained[kind]
    assert sum(v for k, v in metrics.items() if k.startswith("carl/kind_fork_share/")) == pytest.approx(1.0)
    # A tree fetches a page once (its environment keeps it for the other accesses and the reads): one tool call.
    assert metrics["search/accesses"] == len(access.ids) == 1 and samples["access"] > 1
    assert metrics["search/calls"] == 1 + sum(n.count for n in tree.nodes[1:] if n.action.info.get("searched"))


def test_the_fork_share_of_a_kind_is_where_the_forks_went_by_hand():
    """Two trees by hand: forks at states whose first action was a search (2) and an access (1)."""
    from carl_core import pack_descriptions

    def description(uid, parent, kinds, forks):
        n = len(parent)
        return {"uid": uid, "parent": parent, "reward": [None] * n, "entropy": [None] + [0.5] * (n - 1),
                "tokens": [0] + [3] * (n - 1), "count": [1] * n, "finish": [None] * n, "forks": forks,
                "aborted": 0, "kind": kinds}  # fmt: skip

    # Tree a: root -search-> 1 -access-> 2; root forked once (its first action: search), state 1 forked once
    # (first action: access), giving 3 (a second search) and 4 (a read).
    a = description("a", [-1, 0, 1, 0, 1], [None, "search", "access", "search", "read"], [0, 1])
    # Tree b: root -search-> 1, root forked once (first: search) -> 2 (an answer).
    b = description("b", [-1, 0, 0], [None, "search", "answer"], [0])
    arrays = pack_descriptions([a, b])
    kinds = a["kind"] + b["kind"]
    trained = arrays.parent >= 0
    stats = action_kind_stats(arrays, kinds, trained, questions=2)
    assert stats["carl/kind_fork_share/search"] == pytest.approx(2 / 3)  # forks at both roots
    assert stats["carl/kind_fork_share/access"] == pytest.approx(1 / 3)  # the fork at a's state 1
    assert stats["carl/kind_fork_share/read"] == stats["carl/kind_fork_share/answer"] == 0  # no fork at their states
    assert stats["carl/kind_generated/search"] == 3 / 2 and stats["carl/kind_trained/read"] == 1 / 2
    with pytest.raises(ValueError, match="need one kind per node, got 2 for 8 nodes"):
        action_kind_stats(arrays, kinds[:2], trained, questions=2)


@pytest.mark.parametrize(
    ("policy", "finish", "feedback"),
    [
        (lambda t, r: "<read> </read>", "invalid:read_without_page", "No page is open."),
        (
            lambda t, r: "<search> q1 </search>" if "</search>" not in t else "<access> p9 </access>",
            "invalid:unknown_page",
            "There is no page with the id p9.",
        ),
        (
            lambda t, r: "<access> p1 </access>" if "</access>" not in t else "<read> 9 </read>",
            "invalid:read_past_end",
            "Page p1 has 3 parts; there is no part 9.",
        ),
        (lambda t, r: "<access> </access>", "invalid:empty_page_id", "To open the page of a search result"),
    ],
)
def test_bad_accesses_and_reads_end_their_leaf_or_get_feedback_that_names_them(policy, finish, feedback):
    _, ended = grow(paper_config(), policy, mode="chain")
    assert ended.nodes[ended.leaves()[0]].finish_reason == finish
    _, fed = grow(paper_config("algorithm.carl.invalid_action=feedback"), policy, mode="chain")
    told = [
        TOKENIZER.decode(n.action.observation_ids)
        for n in fed.nodes[1:]
        if n.action.info.get("reason") and n.action.observation_ids
    ]
    assert told and all(t.startswith("<information>") and feedback in t for t in told)


def test_feedback_texts_by_reason_reach_the_observation():
    """A part past a page's end through `SearchEnvironment` directly: the leaf ends, or its feedback names the page."""
    env = SearchEnvironment(
        generate=None, tokenizer=TOKENIZER, search=lambda q, t: "x", reward_fn=lambda **k: 0.0, sampling_params={},
        request_id="r", data_source="d", ground_truth=None, extra_info=None, max_action_tokens=8,
        response_length=64, actions=base.carl_agent_loop.make_action_space("paper", 12), access=lambda i, t: None,
    )  # fmt: skip
    step = env._invalid([1], [-0.1], {"kind": "read"}, "read_past_end", last=False, page="p1", parts=3, want=9)
    assert step.finish_reason == "invalid:read_past_end"  # invalid_action defaults to end
    env.invalid_action = "feedback"
    step = env._invalid([1], [-0.1], {"kind": "read"}, "read_past_end", last=False, page="p1", parts=3, want=9)
    assert TOKENIZER.decode(step.observation_ids).startswith("<information> Page p1 has 3 parts")
    with pytest.raises(ValueError, match="the paper action space opens pages: give SearchEnvironment an access="):
        SearchEnvironment(
            generate=None, tokenizer=TOKENIZER, search=None, reward_fn=None, sampling_params={}, request_id="r",
            data_source="d", ground_truth=None, extra_info=None, max_action_tokens=8, response_length=64,
            actions=base.carl_agent_loop.make_action_space("paper"),
        )  # fmt: skip


def test_a_failed_access_ends_the_leaf_without_outcome_and_counts_as_a_failed_search(monkeypatch):
    monkeypatch.setattr(base, "TOKENIZER", TOKENIZER)
    config = paper_config("algorithm.carl.max_search_error_rate=1.0")
    policy = lambda t, r: "<search> q1 </search>" if "</search>" not in t else "<access> boom </access>"  # noqa: E731
    outputs, tree = grow(config, policy, mode="chain")
    leaf = tree.nodes[tree.leaves()[0]]
    assert leaf.finish_reason == "tool_error" and "Access failed: down" in leaf.action.info["error"]
    breakdown = outputs[-1].extra_fields["reward_extra_info"]
    assert breakdown["search_calls"] == 1 and breakdown["access_actions"] == 1 and breakdown["search_errors"] == 1
    assert breakdown["read_actions"] == 0 and breakdown["finish_tool_error"] == 1
    # The default action space keeps its breakdown keys.
    assert (
        "access_calls"
        not in base.grow(make_config(), base.ScriptedServer(base.searching_policy), base.sample())[0][-1].extra_fields[
            "reward_extra_info"
        ]
    )


def test_the_paper_space_needs_an_access_tool_and_a_search_that_shows_ids():
    with pytest.raises(ValueError, match="needs a verl tool named `access`: set .* to recipe/carl/search/pages_tool"):
        grow(paper_config(), reader, tools=[FakeSearch()])
    with pytest.raises(ValueError, match="the `search` tool hides the result ids an <access> names"):
        grow(paper_config(), reader, tools=[FakeSearch(show_ids=False), FakeAccess()])


def test_a_stop_inside_a_think_block_continues_a_paper_turn():
    def thinker(text, rng):
        return "<think> hm <read> </read>" if "</think>" not in text else "<answer> a1 </answer>"

    class Continuing(Server):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            text = TOKENIZER.decode(prompt_ids)
            if text.rstrip().endswith("</read>") and text.rfind("<think>") > text.rfind("</think>"):
                ids = TOKENIZER.encode("</think> <access> p1 </access>", add_special_tokens=False)
                return TokenOutput(token_ids=ids, log_probs=[-0.3] * len(ids), stop_reason="completed")
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)

    access = FakeAccess()
    config = paper_config("algorithm.carl.thinking=true", "algorithm.carl.n0=1", "algorithm.carl.n_forks=0")
    _, tree = grow(config, thinker, tools=[FakeSearch(), access], server=Continuing(thinker))
    first = tree.nodes[1].action
    assert TOKENIZER.decode(first.token_ids) == "<think> hm <read> </read> </think> <access> p1 </access>"
    assert first.info["kind"] == "access" and access.ids == ["p1"]  # the read inside the think block did not run
