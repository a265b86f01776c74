"""parse_action: every valid and invalid case from the module docstring; rendering of documents and observations."""

from __future__ import annotations

import json

import pytest

from recipe.carl.search.actions import (
    STOP_STRINGS,
    ParsedAction,
    parse_action,
    render_documents,
    render_observation,
    split_contents,
)
from recipe.carl.search.client import Document


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("<search>capital of France</search>", "capital of France"),
        ("<think>I need the capital.</think>\n<search>  capital of\n France </search>", "capital of France"),
        ("Let me look it up. <search>Seurat painting</search>", "Seurat painting"),  # reasoning without <think>
        ("<search>q</search> trailing text is ignored", "q"),
        # A tag mentioned inside a closed think block is not an action.
        (
            "<think>maybe <answer>Paris</answer>? no, check</think><search>capital of France</search>",
            "capital of France",
        ),
    ],
)
def test_search_actions(text, query):
    assert parse_action(text) == ParsedAction(kind="search", query=query, syntax="tag")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer>Paris</answer>", "Paris"),
        ("<think>done</think> <answer>\n  Georges Seurat \n</answer>", "Georges Seurat"),
    ],
)
def test_answer_actions(text, answer):
    action = parse_action(text)
    assert action == ParsedAction(kind="answer", answer=answer, syntax="tag") and action.is_valid


@pytest.mark.parametrize(
    "arguments",
    [{"query": "capital of France"}, json.dumps({"query": "capital of France"}), {"query_list": ["capital of France"]}],
)
def test_qwen_tool_call_form(arguments):
    text = '<tool_call>\n{"name": "search", "arguments": ' + json.dumps(arguments) + "}\n</tool_call>"
    assert parse_action(text) == ParsedAction(kind="search", query="capital of France", syntax="tool_call")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no_action"),
        ("I think the answer is Paris.", "no_action"),
        ("<think>only thinking</think>", "no_action"),
        ("<search>capital of France", "unclosed_tag"),
        ("<answer>Paris", "unclosed_tag"),
        ("Paris</answer>", "unclosed_tag"),
        ("<think>unclosed think <search>q</search>", "ok"),  # an unclosed think is just text; the search counts
        ("<search><answer>x</answer></search>", "nested_tags"),
        ("<search>q</answer>", "nested_tags"),
        ("<search>q</search><answer>Paris</answer>", "search_and_answer"),
        ("<search>q1</search><search>q2</search>", "multiple_searches"),
        (
            '<search>q1</search><tool_call>{"name": "search", "arguments": {"query": "q2"}}</tool_call>',
            "multiple_searches",
        ),
        ("<answer>Paris</answer><answer>Lyon</answer>", "multiple_answers"),
        ("<search>   </search>", "empty_query"),
        ("<answer> \n </answer>", "empty_answer"),
        ("<tool_call>not json</tool_call>", "bad_tool_call"),
        ('<tool_call>{"name": "calculator", "arguments": {"query": "1+1"}}</tool_call>', "bad_tool_call"),
        ('<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>', "bad_tool_call"),
        ('<tool_call>{"name": "search", "arguments": {"query": 3}}</tool_call>', "bad_tool_call"),
        ('<tool_call>{"name": "search", "arguments": {"query": "  "}}</tool_call>', "empty_query"),
    ],
)
def test_invalid_actions(text, reason):
    action = parse_action(text)
    if reason == "ok":
        assert action.kind == "search" and action.query == "q"
        return
    assert action == ParsedAction(kind="invalid", reason=reason)
    assert not action.is_valid


def test_stop_strings_end_every_action():
    assert set(STOP_STRINGS) == {"</search>", "</answer>", "</tool_call>"}


def test_split_contents_strips_wiki18_title_quotes():
    assert split_contents('"Paris"\nParis is the capital.\nMore.') == ("Paris", "Paris is the capital.\nMore.")
    assert split_contents("Just a title") == ("Just a title", "")
    assert split_contents('"Quoted" title\ntext') == ('"Quoted" title', "text")  # not fully quoted: kept


def test_render_documents_accepts_every_document_shape():
    docs = [
        '"Paris"\nCapital of France.',
        {"id": "1", "contents": "Berlin\nCapital of Germany."},
        {"document": {"contents": "Rome\nCapital of Italy."}, "score": 1.0},
        {"title": "Oslo", "text": "Capital of Norway."},
        Document(contents="Bern\nCapital of Switzerland."),
    ]
    assert render_documents(docs) == (
        "Doc 1 (Title: Paris) Capital of France.\n"
        "Doc 2 (Title: Berlin) Capital of Germany.\n"
        "Doc 3 (Title: Rome) Capital of Italy.\n"
        "Doc 4 (Title: Oslo) Capital of Norway.\n"
        "Doc 5 (Title: Bern) Capital of Switzerland."
    )
    assert render_documents([]) == "No results found."
    with pytest.raises(TypeError, match="cannot render document of type int"):
        render_documents([3])


def test_render_documents_caps_length():
    rendered = render_documents(["T\n" + "word " * 100], max_chars=40)
    assert len(rendered) <= 40 and rendered.endswith("word...")


def test_render_observation_wraps_in_information_tags():
    assert render_observation(" Doc 1 (Title: A) a \n") == "\n\n<information>Doc 1 (Title: A) a</information>\n\n"
    assert render_observation(["A\na", "B\nb"]) == (
        "\n\n<information>Doc 1 (Title: A) a\nDoc 2 (Title: B) b</information>\n\n"
    )
    # An observation appended after a search must not contain anything parse_action would read as an action.
    follow_up = "<search>q</search>" + render_observation(["A\na"]) + "<answer>a</answer>"
    assert parse_action(follow_up.split("</search>")[1]).kind == "answer"
