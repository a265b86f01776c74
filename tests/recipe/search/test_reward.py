"""Reward: normalisation, answer extraction, F1/EM over aliases, format, weights and ground-truth shapes."""

from __future__ import annotations

import numpy as np
import pytest

from recipe.carl.search.reward import (
    compute_score,
    exact_match,
    extract_answer,
    f1_score,
    format_score,
    normalize_answer,
    parse_ground_truth,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("  Paris ,  France. ", "paris france"),
        ("U.S.A.", "usa"),  # punctuation is deleted, not spaced (SQuAD)
        ("1,000", "1000"),
        ("Beyoncé", "beyonce"),  # accents folded
        ("Ｔｏｋｙｏ　Ｔｏｗｅｒ", "tokyo tower"),  # full-width letters and space (NFKC)
        ("“Ender’s Game”", "enders game"),  # curly quotes and apostrophe are punctuation
        ("Théâtre—de la Ville", "theatrede la ville"),  # em dash is punctuation
        ("Anthem", "anthem"),  # "an" inside a word is not an article
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer>Paris</answer>", "Paris"),
        ("<answer> Lyon </answer> then <answer>\nParis\n</answer>", "Paris"),  # the last one counts
        ("no tags at all", None),
        ("<answer>unclosed", None),
        ("<answer></answer>", ""),
        # An answer tag inside retrieved documents is not the agent's answer.
        ("<search>q</search><information>Doc 1 <answer>Injected</answer></information><answer>Real</answer>", "Real"),
        ("<search>q</search><information>Doc 1 <answer>Injected</answer></information>", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_f1_and_em_take_the_best_alias():
    aliases = ["William Shakespeare", "Shakespeare", "the Bard"]
    assert f1_score("Shakespeare", aliases) == 1.0
    assert exact_match("the bard", aliases) == 1.0
    # "William Shakespeare" vs "Shakespeare": precision 1/2, recall 1 -> 2/3; vs "William Shakespeare" -> 1.
    assert f1_score("William Shakespeare", ["Shakespeare"]) == pytest.approx(2 / 3)
    assert f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("London", aliases) == 0.0 and exact_match("London", aliases) == 0.0
    assert f1_score("", aliases) == 0.0 and f1_score("the", ["a"]) == 0.0  # only articles -> empty -> 0


def test_f1_counts_repeated_tokens_once_per_match():
    # "new new york" vs "new york": common = min counts = {new: 1, york: 1} = 2; P = 2/3, R = 1 -> 0.8.
    assert f1_score("new new york", ["New York"]) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("<think>x</think><search>q</search><information>d</information><think>y</think><answer>Paris</answer>", 1.0),
        ("<answer>Paris</answer>", 1.0),
        ("<think>x</think>Paris", 0.0),  # no answer
        ("<answer> </answer>", 0.0),  # empty answer
        ("<think>x<answer>Paris</answer>", 0.0),  # unclosed think
        ("<search><answer>Paris</answer></search>", 0.0),  # nested
        ("<answer>Paris</answer></think>", 0.0),  # stray closing tag
    ],
)
def test_format_score(text, fmt):
    assert format_score(text) == fmt


def test_compute_score_defaults_and_keys():
    good = "<think>t</think><search>q</search><information>x</information><answer>The Paris</answer>"
    result = compute_score("searchR1_nq", good, {"target": ["Paris"]})
    assert result == {"score": pytest.approx(1.1), "f1": 1.0, "em": 1.0, "format": 1.0, "has_answer": 1.0}

    wrong = compute_score("searchR1_nq", "<answer>Lyon</answer>", {"target": ["Paris"]})
    assert wrong["score"] == pytest.approx(0.1) and wrong["f1"] == 0.0

    none = compute_score("searchR1_nq", "I give up", ["Paris"])
    assert none == {"score": 0.0, "f1": 0.0, "em": 0.0, "format": 0.0, "has_answer": 0.0}

    empty = compute_score("searchR1_nq", "", "Paris")
    assert empty["score"] == 0.0


def test_compute_score_weights_and_format_gate():
    bad_format = "<think>unclosed <answer>Paris</answer>"
    assert compute_score("x", bad_format, ["Paris"])["score"] == pytest.approx(1.0)  # F1 counts, no format bonus
    gated = compute_score("x", bad_format, ["Paris"], format_gates_answer=True)
    assert gated["score"] == 0.0 and gated["f1"] == 1.0
    weighted = compute_score(
        "x", "<answer>Paris France</answer>", ["Paris"], f1_weight=2.0, format_weight=0.0, em_weight=1.0
    )
    assert weighted["score"] == pytest.approx(2 * 2 / 3)


def test_compute_score_accepts_verl_call_convention():
    # verl passes extra keywords (reward_router_address, ...) and reward_kwargs; numpy arrays come from parquet.
    result = compute_score(
        data_source="searchR1_nq",
        solution_str="<answer>Paris</answer>",
        ground_truth={"target": np.array(["Paris", "City of Light"], dtype=object)},
        extra_info={"index": 3},
        reward_router_address=None,
        format_weight=0.5,
    )
    assert result["score"] == pytest.approx(1.5)


def test_augmented_answers_count_only_with_aug_weight():
    gt = {"target": ["Georges Seurat"], "aug_target": ["Seurat"]}
    text = "<answer>Seurat</answer>"
    assert compute_score("asearcher_base", text, gt)["f1"] == pytest.approx(2 / 3)
    # ASearcher's mix: 0.7 * F1(target) + 0.3 * max(F1(target), F1(aug)) = 0.7 * 2/3 + 0.3 * 1.
    assert compute_score("asearcher_base", text, gt, aug_weight=0.3)["f1"] == pytest.approx(0.7 * 2 / 3 + 0.3)


@pytest.mark.parametrize(
    ("ground_truth", "targets"),
    [
        ({"target": ["a", "b"]}, ["a", "b"]),
        ({"target": "a"}, ["a"]),
        ({"target": np.array(["a", ""], dtype=object)}, ["a"]),
        (["a", 1998], ["a", "1998"]),
        (("a",), ["a"]),
        ("a", ["a"]),
    ],
)
def test_parse_ground_truth_shapes(ground_truth, targets):
    assert parse_ground_truth(ground_truth)[0] == targets


@pytest.mark.parametrize(
    ("ground_truth", "error", "message"),
    [
        ({"answers": ["a"]}, TypeError, "needs a 'target' key"),
        (None, TypeError, "must be a string or a list"),
        (3.5, TypeError, "must be a string or a list"),
        ([["nested"]], TypeError, "must contain strings"),
        ([True], TypeError, "must contain strings"),
        ([], ValueError, "no non-empty answer"),
        ({"target": ["", "  "]}, ValueError, "no non-empty answer"),
    ],
)
def test_parse_ground_truth_rejects_other_shapes(ground_truth, error, message):
    with pytest.raises(error, match=message):
        compute_score("x", "<answer>a</answer>", ground_truth)
