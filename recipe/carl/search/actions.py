"""The search agent's action format: parse one generated turn, render one observation.

Format decision
---------------
The default is Search-R1's tag format::

    <think> ... </think>               optional free reasoning, ignored by the parser
    <search> a query </search>         action "search": the environment runs the query
    <answer> final answer </answer>    action "answer": the episode ends
    <information> Doc 1 (Title: T) text ... </information>   observation written back by the environment

It is preferred over verl's JSON ``<tool_call>`` format because it needs nothing from the tokenizer or the chat
template: it works with a tiny word-level test tokenizer, with base models, and with Qwen2.5/Qwen3 chat templates
without passing a tool schema. The policy's turn ends at ``</search>`` or ``</answer>`` (``STOP_STRINGS``), and the
observation is appended to the same assistant message, exactly as in Search-R1, so prompts stay comparable with it.
Qwen's ``<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>`` is also accepted, so a model
that was taught verl's tool format can still act in this environment.

What counts as invalid
----------------------
``parse_action`` first drops closed ``<think>...</think>`` blocks (a model may *mention* tags while reasoning), then
looks at the ``search``, ``answer`` and ``tool_call`` tags that remain. A turn is **invalid** when:

============================  ============================================================================
reason                        when
============================  ============================================================================
``no_action``                 no search, answer or tool_call tag at all
``unclosed_tag``              an opening tag without its closing tag, or a closing tag without an opening one
``nested_tags``               an action tag inside another action tag, e.g. ``<search><answer>x</answer></search>``
``search_and_answer``         the turn both searches and answers
``multiple_searches``         more than one search (or tool_call) in one turn
``multiple_answers``          more than one answer in one turn
``empty_query``               ``<search></search>`` with only whitespace inside
``empty_answer``              ``<answer></answer>`` with only whitespace inside
``bad_tool_call``             ``<tool_call>`` whose body is not JSON ``{"name": "search", "arguments": {"query": str}}``
============================  ============================================================================

Text before the action tag (reasoning without ``<think>``) and after its closing tag is allowed and ignored: with
``STOP_STRINGS`` the generation stops at the closing tag anyway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ACTION_TAGS",
    "INVALID_ACTION_FEEDBACK",
    "STOP_STRINGS",
    "ParsedAction",
    "parse_action",
    "render_documents",
    "render_observation",
    "split_contents",
    "strip_think",
    "tag_spans",
]

ActionKind = Literal["search", "answer", "access", "read", "invalid"]

#: Tags that carry an action. ``think`` and ``information`` are not actions.
ACTION_TAGS = ("search", "answer", "tool_call")

#: Stop strings for the policy's sampling params: one turn ends right after its action.
STOP_STRINGS = ("</search>", "</answer>", "</tool_call>")

#: Observation the environment gives back after an invalid turn, so the policy can recover within the episode.
INVALID_ACTION_FEEDBACK = (
    "Your previous turn had no valid action. To search, write one query as <search> query </search>. "
    "To finish, write the final answer as <answer> answer </answer>."
)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_TAG = re.compile(r"<(/?)(search|answer|tool_call)>")


@dataclass(frozen=True)
class ParsedAction:
    """One parsed policy turn.

    Attributes:
        kind: "search", "answer" or "invalid"; the paper's action space adds "access" and "read"
            (``recipe.carl.search.action_space``).
        query: The stripped search query when ``kind == "search"``, else None.
        answer: The stripped answer text when ``kind == "answer"``, else None.
        reason: Why the turn is invalid (see the module docstring), else None.
        syntax: "tag" for Search-R1 tags, "tool_call" for Qwen's JSON form, None when invalid.
        page: The page id of an access, else None.
        part: The 1-based part a read asks for (None: the next one, or not a read).
    """

    kind: ActionKind
    query: str | None = None
    answer: str | None = None
    reason: str | None = None
    syntax: Literal["tag", "tool_call"] | None = None
    page: str | None = None
    part: int | None = None

    @property
    def is_valid(self) -> bool:
        return self.kind != "invalid"


def _invalid(reason: str) -> ParsedAction:
    return ParsedAction(kind="invalid", reason=reason)


def _query_from_tool_call(body: str) -> str | None:
    """Returns the query of a Qwen-style search tool call, or None when the body is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") != "search":
        return None
    arguments = call.get("arguments")
    if isinstance(arguments, str):  # some templates double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    query = arguments.get("query")
    if query is None and isinstance(arguments.get("query_list"), list) and len(arguments["query_list"]) == 1:
        query = arguments["query_list"][0]  # verl v0.7.1 SearchTool's argument name
    return query if isinstance(query, str) else None


def strip_think(text: str) -> str:
    """The turn without its closed ``<think>...</think>`` blocks (a model may mention tags while reasoning)."""
    return _THINK_BLOCK.sub(" ", text)


def tag_spans(text: str, tag: re.Pattern[str]) -> list[tuple[str, str]] | str:
    """The closed action-tag spans of a turn, in order, or the reason its tags are malformed.

    Args:
        text: The turn with ``<think>`` blocks already removed.
        tag: Matches an opening or closing action tag; group 1 is "/" for a closing tag, group 2 the tag's name.

    Returns:
        ``[(name, body), ...]``, or ``"nested_tags"`` / ``"unclosed_tag"``.
    """
    spans: list[tuple[str, str]] = []
    open_tag: tuple[str, int] | None = None
    for match in tag.finditer(text):
        closing, name = match.group(1) == "/", match.group(2)
        if not closing:
            if open_tag is not None:
                return "nested_tags"
            open_tag = (name, match.end())
        elif open_tag is None:
            return "unclosed_tag"  # a stray closing tag
        elif open_tag[0] != name:
            return "nested_tags"
        else:
            spans.append((name, text[open_tag[1] : match.start()]))
            open_tag = None
    return "unclosed_tag" if open_tag is not None else spans


def parse_action(text: str) -> ParsedAction:
    """Parses one generated turn into a search, an answer, or an invalid action.

    Args:
        text: The decoded text of one policy turn (special tokens already removed).

    Returns:
        The parsed action; see the module docstring for the exact invalid cases.
    """
    visible = strip_think(text)

    # Step 1: walk the action tags with a stack, collecting closed (name, body) spans in order.
    spans = tag_spans(visible, _TAG)
    if isinstance(spans, str):
        return _invalid(spans)

    # Step 2: classify the spans.
    searches = [(name, body) for name, body in spans if name in ("search", "tool_call")]
    answers = [body for name, body in spans if name == "answer"]
    if not spans:
        return _invalid("no_action")
    if searches and answers:
        return _invalid("search_and_answer")
    if len(searches) > 1:
        return _invalid("multiple_searches")
    if len(answers) > 1:
        return _invalid("multiple_answers")
    if answers:
        answer = answers[0].strip()
        return ParsedAction(kind="answer", answer=answer, syntax="tag") if answer else _invalid("empty_answer")

    name, body = searches[0]
    if name == "tool_call":
        query = _query_from_tool_call(body.strip())
        if query is None:
            return _invalid("bad_tool_call")
        syntax = "tool_call"
    else:
        query, syntax = body, "tag"
    query = " ".join(query.split())
    return ParsedAction(kind="search", query=query, syntax=syntax) if query else _invalid("empty_query")


def split_contents(contents: str) -> tuple[str, str]:
    """Splits a corpus ``contents`` field ("Title\\ntext") into (title, text).

    wiki-18 (Search-R1's corpus) stores titles in double quotes (``"Paris"\\n...``); the quotes are dropped.
    """
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, text.strip()


def _as_contents(doc: Any) -> str:
    """Accepts a document as a "Title\\ntext" string, a {"contents"} / {"title", "text"} dict, or an object."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping):
        if isinstance(doc.get("document"), Mapping):  # a Search-R1 {"document": ..., "score": ...} entry
            doc = doc["document"]
        if isinstance(doc.get("contents"), str):
            return doc["contents"]
        if "title" in doc or "text" in doc:
            return f"{doc.get('title', '')}\n{doc.get('text', '')}"
    contents = getattr(doc, "contents", None)
    if isinstance(contents, str):
        return contents
    raise TypeError(f"cannot render document of type {type(doc).__name__}: expected a str, a dict with 'contents'")


def _doc_id(doc: Any) -> str | None:
    """A document's corpus id, if it carries one (a ``/retrieve`` entry or a ``Document`` does)."""
    if isinstance(doc, Mapping):
        if isinstance(doc.get("document"), Mapping):
            doc = doc["document"]
        doc_id = doc.get("id")
    else:
        doc_id = getattr(doc, "id", None)
    return None if doc_id is None else str(doc_id)


def render_documents(
    docs: Iterable[Any], max_chars: int | None = None, *, show_ids: bool = False, snippet_words: int | None = None
) -> str:
    """Renders retrieved documents as ``Doc 1 (Title: T) text`` lines, one per document.

    Args:
        docs: Documents in any form ``_as_contents`` accepts (strings, dicts, ``Document`` objects).
        max_chars: Cap on the rendered length; longer output is cut and ends with "...". None means no cap.
        show_ids: ``Doc 1 (id: 17, Title: T) text``: the id an ``<access>`` action names (the paper's action space).
        snippet_words: Show only the first this many words of each document's text, then " ..." (a search
            snippet; the whole page is behind ``<access>``). None shows the whole passage.

    Returns:
        The rendered text, or "No results found." for an empty list.

    Raises:
        ValueError: ``show_ids`` and a document without an id.
    """
    lines = []
    for i, doc in enumerate(docs, start=1):
        title, text = split_contents(_as_contents(doc))
        if snippet_words is not None and len(text.split()) > snippet_words:
            text = " ".join(text.split()[:snippet_words]) + " ..."
        head = f"Doc {i} (Title: {title})"
        if show_ids:
            doc_id = _doc_id(doc)
            if doc_id is None:
                raise ValueError(
                    f"document {i} ({title!r}) has no id to show: the retriever must return each document's 'id' "
                    "(Search-R1's /retrieve does) for the access action"
                )
            head = f"Doc {i} (id: {doc_id}, Title: {title})"
        lines.append(f"{head} {text}".rstrip())
    rendered = "\n".join(lines) if lines else "No results found."
    if max_chars is not None and len(rendered) > max_chars:
        rendered = rendered[: max(0, max_chars - 3)].rstrip() + "..."
    return rendered


def render_observation(content: str | Iterable[Any], max_chars: int | None = None) -> str:
    """Wraps an observation in ``<information>`` tags, ready to append to the policy's context.

    Args:
        content: Already rendered text (e.g. the search tool's output or an error message), or a list of
            documents, which is rendered with ``render_documents``.
        max_chars: Cap on the inner text when ``content`` is a list of documents.

    Returns:
        ``"\\n\\n<information>...</information>\\n\\n"``, the same framing as Search-R1, so the next turn starts on a
        fresh line.
    """
    text = content if isinstance(content, str) else render_documents(content, max_chars=max_chars)
    return f"\n\n<information>{text.strip()}</information>\n\n"
