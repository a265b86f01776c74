"""The start-up wait for a retriever that does not answer yet (`CARL_RETRIEVER_WAIT_S`), used by `main_carl`'s
preflight and by `recipe.carl.evaluate`. (The client's requests are tested with the tool in test_search_tool.py.)"""

from __future__ import annotations

import pytest

from recipe.carl.search import client
from recipe.carl.search.client import RETRIEVER_WAIT_ENV, retriever_wait_s, until_it_answers


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("", 0.0), ("0", 0.0), ("12.5", 12.5), ("600", 600.0)])
def test_wait_seconds_from_the_environment(value, seconds):
    assert retriever_wait_s({} if value is None else {RETRIEVER_WAIT_ENV: value}) == seconds


@pytest.mark.parametrize("value", ["-1", "ten", "nan", "1e"])
def test_a_bad_wait_names_the_variable(value):
    with pytest.raises(ValueError, match=rf"{RETRIEVER_WAIT_ENV}='{value}': give seconds >= 0"):
        retriever_wait_s({RETRIEVER_WAIT_ENV: value})


def flaky(failures: int):
    """A check that raises `failures` times, then answers."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionError(f"refused #{len(calls)}")
        return {"status": "ok"}

    return check, calls


def test_a_retriever_that_answers_late_is_waited_for():
    check, calls = flaky(2)
    messages = []
    assert until_it_answers(check, "http://h:1/retrieve", 5.0, messages.append, every_s=0.01) == {"status": "ok"}
    assert len(calls) == 3 and len(messages) == 2
    assert all("http://h:1/retrieve does not answer yet" in m and RETRIEVER_WAIT_ENV in m for m in messages)


def test_without_a_wait_the_first_error_is_raised_at_once():
    check, calls = flaky(1)
    messages = []
    with pytest.raises(ConnectionError, match="refused #1"):
        until_it_answers(check, "u", 0.0, messages.append, every_s=0.01)
    assert len(calls) == 1 and messages == []


def test_the_last_error_is_raised_when_the_time_is_up(monkeypatch):
    monkeypatch.setattr(client, "WAIT_EVERY_S", 0.01)  # the default interval is read when called
    check, calls = flaky(10**6)
    with pytest.raises(ConnectionError) as error:
        until_it_answers(check, "u", 0.1, lambda message: None)
    assert 2 <= len(calls) < 100 and str(error.value) == f"refused #{len(calls)}"
