"""Environment: actions through the search package's parser, observations, BM25 retrieval and episode termination."""

import pytest

from recipe.carl.search import retriever as search_retriever
from recipe.carl.search.actions import parse_action
from recipe.carl.synthhop.env import LocalSearch, format_answer, format_search, is_success


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<search> Uldal headquarters </search>", ("search", "Uldal headquarters")),
        ("  <search>Uldal   headquarters</search>\n", ("search", "Uldal headquarters")),
        ("<answer> Kalbor </answer>", ("answer", "Kalbor")),
        ("<answer> Kalbor   Drein </answer>", ("answer", "Kalbor Drein")),
        ("Kalbor", ("invalid", "")),
        ("<answer>  </answer>", ("invalid", "")),
        ("<search> a </answer>", ("invalid", "")),
        ("<search> a </search> <answer> b </answer>", ("invalid", "")),
        ("<answer> <search> a </search> </answer>", ("invalid", "")),
        # As in the agent loop (parse_action): reasoning before the tag is allowed.
        ("thinking <answer> b </answer>", ("answer", "b")),
        ("<think> maybe <answer> x </answer> </think> <search> Uldal ceo </search>", ("search", "Uldal ceo")),
    ],
)
def test_env_reads_actions_as_the_agent_loop_does(env, text, expected):
    env.reset("Kalbor")
    result = env.step(text)
    assert (result.kind, result.argument) == expected
    assert result.kind == parse_action(text).kind


def test_env_parses_with_the_search_packages_parser(env, monkeypatch):
    seen = []

    def spy(text):
        seen.append(text)
        return parse_action(text)

    monkeypatch.setattr("recipe.carl.synthhop.env.parse_action", spy)
    env.reset("Drein")
    env.step(format_answer("Drein"))
    assert seen == [format_answer("Drein")]


def test_format_helpers_parse_back():
    assert parse_action(format_search("Uldal ceo")).query == "Uldal ceo"
    assert parse_action(format_answer("Drein")).answer == "Drein"
    assert is_success(" Drein ", "Drein") and not is_success("drein", "Drein") and not is_success(None, "Drein")


def test_local_search_is_the_search_packages_bm25(kb, search):
    # One BM25: the same ranking and scores as the server's backend, plus zero-score fillers up to top_k.
    assert isinstance(search._bm25, search_retriever.BM25Backend)
    backend = search_retriever.BM25Backend.from_texts([d["contents"] for d in kb.corpus()])
    for name in kb.names()[:40]:
        query = f"{name} spouse"
        served = backend.search([query], 2)[0]
        local = search.retrieve(query)
        assert [(h.title, h.score) for h in local][: len(served)] == [(search.titles[i], score) for i, score in served]
        assert len(local) == 2


def test_own_document_is_the_top_hit_for_every_entity_relation_query(kb, search):
    for e in kb.entities:
        for relation in e.facts:
            assert search.retrieve(f"{e.name} {relation}")[0].title == e.name


def test_observation_format_and_word_cut(kb):
    name = kb.names()[0]
    obs = LocalSearch(kb.corpus(), top_k=2, doc_words=48).observation(f"{name} spouse")
    words = obs.split()
    assert words[:4] == ["<information>", "[", name, "]"] and words[-1] == "</information>"
    assert words.count("[") == 2
    assert kb.document_text(name) in obs
    cut = LocalSearch(kb.corpus(), top_k=1, doc_words=5).observation(f"{name} spouse")
    assert cut.split() == ["<information>", "[", name, "]", *kb.document_text(name).split()[:5], "</information>"]


def test_answer_ends_the_episode_with_exact_match(env, splits):
    q = splits[1][0]
    env.reset(q.answer)
    first = env.step(format_search(q.oracle_queries[0]))
    assert (first.kind, first.done, first.success) == ("search", False, False)
    assert first.observation.startswith("<information>")
    final = env.step(format_answer(q.answer))
    assert (final.kind, final.done, final.success, final.observation) == ("answer", True, True, "")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(format_answer(q.answer))
    env.reset(q.answer)
    assert env.step(format_answer(q.subject)).success is False


def test_invalid_action_ends_the_episode(env):
    env.reset("Drein")
    result = env.step("I think the answer is Drein")
    assert (result.kind, result.done, result.success) == ("invalid", True, False)


def test_turn_budget_ends_the_episode_after_a_search(env, kb):
    env.reset("Drein")
    query = f"{kb.names()[0]} spouse"
    results = [env.step(format_search(query)) for _ in range(env.max_turns)]
    assert [r.done for r in results] == [False] * (env.max_turns - 1) + [True]
    assert results[-1].observation and not results[-1].success
