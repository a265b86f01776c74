"""SynthHop with pages: the paper's action space (search, access, read, answer) on a task that needs it.

Each entity gets a page, ``Uldal is a company . <its facts, in its shuffled order>``, longer than one search snippet:
a search result shows only the snippet's first `snippet_words` words (the lead sentence), so the fact a question
needs is inside the page and never in the snippet. The agent opens a result with ``<access> id </access>`` (a page's
id is its entity's name: SynthHop's names are unique one-word tokens) and reads on with ``<read> </read>`` until the
fact appears, in parts of at most `chunk_chars` characters::

    <search> Uldal headquarters </search>
    <information>Doc 1 (id: Uldal, Title: Uldal) Uldal is a company . ...
    Doc 2 (id: Vexdal, Title: Vexdal) Vexdal is a city . ...</information>
    <access> Uldal </access>
    <information>Page Uldal (Title: Uldal), part 1 of 3: Uldal is a company . Uldal is run by Nysa_Oax .</information>
    <read> </read>
    <information>Page Uldal (Title: Uldal), part 2 of 3: Uldal is headquartered in Drein .</information>
    <search> Drein country </search> ...

The observations are the agent loop's own (`recipe.carl.search.action_space.PaperSession`: the same parser, renderers
and parts), so demonstrations laid out for SFT are what RL shows. The reference agent is the default one's (the same
noise: a wrong search with probability p per hop, an early answer with p/3 from the second hop) plus the reading: it
opens the result titled with the current entity and reads on until the fact is in view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from recipe.carl.search.action_space import PaperActions, PaperSession, open_page, render_part
from recipe.carl.search.actions import render_documents

from .agent import Demo, ReferenceAgent, Turn, read_fact
from .env import LocalSearch, format_answer, format_search, is_success
from .kb import KnowledgeBase
from .questions import Question

PAGES_SYSTEM_PROMPT = (
    "Search with <search> entity relation </search> , open a result with <access> id </access> , read on with "
    "<read> </read> and answer with <answer> entity </answer> ."
)
"""System instruction of the pages variant's prompts (the default's plus the two page actions)."""

ACCESS_OPEN, ACCESS_CLOSE, READ = "<access>", "</access>", "<read> </read>"


@dataclass(frozen=True)
class PagesConfig:
    """Knobs of the pages variant."""

    snippet_words: int = 5
    """Words of a page a search result shows: the lead sentence ("Uldal is a company ."), no fact."""
    chunk_chars: int = 64
    """Characters per part of a page (`algorithm.carl.page_chunk_chars`): one or two facts per part."""

    def __post_init__(self) -> None:
        for knob in ("snippet_words", "chunk_chars"):
            value = getattr(self, knob)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"pages {knob} must be an int >= 1, got {value!r}.")


def page_text(kb: KnowledgeBase, name: str) -> str:
    """An entity's page: its lead sentence, then its facts (the default document's sentences, in the same order)."""
    return f"{name} is a {kb.index[name].type} . {kb.document_text(name)}"


def page_corpus(kb: KnowledgeBase) -> list[dict[str, str]]:
    """One page per entity in the corpus format, its id its (unique) name: ``[{"id", "contents": "Name\\npage"}]``."""
    return [{"id": e.name, "contents": f"{e.name}\n{page_text(kb, e.name)}"} for e in kb.entities]


def format_access(page_id: str) -> str:
    """The action text of an access."""
    return f"{ACCESS_OPEN} {page_id} {ACCESS_CLOSE}"


def session(
    search: Callable[[str], list[dict]], pages: dict[str, str], config: PagesConfig, topk: int | None = None
) -> PaperSession:
    """A `PaperSession` over documents from `search` (a query -> `{"id", "contents"}` dicts) and `pages` (id ->
    ``Title\\ntext``), rendered as the pages tool yaml renders them (ids shown, `snippet_words` per result)."""

    def results(query: str) -> str:
        docs = search(query)[:topk] if topk else search(query)
        return render_documents(docs, show_ids=True, snippet_words=config.snippet_words)

    return PaperSession(PaperActions(chunk_chars=config.chunk_chars), results, pages.get)


def vocabulary_texts(corpus: list[dict[str, str]], config: PagesConfig) -> list[str]:
    """Every observation the pages variant can show: each result line and each part of each page (a word-level
    tokenizer needs all of their words)."""
    texts = [render_documents([doc], show_ids=True, snippet_words=config.snippet_words) for doc in corpus]
    for doc in corpus:
        reading = open_page(doc["id"], doc["contents"], config.chunk_chars)
        texts += [render_part(replace(reading, part=i)) for i in range(len(reading.parts))]
    return texts


class PagesReferenceAgent(ReferenceAgent):
    """The reference agent of `recipe.carl.synthhop.agent`, searching, opening and reading pages.

    Args:
        kb: the knowledge base (its names, for detours).
        search: SynthHop's in-process BM25 over the page corpus.
        config: the pages knobs.
        noise: p, as the default agent's.
        seed: seed of the noise.
        max_turns: actions per episode; a search, access or read on the last one ends it, failed.
    """

    def __init__(self, kb: KnowledgeBase, search: LocalSearch, config: PagesConfig, noise: float = 0.0,
                 seed: int = 0, max_turns: int = 12):  # fmt: skip
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        self._search, self.config, self.max_turns = search, config, max_turns
        self._pages = {d["id"]: d["contents"] for d in page_corpus(kb)}
        super().__init__(kb, env=None, noise=noise, seed=seed)  # type: ignore[arg-type]

    def _results(self, query: str) -> list[dict]:
        return [{"id": h.title, "contents": f"{h.title}\n{h.text}"} for h in self._search.retrieve(query)]

    def run(self, question: Question) -> Demo:
        """Play one episode of ``question`` (the same draws of the noise as the default agent's `run`)."""
        p, rng = self.noise, self.rng
        s = session(self._results, self._pages, self.config)
        turns: list[Turn] = []
        wrong, early = 0, False

        def act(text: str) -> str | None:
            """One turn; the observation, or None when the turn budget is spent (the episode is then over)."""
            step = s.step(text)
            turns.append(Turn(text, step.observation or ""))
            return step.observation if len(turns) < self.max_turns else None

        current, over = question.subject, False
        for hop, relation in enumerate(question.relations):
            if hop >= 1 and rng.random() < p / 3:
                early = True
                break
            if rng.random() < p:
                wrong += 1
                if act(format_search(self._wrong_query(current, relation))) is None:
                    over = True
                    break
            results = act(format_search(f"{current} {relation}"))
            if results is None or f"(id: {current}," not in results:
                over = results is None
                break  # out of turns, or retrieval missed the page: answer what we have, which fails
            found, shown = None, act(format_access(current))
            while shown is not None:
                found = read_fact(shown, current, relation)
                if found is not None or s.reading is None or s.reading.part + 1 >= len(s.reading.parts):
                    break
                shown = act(READ)
            if shown is None:
                over = True
                break
            if found is None:
                break
            current = found
        success = False
        if not over:
            turns.append(Turn(format_answer(current), ""))
            success = is_success(current, question.answer)
        return Demo(question.text, question.answer, question.hops, tuple(turns), success, wrong, early)


__all__ = [
    "ACCESS_CLOSE",
    "ACCESS_OPEN",
    "PAGES_SYSTEM_PROMPT",
    "PagesConfig",
    "PagesReferenceAgent",
    "format_access",
    "page_corpus",
    "page_text",
    "session",
    "vocabulary_texts",
]
