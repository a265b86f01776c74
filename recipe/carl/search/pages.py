"""Pages for the paper's `access` action: a passage corpus grouped into whole pages, and a long page cut into parts.

A Wikipedia-style passage corpus (Search-R1's and ASearcher's wiki-18: DPR's 100-word passages of the 2018 dump,
one ``{"id", "contents": "\\"Title\\"\\ntext"}`` line each) stores every article as consecutive passages that share
its title. A **page** is such a run: every passage of the article, in corpus order. It is found by the id of any of
its passages, which is what a search result shows the agent (``Doc 1 (id: 17, Title: T) ...``); its canonical id is
that of its first passage. Grouping by runs, not by title alone, keeps two articles apart that happen to share a
title but are stored apart; a title that recurs later starts a new page (``python -m recipe.carl.search.pages``
counts such titles, so a corpus that scatters its articles is noticed before training on it).

A corpus whose documents are whole pages already (SynthHop's pages variant) is the same case: each run has one
passage.

A page longer than the observation budget is shown in parts of at most ``chunk_chars`` characters
(``split_parts``): each part ends at the last sentence end of its window where there is one, else at a space, else
at the limit, so no sentence that fits in a part is ever cut.

    python -m recipe.carl.search.pages --corpus data/wiki-18.jsonl            # pages, sizes, scattered titles
    python -m recipe.carl.search.pages --corpus data/wiki-18.jsonl --show 17  # the page of passage 17, in parts
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recipe.carl.search.actions import split_contents
from recipe.carl.search.retriever import Corpus, CorpusError, load_corpus

__all__ = ["Page", "PageStore", "split_parts"]

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")


@dataclass(frozen=True)
class Page:
    """One page: its canonical id (its first passage's), title, text and the ids of its passages."""

    id: str
    title: str
    text: str
    passage_ids: tuple[str, ...]

    @property
    def contents(self) -> str:
        """``Title\\ntext``, the corpus's own format."""
        return f"{self.title}\n{self.text}"


class PageStore:
    """The pages of a passage corpus: consecutive passages with the same title form one page.

    Memory: one integer per page (where it starts) plus, when the corpus's ids are not consecutive numbers (its line
    numbers, from any start), one dict entry per passage; a numbered corpus like wiki-18's ~21M passages costs only
    the page starts.

    Args:
        corpus: the retriever's corpus (``load_corpus``).
    """

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        titles = [split_contents(c)[0] for c in corpus.contents]
        starts = [0] + [i for i in range(1, len(titles)) if titles[i] != titles[i - 1]]
        self.starts = np.asarray(starts, dtype=np.int64)  # first passage of each page [shape: (num_pages,)]
        self._titles = [titles[s] for s in starts]
        # Consecutive numbers as ids (the line numbers, from any start) need no lookup table; any other ids get one.
        self._position: dict[str, int] | None = None
        first = corpus.ids[0] if corpus.ids else "0"
        self._offset = int(first) if first.isdigit() and (first == "0" or not first.startswith("0")) else -1
        if self._offset < 0 or any(doc_id != str(i + self._offset) for i, doc_id in enumerate(corpus.ids)):
            self._position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
            if len(self._position) != len(corpus.ids):
                seen: set[str] = set()
                dup = next(d for d in corpus.ids if d in seen or seen.add(d))  # type: ignore[func-returns-value]
                raise CorpusError(
                    f"{corpus.path}: the id {dup!r} is used by more than one passage; an access by id needs unique "
                    "ids (give every line its own 'id', or none: the line number is used)"
                )

    def __len__(self) -> int:
        return len(self.starts)

    def position(self, doc_id: str) -> int | None:
        """The corpus position of the passage with this id, or None when there is none."""
        if self._position is not None:
            return self._position.get(doc_id)
        if doc_id.isdigit() and (doc_id == "0" or not doc_id.startswith("0")):
            position = int(doc_id) - self._offset
            return position if 0 <= position < len(self.corpus) else None
        return None

    def _page_index(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def page_span(self, index: int) -> tuple[int, int]:
        """Corpus positions [start, end) of page ``index``."""
        end = int(self.starts[index + 1]) if index + 1 < len(self.starts) else len(self.corpus)
        return int(self.starts[index]), end

    def page_chars(self, index: int) -> int:
        """Length of page ``index``'s text (what ``get`` would return), without building it."""
        start, end = self.page_span(index)
        return sum(len(split_contents(self.corpus.contents[i])[1]) for i in range(start, end)) + (end - start - 1)

    def get(self, doc_id: str) -> Page | None:
        """The page holding the passage with id ``doc_id`` (any passage of it), or None for an unknown id."""
        position = self.position(str(doc_id))
        if position is None:
            return None
        index = self._page_index(position)
        start, end = self.page_span(index)
        text = "\n".join(split_contents(self.corpus.contents[i])[1] for i in range(start, end))
        ids = tuple(self.corpus.ids[start:end])
        return Page(id=ids[0], title=self._titles[index], text=text, passage_ids=ids)

    def scattered_titles(self) -> dict[str, int]:
        """Titles that start more than one page (their passages are not consecutive), with the number of pages."""
        counts: dict[str, int] = {}
        for title in self._titles:
            counts[title] = counts.get(title, 0) + 1
        return {title: n for title, n in counts.items() if n > 1}

    def summary(self) -> dict[str, Any]:
        """Pages, passages per page (mean and largest), the longest page in characters, scattered titles."""
        sizes = np.diff(np.append(self.starts, len(self.corpus)))
        longest = int(np.argmax(sizes))
        scattered = self.scattered_titles()
        return {
            "passages": len(self.corpus),
            "pages": len(self),
            "passages_per_page_mean": float(sizes.mean()),
            "passages_per_page_max": int(sizes.max()),
            "largest_page": {"id": self.corpus.ids[int(self.starts[longest])], "chars": self.page_chars(longest)},
            "scattered_titles": len(scattered),
            "scattered_examples": sorted(scattered)[:5],
        }


def split_parts(text: str, chunk_chars: int) -> list[str]:
    """A page's text cut into parts of at most ``chunk_chars`` characters, in order (whitespace at the cuts dropped).

    A part ends after the last sentence end (``.``, ``!`` or ``?``, then a space) in its window, so a sentence that
    fits in a part is never cut; without one, at the last space; a single word longer than the window is cut at the
    limit.

    Raises:
        ValueError: ``chunk_chars`` < 1.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    parts: list[str] = []
    rest = text.strip()
    while rest:
        if len(rest) <= chunk_chars:
            parts.append(rest)
            break
        window = rest[: chunk_chars + 1]  # one more: a boundary right at the limit counts
        ends = [m.end() - 1 for m in _SENTENCE_END.finditer(window)]
        cut = ends[-1] if ends else window.rfind(" ")
        if cut <= 0:
            cut = chunk_chars
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return parts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m recipe.carl.search.pages`: the page store of a corpus, summarised (or one page shown in parts)."""
    p = argparse.ArgumentParser(prog="python -m recipe.carl.search.pages", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="JSONL corpus, one {'id', 'contents': 'Title\\ntext'} per line")
    p.add_argument("--show", metavar="ID", help="print the page holding the passage with this id, in parts")
    p.add_argument(
        "--chunk-chars", type=int, default=4000, help="part size for --show (algorithm.carl.page_chunk_chars)"
    )
    args = p.parse_args(argv)
    if args.chunk_chars < 1:
        p.error(f"--chunk-chars {args.chunk_chars}: must be >= 1")
    try:
        store = PageStore(load_corpus(args.corpus))
    except CorpusError as error:
        p.exit(2, f"error: {error}\n")
    if args.show is None:
        out = store.summary()
    else:
        page = store.get(args.show)
        if page is None:
            p.exit(2, f"error: --show {args.show}: no passage has this id in {args.corpus}\n")
        parts = split_parts(page.text, args.chunk_chars)
        out = {"id": page.id, "title": page.title, "passages": len(page.passage_ids), "parts": parts}
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
