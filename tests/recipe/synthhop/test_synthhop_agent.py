"""Reference agent: the oracle always succeeds, p=0.3 succeeds ~87% of the time, demos are well formed."""

import pytest

from recipe.carl.search.actions import parse_action
from recipe.carl.synthhop.agent import Demo, ReferenceAgent, make_demos, read_fact, success_rate


def test_oracle_agent_always_succeeds_with_one_search_per_hop(kb, env, splits):
    demos = make_demos(ReferenceAgent(kb, env, noise=0.0), splits[0] + splits[1])
    assert success_rate(demos)["all"] == 1.0
    assert all(len(d.turns) == d.hops + 1 and d.wrong_searches == 0 for d in demos)


def test_noisy_agent_success_is_near_the_probe(kb, env, splits):
    # Expected: 0.2 * 1 + 0.4 * 0.9 + 0.4 * 0.81, minus 3-hop episodes that run out of turns = 0.875 (probe: 0.874).
    rate = success_rate(make_demos(ReferenceAgent(kb, env, noise=0.3, seed=0), splits[0]))
    assert 0.80 <= rate["all"] <= 0.95
    assert rate["hops=1"] == 1.0  # early answers start at hop 2 and one detour fits the budget


def test_same_seed_same_demos(kb, env, splits):
    def run(seed):
        return make_demos(ReferenceAgent(kb, env, noise=0.3, seed=seed), splits[0][:50])

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_demo_messages_alternate_and_round_trip(kb, env, splits):
    demos = make_demos(ReferenceAgent(kb, env, noise=0.5, seed=0), splits[0][:100])
    assert any(d.early_answer for d in demos) and any(d.wrong_searches for d in demos)
    for d in demos:
        messages = d.to_messages()
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        assert messages[1]["content"] == d.question
        for m in messages[2:]:
            if m["role"] == "assistant":
                assert parse_action(m["content"]).kind in ("search", "answer")
            else:
                assert m["role"] == "tool" and m["content"].startswith("<information>")
        assert Demo.from_dict(d.to_dict()) == d


def test_make_demos_cycles_through_questions(kb, env, splits):
    demos = make_demos(ReferenceAgent(kb, env, noise=0.0), splits[0][:3], n=7)
    assert [d.question for d in demos] == [q.text for q in splits[0][:3]] * 2 + [splits[0][0].text]
    with pytest.raises(ValueError, match="--n-train"):
        make_demos(ReferenceAgent(kb, env), [], n=1)


def test_read_fact():
    obs = "<information> [ Ab_Cd ] Ab_Cd was born in Efgh . Ab_Cd works for Ijkl . </information>"
    assert read_fact(obs, "Ab_Cd", "birthplace") == "Efgh"
    assert read_fact(obs, "Ab_Cd", "employer") == "Ijkl"
    assert read_fact(obs, "Ab_Cd", "spouse") is None
    assert read_fact(obs, "Cd", "birthplace") is None  # a suffix of a name is not the name


def test_noise_out_of_range(kb, env):
    with pytest.raises(ValueError, match="--noise"):
        ReferenceAgent(kb, env, noise=1.5)
