"""The SynthHop environment: a local BM25 search over the corpus and the turn logic of an episode.

Actions and observations use the Search-R1 tags, spaced so that a whitespace tokenizer sees each tag as a word::

    <search> Uldal headquarters </search>
    <information> [ Uldal ] Uldal is headquartered in Drein . ... [ Ostfen ] Ostfen ... </information>
    <answer> Kalbor </answer>

Actions are parsed by the search package's ``parse_action`` (the same parser as the CARL agent loop) and documents are
found by its BM25 index (``BM25Backend``, the same as the retrieval server's), so SynthHop's reference agent acts in
the environment the policy is trained in.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipe.carl.search.actions import parse_action
from recipe.carl.search.retriever import BM25Backend

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"

SYSTEM_PROMPT = "Search with <search> entity relation </search> and answer with <answer> entity </answer> ."
"""System instruction of every prompt; short because every prompt token costs compute in a 1M-parameter policy."""


def format_search(query: str) -> str:
    """The action text of a search."""
    return f"{SEARCH_OPEN} {query} {SEARCH_CLOSE}"


def format_answer(answer: str) -> str:
    """The action text of a final answer."""
    return f"{ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


def is_success(prediction: str | None, answer: str) -> bool:
    """Exact match of the predicted entity with the gold answer (whitespace-insensitive, case-sensitive)."""
    return prediction is not None and " ".join(prediction.split()) == answer


@dataclass(frozen=True)
class Hit:
    """One retrieved document."""

    title: str
    text: str
    score: float


class LocalSearch:
    """In-process BM25 search over a SynthHop corpus (the search package's ``BM25Backend``, built in memory).

    Unlike the retrieval server, an observation is filled to ``top_k`` documents even when some match no query term
    (score 0): the seed-0 data and the shipped SFT start keyed on its tokens were made that way.

    Args:
        corpus: ``[{"id", "contents": "Title\\ntext"}]`` as written by :meth:`KnowledgeBase.corpus`.
        top_k: documents per observation; the probe's recommendation is 2.
        doc_words: words kept per document in an observation. Keep it at least the longest document (about 30
            words for the compact KB): a cut that drops the asked-for fact makes the question unanswerable.
    """

    def __init__(self, corpus: list[dict[str, str]], top_k: int = 2, doc_words: int = 48):
        if top_k < 1 or doc_words < 1:
            raise ValueError(f"top_k and doc_words must be >= 1, got top_k={top_k}, doc_words={doc_words}.")
        self.top_k = top_k
        self.doc_words = doc_words
        if not all("\n" in d["contents"] for d in corpus):
            raise ValueError('every corpus document needs "contents" of the form "Title\\ntext"')
        self.titles, self.texts = zip(*(d["contents"].split("\n", 1) for d in corpus), strict=True)
        # English stemming and stopwords; names are stemmer fixed points (see kb._is_search_safe). The title is
        # indexed with the text, as FlashRAG indexes "contents": one more occurrence of the name.
        self._bm25 = BM25Backend.from_texts([d["contents"] for d in corpus])
        # The same queries recur across demonstrations and rollouts; the corpus is fixed, so results are cacheable.
        self._cache: dict[tuple[str, int], list[Hit]] = {}

    def retrieve(self, query: str, top_k: int | None = None) -> list[Hit]:
        """Top-k documents for ``query``, best first."""
        k = min(top_k or self.top_k, len(self.titles))
        key = (query, k)
        if key not in self._cache:
            hits = self._bm25.search([query], k, keep_unmatched=True)[0]
            self._cache[key] = [Hit(self.titles[i], self.texts[i], score) for i, score in hits]
        return self._cache[key]

    def observation(self, query: str) -> str:
        """The observation text for a search: ``<information> [ Title ] words ... </information>``."""
        parts = [f"[ {h.title} ] {' '.join(h.text.split()[: self.doc_words])}" for h in self.retrieve(query)]
        return f"{INFO_OPEN} {' '.join(parts)} {INFO_CLOSE}"


@dataclass(frozen=True)
class StepResult:
    """What one turn did.

    Attributes:
        kind: "search", "answer" or "invalid".
        argument: the query or the answer ("" when invalid).
        observation: the ``<information>`` text of a search, else "".
        done: whether the episode is over (answer, invalid format, or the turn budget spent).
        success: whether the episode ended with the exact gold answer.
    """

    kind: str
    argument: str
    observation: str
    done: bool
    success: bool


class SynthHopEnv:
    """Turn logic of one episode at a time.

    An episode ends at an answer, at an invalid action, or after ``max_turns`` actions (a search on the last turn
    still returns its observation, but the episode is over and failed).

    Args:
        search: the search function.
        max_turns: actions per episode; 6 in the probe (3 hops + 2 detours + answer).
    """

    def __init__(self, search: LocalSearch, max_turns: int = 6):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        self.search = search
        self.max_turns = max_turns
        self.answer = ""
        self.turns = 0
        self.done = True

    def reset(self, answer: str) -> None:
        """Start an episode whose gold answer is ``answer``."""
        self.answer, self.turns, self.done = answer, 0, False

    def step(self, action: str) -> StepResult:
        """Apply one action text and return its result. The text is read by the search package's ``parse_action``
        (text before the tag and ``<think>`` blocks are allowed, as in the agent loop); the query or answer is
        whitespace-normalised."""
        if self.done:
            raise RuntimeError("episode is over; call reset() first")
        self.turns += 1
        parsed = parse_action(action)
        kind = parsed.kind
        arg = " ".join((parsed.query or parsed.answer or "").split())
        out_of_turns = self.turns >= self.max_turns
        if kind == "search":
            self.done = out_of_turns
            return StepResult(kind, arg, self.search.observation(arg), self.done, False)
        self.done = True
        return StepResult(kind, arg, "", True, kind == "answer" and is_success(arg, self.answer))
