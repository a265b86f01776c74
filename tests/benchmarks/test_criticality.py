"""`benchmarks/criticality.py`: the summary statistics by hand, and the study on a tiny random policy."""

import numpy as np
import pytest

from benchmarks.criticality import compute_criticality_stats


def test_stats_by_hand():
    entropy = [0.1, 0.2, 0.3, 0.9, 1.0, 1.1]
    spread = [0.0, 0.01, 0.0, 0.45, 0.5, 0.3]
    s = compute_criticality_stats(entropy, spread, near_zero=0.05, high=0.4)
    assert s["n_states"] == 6
    assert s["frac_near_zero_std"] == pytest.approx(3 / 6) and s["frac_high_std"] == pytest.approx(2 / 6)
    assert s["entropy_mean_high"] == pytest.approx(0.95) and s["entropy_mean_near_zero"] == pytest.approx(0.2)
    # Ranks of entropy 1..6; ranks of spread with ties: 1.5, 3, 1.5, 5, 6, 4 -> Pearson of the ranks.
    rh, rc = np.arange(1, 7, dtype=float), np.array([1.5, 3, 1.5, 5, 6, 4])
    expected = np.corrcoef(rh, rc)[0, 1]
    assert s["spearman"] == pytest.approx(expected)
    # Every high-spread entropy exceeds every near-zero one: Brunner-Munzel's variance estimate is 0, p undefined.
    assert s["brunner_munzel_p"] is None
    overlapping = compute_criticality_stats([0.1, 0.2, 0.95, 0.9, 1.0, 1.1], spread)
    assert 0 < overlapping["brunner_munzel_p"] < 1


def test_undefined_parts_are_none():
    s = compute_criticality_stats([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
    assert s["spearman"] is None and s["brunner_munzel_p"] is None and s["entropy_mean_high"] is None
    assert s["frac_near_zero_std"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        compute_criticality_stats([0.1, 0.2], [0.1])


def test_study_runs_on_a_tiny_random_policy(tmp_path):
    """The whole study on a random 1-layer policy: states found, every spread within the reward's range."""
    from benchmarks.criticality import StudyConfig, run_study
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
    from recipe.carl.tiny.policy import TinyPolicyConfig, build_tiny_policy, save_policy

    data = build(SynthHopConfig(n_entities=60, n_train=20, n_test=6, seed=3))
    write(data, tmp_path / "data")
    shape = TinyPolicyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_policy(build_tiny_policy(data.tokenizer, shape, seed=0), data.tokenizer, tmp_path / "policy")
    out = run_study(tmp_path / "policy", tmp_path / "data", StudyConfig(questions=3, k=2, max_actions=3))
    assert out["questions"] == 3 and out["k"] == 2 and out["n_states"] >= 1
    assert 0.0 <= out["frac_near_zero_std"] <= 1.0


def test_the_command_line_names_bad_flags():
    from benchmarks.criticality import main

    with pytest.raises(SystemExit, match="--k 1 >= 2"):
        main(["--k", "1"])
    with pytest.raises(SystemExit, match="give both --policy and --data"):
        main(["--policy", "x"])


def test_criticality_and_entropy_by_kind_by_hand():
    """The paper's Fig. 5: states grouped by the kind of the action taken there."""
    from benchmarks.criticality import compute_kind_stats

    kinds = ["search", "access", "search", "read", "answer", "access"]
    entropy = [0.2, 0.8, 0.4, 0.1, 0.3, 1.0]
    spread = [0.5, 0.45, 0.0, 0.01, 0.02, 0.3]
    s = compute_kind_stats(kinds, entropy, spread, near_zero=0.05, high=0.4)
    assert sorted(s) == ["access", "answer", "read", "search"]
    assert s["search"] == {"n_states": 2, "criticality_mean": 0.25, "entropy_mean": pytest.approx(0.3),
                           "frac_high_std": 0.5, "frac_near_zero_std": 0.5}  # fmt: skip
    assert s["access"]["criticality_mean"] == pytest.approx(0.375) and s["access"]["frac_high_std"] == 0.5
    assert s["read"] == {"n_states": 1, "criticality_mean": 0.01, "entropy_mean": 0.1, "frac_high_std": 0.0,
                         "frac_near_zero_std": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match="one value per state: 2, 1, 1"):
        compute_kind_stats(["search", "read"], [0.1], [0.2])


def test_study_by_kind_runs_on_the_pages_variant(tmp_path):
    """The study under the paper's action space: every state's kind is one the pages variant's policy can take."""
    from benchmarks.criticality import StudyConfig, run_study
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
    from recipe.carl.synthhop.pages import PagesConfig
    from recipe.carl.tiny.policy import TinyPolicyConfig, build_tiny_policy, save_policy

    data = build(SynthHopConfig(n_entities=60, n_train=20, n_test=4, seed=3, pages=PagesConfig(), max_turns=8))
    write(data, tmp_path / "data")
    shape = TinyPolicyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_policy(build_tiny_policy(data.tokenizer, shape, seed=0), data.tokenizer, tmp_path / "policy")
    cfg = StudyConfig(questions=2, k=2, max_actions=3, action_space="paper", response_length=256)
    out = run_study(tmp_path / "policy", tmp_path / "data", cfg)
    assert out["action_space"] == "paper" and sum(v["n_states"] for v in out["by_kind"].values()) == out["n_states"]
    assert set(out["by_kind"]) <= {"search", "access", "read", "answer", "invalid"}


def test_the_paper_study_needs_its_policy_and_data():
    from benchmarks.criticality import main

    with pytest.raises(SystemExit, match="--action-space paper needs --policy and --data"):
        main(["--action-space", "paper"])
