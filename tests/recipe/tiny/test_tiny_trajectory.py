"""SFT demonstrations are laid out token for token as the CARL agent loop builds trajectories."""

import pytest

from recipe.carl.search.actions import render_documents, render_observation
from recipe.carl.synthhop.tokenizer import build_tokenizer
from recipe.carl.tiny.trajectory import agent_loop_example

DOCS = {"Uldal headquarters": [{"id": "1", "contents": "Uldal\nUldal is headquartered in Drein ."}]}
MESSAGES = [
    {"role": "system", "content": "Search with <search> entity relation </search> ."},
    {"role": "user", "content": "What is the headquarters of Uldal ?"},
    {"role": "assistant", "content": "<search> Uldal headquarters </search>"},
    {"role": "tool", "content": "ignored: observations are fetched again"},
    {"role": "assistant", "content": "<answer> Drein </answer>"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for m in MESSAGES] + [render_observation(render_documents(DOCS["Uldal headquarters"]))]
    return build_tokenizer(texts)


def test_layout_matches_the_agent_loop(tok):
    from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder

    ex = agent_loop_example(tok, MESSAGES, lambda q: DOCS[q])
    # The agent loop: verl's initial tokens for the prompt, then action, observation, action, nothing in between.
    prompt = ContinuousTokenBuilder(tok).build_initial_tokens(MESSAGES[:2])
    a1 = tok.encode("<search> Uldal headquarters </search>", add_special_tokens=False)
    obs = tok.encode(render_observation(render_documents(DOCS["Uldal headquarters"])), add_special_tokens=False)
    a2 = tok.encode("<answer> Drein </answer>", add_special_tokens=False)
    assert ex.input_ids == list(prompt) + a1 + obs + a2
    assert ex.loss_mask == [0] * len(prompt) + [1] * len(a1) + [0] * len(obs) + [1] * len(a2)
    assert tok.unk_token_id not in ex.input_ids


def test_a_demo_without_actions_is_refused(tok):
    with pytest.raises(ValueError, match="at least one assistant action"):
        agent_loop_example(tok, MESSAGES[:2], lambda q: [])
