"""Multi-hop questions over a SynthHop knowledge base, with gold answers and oracle search paths.

A k-hop question names one subject entity and a chain of k relations:
"What is the leader of the country of the headquarters of Uldal ?" is answered by searching "Uldal headquarters",
then "<city> country", then "<country> leader". Only the subject appears in the question, and no entity repeats
on a path, so the answer is never in the question and cannot be guessed from it.

All distinct paths of each length are enumerated (a few thousand for 300 entities), then train and test questions
are drawn per hop count without replacement, so the splits are disjoint by question and the hop mix is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .kb import KnowledgeBase, split_counts


@dataclass(frozen=True)
class Question:
    """A question, its answer and its oracle path.

    Attributes:
        text: the question, words separated by single spaces.
        answer: the gold answer entity (``path[-1]``).
        path: entities visited, ``(subject, e_1, ..., answer)``; length ``hops + 1``, all distinct.
        relations: relations followed, first hop first; length ``hops``.
    """

    text: str
    answer: str
    path: tuple[str, ...]
    relations: tuple[str, ...]

    @property
    def hops(self) -> int:
        """Number of relations to follow (= searches an oracle needs)."""
        return len(self.relations)

    @property
    def subject(self) -> str:
        """The only entity named in the question."""
        return self.path[0]

    @property
    def oracle_queries(self) -> list[str]:
        """The search queries of the oracle, ``"ENTITY relation"`` per hop."""
        return [f"{e} {r}" for e, r in zip(self.path[:-1], self.relations, strict=True)]


def question_text(subject: str, relations: tuple[str, ...]) -> str:
    """Render "What is the r_k of the ... of the r_1 of SUBJECT ?" (``relations`` in hop order)."""
    chain = " of the ".join(reversed(relations))
    return f"What is the {chain} of {subject} ?"


def enumerate_questions(kb: KnowledgeBase, hops: int) -> list[Question]:
    """All questions of exactly ``hops`` hops whose path has no repeated entity, in a deterministic order."""
    out: list[Question] = []

    def walk(path: list[str], relations: list[str]) -> None:
        if len(relations) == hops:
            out.append(Question(question_text(path[0], tuple(relations)), path[-1], tuple(path), tuple(relations)))
            return
        for relation, target in kb.index[path[-1]].facts.items():
            if target not in path:
                walk([*path, target], [*relations, relation])

    for name in kb.names():
        walk([name], [])
    return out


@dataclass(frozen=True)
class QuestionConfig:
    """How many questions of which length."""

    n_train: int = 3000
    """Training questions."""
    n_test: int = 200
    """Held-out questions (disjoint from training questions; the KB is shared)."""
    hop_mix: tuple[float, ...] = (0.2, 0.4, 0.4)
    """Fraction of 1-, 2-, 3-hop questions (more entries allow longer questions)."""
    seed: int = 0
    """Seed of the draw."""

    def __post_init__(self):
        for knob in ("n_train", "n_test"):
            value = getattr(self, knob)
            if not isinstance(value, int) or value < 0:
                flag = "--" + knob.replace("_", "-")
                raise ValueError(f"{knob} ({flag}) must be a non-negative int, got {value!r}.")
        if not self.hop_mix or min(self.hop_mix) < 0 or abs(sum(self.hop_mix) - 1) > 1e-6:
            raise ValueError(f"hop_mix (--hop-mix) must be non-negative fractions summing to 1, got {self.hop_mix}.")


def make_questions(
    kb: KnowledgeBase, config: QuestionConfig = QuestionConfig()
) -> tuple[list[Question], list[Question]]:
    """Draw train and test questions with the exact hop mix.

    Args:
        kb: the knowledge base.
        config: sizes, hop mix and seed.

    Returns:
        ``(train, test)``, each shuffled; no question is in both.

    Raises:
        ValueError: when the KB has fewer distinct questions of some length than the hop mix asks for.
    """
    rng = random.Random(f"synthhop-questions-{config.seed}")
    train_counts = split_counts(config.n_train, config.hop_mix)
    test_counts = split_counts(config.n_test, config.hop_mix)
    train: list[Question] = []
    test: list[Question] = []
    for i, (n_tr, n_te) in enumerate(zip(train_counts, test_counts, strict=True)):
        hops = i + 1
        if n_tr + n_te == 0:
            continue
        pool = enumerate_questions(kb, hops)
        if len(pool) < n_tr + n_te:
            raise ValueError(
                f"hop_mix[{i}]={config.hop_mix[i]} asks for {n_tr} train + {n_te} test {hops}-hop questions, but a KB "
                f"with n_entities={kb.config.n_entities} has only {len(pool)} distinct {hops}-hop questions. "
                f"Raise --n-entities, lower --n-train / --n-test, or lower this entry of --hop-mix."
            )
        drawn = rng.sample(pool, n_tr + n_te)
        train += drawn[:n_tr]
        test += drawn[n_tr:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
