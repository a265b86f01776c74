"""The agent's two action spaces, one agent loop: Search-R1's (search, answer) and the paper's (search, access, read,
answer), chosen by `algorithm.carl.action_space` (`ACTION_SPACES`; `make_action_space` builds one).

``search_r1`` (the default) is `recipe.carl.search.actions` unchanged: ``<search> q </search>`` and
``<answer> a </answer>``, results as ``Doc 1 (Title: T) text``. ``paper`` is the agent of arXiv 2512.04949 (§1, §5,
§7: action types search, access, read, answer; ASearcher's ``<search>`` and ``<access>`` tags)::

    <search> a query </search>   -> <information>Doc 1 (id: 17, Title: T) text ...</information>
    <access> 17 </access>        -> <information>Page 17 (Title: T), part 1 of 3: ...</information>
    <read> </read>               -> the next part of the page opened last (here part 2 of 3)
    <read> 3 </read>             -> part 3 of that page
    <answer> a </answer>            the episode ends

``<access>`` names the id a search result shows (ids, not titles: ids are unique in any corpus, titles need not be);
the server returns the whole page holding that passage (``recipe.carl.search.pages``). A page longer than
`algorithm.carl.page_chunk_chars` characters comes in parts; the agent reads on with ``<read>`` or moves on. A part
is an observation: part of the next state, never trained. A search in between does not close the open page.

Why a read is an action here, and what ASearcher does instead: docs/design.md ("The paper's read action").

A malformed paper turn is invalid with one of these reasons (``<think>`` blocks are ignored, as in Search-R1's):

========================  ===================================================================================
reason                    when
========================  ===================================================================================
``no_action``             no search, access, read or answer tag
``unclosed_tag``          an opening tag without its closing tag, or a closing tag without an opening one
``nested_tags``           an action tag inside another
``search_and_answer``     the turn both searches and answers
``multiple_actions``      more than one action tag otherwise (e.g. two searches, or a search and an access)
``empty_query``           ``<search></search>`` with only whitespace inside
``empty_answer``          ``<answer></answer>`` with only whitespace inside
``empty_page_id``         ``<access></access>`` with only whitespace inside
``bad_read_index``        ``<read> x </read>`` where x is not a whole number >= 1
``unknown_page``          (the environment) the retriever knows no passage with that id
``read_without_page``     (the environment) a read before any access on this path
``read_past_end``         (the environment) a read after the last part, or of a part the page does not have
========================  ===================================================================================

Each reason has its own feedback text (`PaperActions.feedback`) for `algorithm.carl.invalid_action: feedback`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recipe.carl.search.actions import (
    INVALID_ACTION_FEEDBACK,
    STOP_STRINGS,
    ParsedAction,
    parse_action,
    render_observation,
    strip_think,
    tag_spans,
)
from recipe.carl.search.pages import split_parts

__all__ = [
    "ACTION_SPACES",
    "DEFAULT_ACTION_SPACE",
    "PAPER_INSTRUCTION_TEMPLATE",
    "ActionSpace",
    "PaperActions",
    "PaperSession",
    "Reading",
    "SearchR1Actions",
    "make_action_space",
    "open_page",
    "read_part",
    "reading_on_path",
    "render_part",
]

ACTION_SPACES = ("search_r1", "paper")
"""The values of `algorithm.carl.action_space`."""
DEFAULT_ACTION_SPACE = "search_r1"

#: The paper's instruction for real models (ASearcher-base questions), in our own words; `{question}` is filled in
#: by `data_preprocess` (`--action-space paper`).
PAPER_INSTRUCTION_TEMPLATE = (
    "Answer the question below. Think step by step inside <think> and </think> whenever you get new information. "
    "To search the corpus, write a query as <search> query </search>; the top results come back between "
    "<information> and </information>, each with the id of its page. To open the whole page of a result, write "
    "<access> id </access>; a long page comes in parts, and <read> </read> shows its next part. "
    "You may search, open and read as often as you need. "
    "When you know the answer, give only the short final answer inside <answer> and </answer>, "
    "for example <answer> Beijing </answer>.\n"
    "Question: {question}"
)

PAPER_STOP_STRINGS = ("</search>", "</access>", "</read>", "</answer>")
_PAPER_TAG = re.compile(r"<(/?)(search|access|read|answer)>")
_PAPER_FEEDBACK = (
    "Your previous turn had no valid action. To search, write one query as <search> query </search>. To open the "
    "page of a search result, write <access> id </access> with the id the result shows. To read the next part of "
    "the open page, write <read> </read>. To finish, write the final answer as <answer> answer </answer>."
)


@dataclass(frozen=True)
class ActionSpace:
    """What the agent may do: how a turn ends (`stop_strings`), how it is parsed, what an invalid turn is told."""

    name: str
    stop_strings: tuple[str, ...]
    kinds: tuple[str, ...]
    """The kinds of valid action (`ParsedAction.kind`); an invalid turn's kind is "invalid"."""

    def parse(self, text: str) -> ParsedAction:
        raise NotImplementedError

    def feedback(self, reason: str, **detail: Any) -> str:
        """The observation an invalid turn gets under `invalid_action: feedback`."""
        raise NotImplementedError


@dataclass(frozen=True)
class SearchR1Actions(ActionSpace):
    """Search-R1's ``<search>`` and ``<answer>`` (`recipe.carl.search.actions`, unchanged)."""

    name: str = "search_r1"
    stop_strings: tuple[str, ...] = STOP_STRINGS
    kinds: tuple[str, ...] = ("search", "answer")

    def parse(self, text: str) -> ParsedAction:
        return parse_action(text)

    def feedback(self, reason: str, **detail: Any) -> str:
        return INVALID_ACTION_FEEDBACK


@dataclass(frozen=True)
class PaperActions(ActionSpace):
    """The paper's search, access, read and answer (module docstring); `chunk_chars` is the part size of a page."""

    name: str = "paper"
    stop_strings: tuple[str, ...] = PAPER_STOP_STRINGS
    kinds: tuple[str, ...] = ("search", "access", "read", "answer")
    chunk_chars: int = 4000

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_chars, int) or self.chunk_chars < 1:
            raise ValueError(f"page_chunk_chars={self.chunk_chars!r} must be an integer >= 1 (e.g. 4000).")

    def parse(self, text: str) -> ParsedAction:
        return parse_paper_action(text)

    def feedback(self, reason: str, **detail: Any) -> str:
        if reason == "unknown_page":
            return (
                f"There is no page with the id {detail.get('page')}. Open a page with <access> id </access>, using "
                "an id a search result shows."
            )
        if reason == "read_without_page":
            return "No page is open. Open one with <access> id </access> before reading with <read> </read>."
        if reason == "read_past_end":
            return (
                f"Page {detail.get('page')} has {detail.get('parts')} parts; there is no part {detail.get('want')}. "
                "Search again, open another page, or answer."
            )
        return _PAPER_FEEDBACK


def make_action_space(name: str = DEFAULT_ACTION_SPACE, chunk_chars: int = 4000) -> ActionSpace:
    """The action space `name` (`algorithm.carl.action_space`) with pages cut into `chunk_chars`-character parts.

    Raises:
        ValueError: an unknown name, naming the known ones.
    """
    if name == "search_r1":
        return SearchR1Actions()
    if name == "paper":
        return PaperActions(chunk_chars=chunk_chars)
    raise ValueError(f"action_space={name!r} is unknown: use one of {', '.join(ACTION_SPACES)}.")


def _invalid(reason: str) -> ParsedAction:
    return ParsedAction(kind="invalid", reason=reason)


def parse_paper_action(text: str) -> ParsedAction:
    """Parses one turn of the paper's action space (the invalid cases: the module docstring)."""
    spans = tag_spans(strip_think(text), _PAPER_TAG)
    if isinstance(spans, str):
        return _invalid(spans)
    if not spans:
        return _invalid("no_action")
    names = [name for name, _ in spans]
    if "search" in names and "answer" in names:
        return _invalid("search_and_answer")
    if len(spans) > 1:
        return _invalid("multiple_actions")
    name, body = spans[0]
    body = " ".join(body.split())
    if name == "search":
        return ParsedAction(kind="search", query=body, syntax="tag") if body else _invalid("empty_query")
    if name == "answer":
        return ParsedAction(kind="answer", answer=body, syntax="tag") if body else _invalid("empty_answer")
    if name == "access":
        return ParsedAction(kind="access", page=body, syntax="tag") if body else _invalid("empty_page_id")
    if body and not (body.isdigit() and int(body) >= 1):
        return _invalid("bad_read_index")
    return ParsedAction(kind="read", part=int(body) if body else None, syntax="tag")


@dataclass(frozen=True)
class Reading:
    """The page open on a path: the id its access named, its title, its parts and the part shown last (0-based)."""

    page: str
    title: str
    parts: tuple[str, ...]
    part: int = 0


def open_page(page_id: str, contents: str, chunk_chars: int) -> Reading:
    """The reading an access starts: the page (``Title\\ntext``) cut into parts, its first part shown."""
    title, _, text = contents.partition("\n")
    return Reading(page_id, title.strip(), tuple(split_parts(text, chunk_chars)) or ("",), 0)


def read_part(reading: Reading | None, want: int | None) -> Reading | tuple[str, dict[str, Any]]:
    """The reading after a ``<read>`` (`want`: a 1-based part, None for the next one), or why it cannot be read:
    ``(reason, detail)`` with reason ``read_without_page`` or ``read_past_end``."""
    if reading is None:
        return "read_without_page", {}
    index = reading.part + 1 if want is None else want - 1
    if index >= len(reading.parts):
        return "read_past_end", {"page": reading.page, "parts": len(reading.parts), "want": index + 1}
    return Reading(reading.page, reading.title, reading.parts, index)


def render_part(reading: Reading) -> str:
    """The observation text of the part shown: ``Page 17 (Title: T), part 2 of 3: text`` (the id the access named)."""
    where = f"part {reading.part + 1} of {len(reading.parts)}"
    return f"Page {reading.page} (Title: {reading.title}), {where}: {reading.parts[reading.part]}"


def reading_on_path(infos: list[dict[str, Any]]) -> tuple[str, int] | None:
    """The page open after a path of actions (their `Action.info`, root first) and the part shown (0-based): the last
    access or read that showed a part (`info["page"]`, `info["part"]`); None when no page was opened."""
    for info in reversed(infos):
        if "page" in info and "part" in info:
            return str(info["page"]), int(info["part"]) - 1
    return None


@dataclass
class SessionStep:
    """What one turn of a `PaperSession` did."""

    action: ParsedAction
    observation: str | None
    """The ``<information>`` text appended after the turn; None after an answer or an invalid turn."""
    reason: str | None = None
    """Why the turn is invalid (a parse or an environment reason), else None."""


@dataclass
class PaperSession:
    """The paper's observations computed in process, one turn at a time: the SFT layout of a demonstration and
    SynthHop's reference agent see what the agent loop shows (the same parser, renderers and parts).

    Args:
        space: the action space (its `chunk_chars`).
        search: a query -> the rendered results (``render_documents(..., show_ids=True)``).
        page: an id -> ``"Title\\ntext"`` of its page, or None for an unknown id.
    """

    space: PaperActions
    search: Callable[[str], str]
    page: Callable[[str], str | None]
    reading: Reading | None = field(default=None)

    def step(self, text: str) -> SessionStep:
        action = self.space.parse(text)
        if action.kind == "search":
            return SessionStep(action, render_observation(self.search(action.query or "")))
        if action.kind == "access":
            contents = self.page(action.page or "")
            if contents is None:
                return SessionStep(action, None, "unknown_page")
            self.reading = open_page(action.page or "", contents, self.space.chunk_chars)
            return SessionStep(action, render_observation(render_part(self.reading)))
        if action.kind == "read":
            result = read_part(self.reading, action.part)
            if isinstance(result, tuple):
                return SessionStep(action, None, result[0])
            self.reading = result
            return SessionStep(action, render_observation(render_part(result)))
        return SessionStep(action, None, action.reason)
