"""The two action spaces: Search-R1's unchanged, the paper's parser (each malformed tag with its reason), parts of a
page and reading on, the feedback each reason gets, and the in-process session the SFT layout uses."""

from __future__ import annotations

import pytest

from recipe.carl.search.action_space import (
    PAPER_STOP_STRINGS,
    PaperActions,
    PaperSession,
    Reading,
    SearchR1Actions,
    make_action_space,
    open_page,
    parse_paper_action,
    read_part,
    reading_on_path,
    render_part,
)
from recipe.carl.search.actions import INVALID_ACTION_FEEDBACK, STOP_STRINGS, parse_action


def test_search_r1_is_the_default_and_unchanged():
    space = make_action_space()
    assert isinstance(space, SearchR1Actions) and space.name == "search_r1"
    assert space.stop_strings == STOP_STRINGS == ("</search>", "</answer>", "</tool_call>")
    for text in ("<search> q </search>", "<answer> a </answer>", "<access> 3 </access>", "x"):
        assert space.parse(text) == parse_action(text)
    assert space.parse("<access> 3 </access>").reason == "no_action"  # Search-R1 has no access action
    assert space.feedback("no_action") == space.feedback("anything") == INVALID_ACTION_FEEDBACK
    with pytest.raises(ValueError, match="action_space='webshop' is unknown: use one of search_r1, paper"):
        make_action_space("webshop")
    with pytest.raises(ValueError, match="page_chunk_chars=0 must be an integer >= 1"):
        make_action_space("paper", 0)


@pytest.mark.parametrize(
    ("text", "kind", "field", "value"),
    [
        ("<search> capital of  France </search>", "search", "query", "capital of France"),
        ("let me open it <access> 17 </access>", "access", "page", "17"),
        ("<access> Uldal </access>", "access", "page", "Uldal"),
        ("<read> </read>", "read", "part", None),
        ("<read>3</read>", "read", "part", 3),
        ("<answer> Paris </answer>", "answer", "answer", "Paris"),
        ("<think> maybe <read> </read> or <answer> x </answer> </think> <access> 4 </access>", "access", "page", "4"),
    ],
)
def test_the_paper_parser_reads_each_action(text, kind, field, value):
    action = parse_paper_action(text)
    assert action.kind == kind and getattr(action, field) == value and action.syntax == "tag"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I would search for it.", "no_action"),
        ("<search> q", "unclosed_tag"),
        ("q </read>", "unclosed_tag"),
        ("<access> <read> </read> </access>", "nested_tags"),
        ("<search> q </access>", "nested_tags"),
        ("<search> q </search> <answer> a </answer>", "search_and_answer"),
        ("<search> q </search> <access> 3 </access>", "multiple_actions"),
        ("<read> </read> <read> </read>", "multiple_actions"),
        ("<search>  </search>", "empty_query"),
        ("<answer> </answer>", "empty_answer"),
        ("<access> </access>", "empty_page_id"),
        ("<read> next </read>", "bad_read_index"),
        ("<read> 0 </read>", "bad_read_index"),
        ("<read> -2 </read>", "bad_read_index"),
        ('<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>', "no_action"),
    ],
)
def test_each_malformed_paper_turn_has_its_reason(text, reason):
    action = make_action_space("paper").parse(text)
    assert action.kind == "invalid" and action.reason == reason


def test_a_page_opens_at_its_first_part_and_reads_on_until_its_end():
    page = "Uldal\nUldal is a company . Uldal was founded by Nysa_Oax . Uldal is headquartered in Drein ."
    reading = open_page("Uldal", page, 40)
    # Parts of at most 40 characters, each ending at the last sentence end of its window (" ." then a space).
    assert reading.parts == (
        "Uldal is a company .",
        "Uldal was founded by Nysa_Oax .",
        "Uldal is headquartered in Drein .",
    )
    assert reading.title == "Uldal" and reading.part == 0
    assert render_part(reading) == "Page Uldal (Title: Uldal), part 1 of 3: Uldal is a company ."
    second = read_part(reading, None)
    assert isinstance(second, Reading) and second.part == 1
    assert (
        render_part(read_part(second, 3)) == "Page Uldal (Title: Uldal), part 3 of 3: Uldal is headquartered in Drein ."
    )
    assert read_part(second, 1).part == 0  # any part can be read again
    assert read_part(read_part(second, 3), None) == ("read_past_end", {"page": "Uldal", "parts": 3, "want": 4})
    assert read_part(reading, 7) == ("read_past_end", {"page": "Uldal", "parts": 3, "want": 7})
    assert read_part(None, None) == ("read_without_page", {})
    assert open_page("E", "E\n", 10).parts == ("",)  # an empty page still has one (empty) part


def test_the_open_page_of_a_path_is_the_last_one_shown():
    infos = [{"kind": "search"}, {"kind": "access", "page": "7", "part": 1}, {"kind": "search"}, {"kind": "read"}]
    assert reading_on_path(infos) == ("7", 0)  # a search and a failed read in between do not close the page
    infos.append({"kind": "read", "page": "7", "part": 2})
    assert reading_on_path(infos) == ("7", 1)
    infos.append({"kind": "access", "page": "9", "part": 1})
    assert reading_on_path(infos) == ("9", 0)
    assert reading_on_path([{"kind": "search"}, {"kind": "access", "page_id": "3", "reason": "unknown_page"}]) is None


def test_each_reason_gets_feedback_that_says_how_to_act():
    space = PaperActions()
    assert space.stop_strings == PAPER_STOP_STRINGS == ("</search>", "</access>", "</read>", "</answer>")
    assert space.feedback("unknown_page", page="42").startswith("There is no page with the id 42.")
    assert "before reading with <read> </read>" in space.feedback("read_without_page")
    assert space.feedback("read_past_end", page="7", parts=2, want=3).startswith(
        "Page 7 has 2 parts; there is no part 3."
    )
    generic = space.feedback("nested_tags")
    assert all(tag in generic for tag in ("<search>", "<access> id </access>", "<read> </read>", "<answer>"))


def test_a_session_computes_the_observations_the_agent_loop_shows():
    pages = {"U": "Uldal\nUldal is a company . Uldal is headquartered in Drein ."}
    session = PaperSession(
        PaperActions(chunk_chars=40), lambda q: f"Doc 1 (id: U, Title: Uldal) result for {q}", pages.get
    )
    steps = [
        session.step(t)
        for t in ("<read> </read>", "<search> Uldal headquarters </search>", "<access> X </access>")
        + ("<access> U </access>", "<read> </read>", "<read> </read>", "<answer> Drein </answer>", "<search></search>")
    ]
    assert [s.reason for s in steps] == [
        "read_without_page",
        None,
        "unknown_page",
        None,
        None,
        "read_past_end",
        None,
        "empty_query",
    ]
    assert steps[1].observation == (
        "\n\n<information>Doc 1 (id: U, Title: Uldal) result for Uldal headquarters</information>\n\n"
    )
    assert (
        steps[3].observation
        == "\n\n<information>Page U (Title: Uldal), part 1 of 2: Uldal is a company .</information>\n\n"
    )
    assert "part 2 of 2: Uldal is headquartered in Drein ." in steps[4].observation
    assert steps[6].action.kind == "answer" and steps[6].observation is None
