"""`recipe.carl.tiny.local_agent`: the agent loop's environment on an in-process policy."""

from types import SimpleNamespace

import pytest

from recipe.carl.tiny.local_agent import LocalAgent, main
from recipe.carl.tiny.trajectory import agent_loop_example


@pytest.fixture(scope="module")
def agent(tiny_policy_dir, data_dir):
    return LocalAgent(tiny_policy_dir, data_dir, max_actions=4)


class OracleServer:
    """Answers each question with its oracle searches then the gold answer (or a wrong one), as token ids."""

    def __init__(self, agent, rows, wrong=False):
        self.agent, self.rows, self.wrong = agent, rows, wrong

    async def generate(self, request_id, prompt_ids, sampling_params):
        i = int(request_id.removeprefix("eval").split(".")[0])  # eval{i}, or eval{i}.{j} with several samples
        row, tok = self.rows[i], self.agent.tokenizer
        done = tok.decode(prompt_ids).count("</search>")
        queries = list(row["extra_info"]["oracle_queries"])
        answers = [r["reward_model"]["ground_truth"]["target"][0] for r in self.rows]
        # A wrong answer: another question's (in-vocabulary) answer that differs from this one's.
        answer = next(a for a in answers[i + 1 :] + answers[:i] if a != answers[i]) if self.wrong else answers[i]
        text = f"<search> {queries[done]} </search>" if done < len(queries) else f"<answer> {answer} </answer>"
        ids = tok.encode(text, add_special_tokens=False)
        return SimpleNamespace(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})


def test_prompt_layout_matches_the_sft_layout(agent):
    """The root state is exactly the prompt part of an SFT example (`agent_loop_example`), untrained."""
    row = agent.rows("test", 1)[0]
    tree = agent.new_tree(row, "t")
    messages = [dict(m) for m in row["prompt"]] + [{"role": "assistant", "content": "<answer> x </answer>"}]
    example = agent_loop_example(agent.tokenizer, messages, lambda q: [])
    n = len(tree.prompt_ids)
    assert n > 5 and example.input_ids[:n] == tree.prompt_ids
    assert not any(example.loss_mask[:n]) and all(example.loss_mask[n:])


def test_oracle_policy_scores_full_marks_and_a_wrong_one_none(agent):
    rows = agent.rows("test", 6)
    real = agent.server
    try:
        agent.server = OracleServer(agent, rows)
        right = agent.evaluate(rows)
        agent.server = OracleServer(agent, rows, wrong=True)
        wrong = agent.evaluate(rows)
    finally:
        agent.server = real
    assert right["n"] == 6 and right["em"] == 1.0 and right["format"] == 1.0
    assert right["score"] == pytest.approx(1.1)  # F1 + 0.1 format (recipe.carl.search.reward)
    assert wrong["em"] == 0.0 and wrong["score"] == pytest.approx(0.1)


def test_several_samples_per_question_are_averaged(agent):
    rows = agent.rows("test", 3)
    real = agent.server
    try:
        agent.server = OracleServer(agent, rows)
        result = agent.evaluate(rows, temperature=0.7, samples=2)
    finally:
        agent.server = real
    assert result["n"] == 6 and result["em"] == 1.0


def test_cli_exclude_drops_the_questions_of_another_split(tiny_policy_dir, data_dir):
    base = ["--policy", str(tiny_policy_dir), "--data", str(data_dir), "--questions", "0"]
    n_test = len(LocalAgent.rows(SimpleNamespace(data_dir=data_dir), "test"))
    # Train and test questions are disjoint: excluding train keeps every test row; excluding test keeps none.
    assert main([*base, "--exclude", str(data_dir / "train.parquet")])["n"] == n_test
    assert main([*base, "--exclude", str(data_dir / "test.parquet")])["n"] == 0
    with pytest.raises(SystemExit, match="--exclude .* is not a file"):
        main([*base, "--exclude", str(data_dir / "nope.parquet")])
    with pytest.raises(SystemExit, match="--samples 0 must be >= 1"):
        main([*base, "--samples", "0"])


def test_random_policy_rollouts_end_in_leaves(agent):
    rows = agent.rows("test", 4)
    greedy = agent.evaluate(rows)
    assert greedy["n"] == 4 and 0.0 <= greedy["score"] <= 1.1
    assert agent.evaluate(rows) == greedy  # greedy decoding is deterministic


def test_cli_names_a_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="--policy .* is not a folder"):
        main(["--policy", str(tmp_path / "nope"), "--data", str(tmp_path)])
