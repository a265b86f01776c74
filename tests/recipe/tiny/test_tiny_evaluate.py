"""Evaluation scores a scripted oracle at 100%, the noisy reference agent at its own success rate, a random model
at ~0, and batched generation matches unbatched generation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.carl.synthhop.agent import ReferenceAgent
from recipe.carl.synthhop.env import SynthHopEnv
from recipe.carl.tiny.evaluate import (
    HFPolicy,
    evaluate_checkpoint,
    evaluate_policy,
    format_table,
    load_eval_set,
    run_episodes,
    summarize,
)


class ReplayPolicy:
    """A fake model that replays scripted actions: it finds the question by its prompt ids and the turn by the
    number of end-of-turn tokens already in the context."""

    def __init__(self, tokenizer, prompts: list[list[int]], actions: list[list[str]]):
        self.tok = tokenizer
        self.script = {tuple(p): a for p, a in zip(prompts, actions, strict=True)}

    def __call__(self, contexts):
        out = []
        for ctx in contexts:
            key = next(p for p in self.script if tuple(ctx[: len(p)]) == p)
            turn = ctx.count(self.tok.eos_token_id)
            out.append(
                self.tok(self.script[key][turn], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            )
        return out


def replay(data, eval_set, noise):
    agent = ReferenceAgent(data.kb, SynthHopEnv(eval_set.search, eval_set.max_turns), noise=noise, seed=1)
    demos = [agent.run(q) for q in data.test]
    tok = data.tokenizer
    prompts = [
        tok(tok.apply_chat_template(q.prompt, tokenize=False, add_generation_prompt=True))["input_ids"]
        for q in eval_set.questions
    ]
    policy = ReplayPolicy(tok, prompts, [[t.action for t in d.turns] for d in demos])
    return demos, run_episodes(policy, tok, eval_set)


def test_oracle_transcripts_score_100_percent(data, data_dir):
    eval_set = load_eval_set(data_dir)
    assert [q.answer for q in eval_set.questions] == [q.answer for q in data.test]
    demos, episodes = replay(data, eval_set, noise=0.0)
    m = summarize(episodes)
    assert m["accuracy"] == 1.0 and m["format"] == 1.0 and m["answered"] == 1.0
    assert m["actions"] == pytest.approx(sum(len(d.turns) for d in demos) / len(demos))
    assert m["actions"] == pytest.approx(sum(q.hops + 1 for q in data.test) / len(data.test))  # hops searches + answer
    assert set(m["by_hops"]) == {q.hops for q in data.test}


def test_noisy_transcripts_score_their_own_success(data, data_dir):
    eval_set = load_eval_set(data_dir)
    demos, episodes = replay(data, eval_set, noise=0.5)
    assert [e.success for e in episodes] == [d.success for d in demos]
    assert 0 < summarize(episodes)["accuracy"] < 1


def test_invalid_actions_end_the_episode_as_format_failures(data, data_dir):
    eval_set = load_eval_set(data_dir, n=3)
    tok = data.tokenizer

    def babble(contexts):
        return [tok("capital capital", add_special_tokens=False)["input_ids"] for _ in contexts]  # no tags, no eos

    m = summarize(run_episodes(babble, tok, eval_set))
    assert (m["accuracy"], m["format"], m["answered"], m["actions"]) == (0.0, 0.0, 0.0, 1.0)


def test_random_model_scores_about_zero(data_dir, tiny_policy_dir):
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    eval_set = load_eval_set(data_dir, n=16)
    for temperature in (0.0, 1.0):
        metrics, episodes = evaluate_policy(model, tok, eval_set, temperature, max_new_tokens=8)
        assert metrics["accuracy"] <= 1 / 16 and metrics["n"] == 16
        assert all(1 <= len(e.actions) <= eval_set.max_turns for e in episodes)


def test_batched_generation_matches_unbatched(data, tiny_policy_dir):
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    contexts = [
        tok(tok.apply_chat_template(d.to_messages()[: 2 + k], tokenize=False, add_generation_prompt=True))["input_ids"]
        for k, d in zip([0, 2, 0, 2, 4], data.demos, strict=False)
    ]
    assert len({len(c) for c in contexts}) > 1  # left padding is exercised
    batched = HFPolicy(model, tok, 0.0, max_new_tokens=6, batch_size=8)(contexts)
    single = HFPolicy(model, tok, 0.0, max_new_tokens=6, batch_size=1)(contexts)
    assert batched == single


def test_sampling_is_seeded(data_dir, tiny_policy_dir):
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    eval_set = load_eval_set(data_dir, n=6)
    runs = [evaluate_policy(model, tok, eval_set, 1.0, seed=s, max_new_tokens=6)[1] for s in (3, 3, 4)]
    assert [e.actions for e in runs[0]] == [e.actions for e in runs[1]] != [e.actions for e in runs[2]]


def test_checkpoint_cli_table(data_dir, tiny_policy_dir):
    results = evaluate_checkpoint(tiny_policy_dir, data_dir, temperatures=(0.0, 0.7), n=4)
    assert list(results) == ["greedy", "T=0.7"]
    table = format_table(results)
    assert "greedy" in table and "T=0.7" in table and "acc 2-hop" in table


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_data"):
        load_eval_set(tmp_path)


def test_negative_temperature_is_refused(tiny_policy_dir):
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    with pytest.raises(ValueError, match="temperature"):
        HFPolicy(torch.nn.Linear(1, 1), tok, temperature=-1.0)
