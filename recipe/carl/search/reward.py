"""Outcome reward for the search agent: answer F1 (and EM) plus a format reward.

The paper (CARL, §5 training setup) uses "format reward + F1 answer reward" without giving weights. Defaults here:

    score = f1_weight * F1 + format_weight * format + em_weight * EM,   f1_weight=1.0, format_weight=0.1, em_weight=0

so a well-formed but wrong episode earns 0.1 and a perfect one 1.1. The small format term keeps a signal for
learning the protocol when every answer is wrong early in training, without outweighing answer quality. Set
``format_gates_answer=True`` to instead zero the answer terms of badly formatted episodes (ASearcher's choice).

Decisions:
    * **Which answer.** The *last* ``<answer>...</answer>`` counts, as in Search-R1. ``<information>`` blocks are
      removed first, so a retrieved document that happens to contain answer tags cannot inject an answer.
    * **Aliases.** F1 and EM are the maximum over all ground-truth aliases.
    * **Normalisation.** SQuAD/Search-R1 rules (lowercase; drop punctuation, the articles a/an/the and extra
      whitespace), preceded by Unicode NFKC and accent folding, so "Beyoncé" matches "Beyonce", full-width
      characters match ASCII, and curly quotes count as punctuation.
    * **Format.** 1.0 when the response has a non-empty final answer and its ``think``/``search``/``answer``/
      ``information``/``tool_call`` tags are balanced and not nested in one another; else 0.0.
    * **ASearcher augmented answers.** ``ground_truth["aug_target"]`` (written by ``data_preprocess/asearcher_base``)
      is ignored unless ``aug_weight > 0``; then F1 = (1 - w) * F1(target) + w * max(F1(target), F1(aug_target)),
      which is ASearcher's mix at w = 0.3.

Plug into verl with ``reward.custom_reward_function.path=recipe/carl/search/reward.py`` and
``reward.custom_reward_function.name=compute_score``; weights go under ``reward.custom_reward_function.reward_kwargs``.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "compute_score",
    "exact_match",
    "extract_answer",
    "f1_score",
    "format_score",
    "normalize_answer",
    "parse_ground_truth",
]

_INFORMATION_BLOCK = re.compile(r"<information>.*?</information>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_TAG = re.compile(r"<(/?)(think|search|answer|information|tool_call)>")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalises an answer for matching: NFKC, accent folding, lowercase, no punctuation/articles/extra spaces.

    Args:
        text: A predicted or ground-truth answer.

    Returns:
        The normalised string; tokens are separated by single spaces.
    """
    text = unicodedata.normalize("NFKC", text)
    # Accent folding: decompose, then drop combining marks (é -> e). Letters without a decomposition stay.
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = text.lower()
    # Punctuation is deleted, not spaced out, as in SQuAD ("U.S." -> "us", "1,000" -> "1000"); Unicode punctuation
    # (categories P*, e.g. curly quotes and en dashes) counts as well as ASCII's.
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(solution_str: str) -> str | None:
    """Returns the stripped content of the last ``<answer>`` tag outside ``<information>`` blocks, or None."""
    answers = _ANSWER.findall(_INFORMATION_BLOCK.sub(" ", solution_str))
    return answers[-1].strip() if answers else None


def f1_score(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Token-level F1 between a prediction and the best-matching ground-truth alias (after normalisation)."""
    aliases = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for alias in aliases:
        gold_tokens = normalize_answer(alias).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised ground-truth alias, else 0.0."""
    aliases = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(alias) for alias in aliases))


def _tags_well_formed(solution_str: str) -> bool:
    open_tag: str | None = None
    for match in _FORMAT_TAG.finditer(solution_str):
        closing, name = match.group(1) == "/", match.group(2)
        if not closing:
            if open_tag is not None:
                return False
            open_tag = name
        elif open_tag != name:
            return False
        else:
            open_tag = None
    return open_tag is None


def format_score(solution_str: str) -> float:
    """1.0 when the response has a non-empty final answer and well-formed, non-nested tags, else 0.0."""
    answer = extract_answer(solution_str)
    return float(bool(answer) and _tags_well_formed(solution_str))


def _as_alias_list(value: Any, what: str) -> list[str]:
    # numpy arrays (what parquet round trips give back) and tuples behave like lists here.
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, Sequence) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}: {value!r}")
    aliases = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise TypeError(f"{what} must contain strings, got {type(item).__name__}: {item!r}")
        aliases.append(str(item))
    return aliases


def parse_ground_truth(ground_truth: Any) -> tuple[list[str], list[str]]:
    """Turns any accepted ground-truth shape into (aliases, augmented aliases).

    Args:
        ground_truth: ``{"target": [...], "aug_target": [...] (optional)}`` (Search-R1 schema), a list of aliases,
            or a single string.

    Returns:
        The list of aliases and the (possibly empty) list of augmented aliases.

    Raises:
        TypeError: For any other shape.
        ValueError: When there is no non-empty alias.
    """
    aug: list[str] = []
    if isinstance(ground_truth, Mapping):
        if "target" not in ground_truth:
            raise TypeError(
                f"ground_truth dict needs a 'target' key (Search-R1 schema), got keys {sorted(ground_truth)}"
            )
        targets = _as_alias_list(ground_truth["target"], "ground_truth['target']")
        if ground_truth.get("aug_target") is not None:
            aug = _as_alias_list(ground_truth["aug_target"], "ground_truth['aug_target']")
    else:
        targets = _as_alias_list(ground_truth, "ground_truth")
    targets = [t for t in targets if t.strip()]
    if not targets:
        raise ValueError(f"ground_truth has no non-empty answer: {ground_truth!r}")
    return targets, [a for a in aug if a.strip()]


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    f1_weight: float = 1.0,
    format_weight: float = 0.1,
    em_weight: float = 0.0,
    aug_weight: float = 0.0,
    format_gates_answer: bool = False,
    **kwargs: Any,
) -> dict[str, float]:
    """verl ``reward.custom_reward_function`` entry point.

    verl 0.9.1 (``experimental/reward_loop/reward_manager/naive.py``) calls it with keyword arguments
    ``data_source, solution_str, ground_truth, extra_info`` plus ``reward_kwargs`` from the config, and accepts a
    float or a dict with a "score" key whose other keys are logged as ``reward_extra_info``.

    Args:
        data_source: The row's ``data_source`` (not used: every search data set is scored the same way).
        solution_str: The decoded response (all turns, observations included).
        ground_truth: See ``parse_ground_truth``.
        extra_info: The row's ``extra_info`` (not used).
        f1_weight: Weight of the answer F1.
        format_weight: Weight of the format reward.
        em_weight: Weight of exact match (0 by default: the paper trains on F1).
        aug_weight: Share of ASearcher's augmented answers in the F1 term (0 ignores them).
        format_gates_answer: When True, F1 and EM count only if the format is correct.
        **kwargs: Other arguments verl may pass (e.g. ``reward_router_address``); ignored.

    Returns:
        ``{"score", "f1", "em", "format", "has_answer"}``, all floats.
    """
    targets, aug_targets = parse_ground_truth(ground_truth)
    answer = extract_answer(solution_str)
    fmt = format_score(solution_str)
    if answer is None:
        f1 = em = 0.0
    else:
        f1 = f1_score(answer, targets)
        em = exact_match(answer, targets)
        if aug_weight > 0 and aug_targets:
            f1 = (1 - aug_weight) * f1 + aug_weight * max(f1, f1_score(answer, aug_targets))
    answer_gate = fmt if format_gates_answer else 1.0
    score = answer_gate * (f1_weight * f1 + em_weight * em) + format_weight * fmt
    return {"score": score, "f1": f1, "em": em, "format": fmt, "has_answer": float(answer is not None)}
