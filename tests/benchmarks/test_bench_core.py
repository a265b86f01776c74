"""`benchmarks/bench_core.py` on a few small trees: what it times is the production path (the rows it builds are the
agent loop's, its estimator call gives the trained tokens their tree's advantages), and its payload accounting."""

import pickle

import torch

from benchmarks.bench_core import CONFIG, agent_loop_fields, batch_inputs, main, make_trees, payload
from carl_core import score_trees


def test_fields_are_the_agent_loops_rows_and_the_estimator_scores_them():
    from recipe.carl.estimator import carl_batch_from_rows, compute_carl_advantage

    trees = make_trees(3, action_tokens=8, obs_tokens=4)
    fields, uids, mask = batch_inputs(trees)
    assert [f["carl_tree"] is not None for f in fields].count(True) == len(trees)  # one description per tree
    width = mask.shape[1]
    algorithm = {"carl": {"n0": CONFIG.n0, "n_forks": CONFIG.n_forks, "max_actions": CONFIG.max_actions}}
    advantages, _ = compute_carl_advantage(
        torch.zeros(mask.shape), mask, config=algorithm, carl_batch=carl_batch_from_rows(fields, uids, width)
    )
    # Every trained token carries its action's edge advantage V(v) - V(u), read off the scored trees independently.
    scored = score_trees(trees, CONFIG)
    expected = set()
    for b, tree in enumerate(trees):
        for node in tree.nodes[1:]:
            v = scored.arrays.offsets[b] + node.id
            if scored.trained[v]:
                expected.add(round(float(scored.advantage[v]), 6))
    got = {round(float(a), 6) for a in advantages[mask.bool()]}
    assert got <= expected and len(got) > 1
    assert torch.all(advantages[~mask.bool()] == 0)


def test_payload_before_and_after_and_the_last_line(capsys):
    rows, pad, before, after = payload(make_trees(2, action_tokens=20, obs_tokens=50), multiple=16)
    assert (rows + pad) % 16 == 0 and 0 <= pad < 16
    assert after < before  # token ids and log-probs no longer travel in extra_fields
    trees = make_trees(1, action_tokens=20, obs_tokens=50)
    assert all(len(pickle.dumps(f)) < 20_000 for f in agent_loop_fields(trees[0]))
    line = main(["--trees", "4", "--repeats", "1"])
    assert line.startswith("time ratio=") and "payload ratio=" in line
    assert capsys.readouterr().out.rstrip().endswith(line)
