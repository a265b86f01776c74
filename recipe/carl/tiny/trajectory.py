"""Demonstrations in the exact token layout of the CARL agent loop, for the SFT warm start.

The agent loop (`recipe.carl.agent_loop`) renders the prompt with the chat template and a generation prompt, then
appends, Search-R1 style, each sampled action and the observation the search tool returned, with no chat glue in
between: ``prompt | <search> q </search> | <information>Doc 1 (Title: T) ...</information> | <answer> a </answer>``.
A warm start must see the same layout, or RL starts from a policy trained on another format. So here each
demonstration's searches are re-run against the project's retriever and rendered with the same functions the
agent loop uses (`render_documents`, `render_observation`); only action tokens are trained. Under the paper's
action space (SynthHop's pages variant) a `PaperSession` computes them instead: the search results with their ids,
the parts of the pages opened and read (`recipe.carl.search.action_space`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from recipe.carl.search.action_space import PaperSession
from recipe.carl.search.actions import parse_action, render_documents, render_observation
from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.tiny.sft import Example

Search = Callable[[str], list[dict]]
"""A query -> the retriever's documents (`{"id", "contents"}` dicts), as the search tool would fetch them."""


def observation_text(docs: Sequence[dict]) -> str:
    """What the agent loop appends after a search action (the tool's rendering wrapped in `<information>`)."""
    return render_observation(render_documents(docs))


def corpus_search(corpus_path, topk: int):
    """The run's BM25 retriever over `corpus_path` and a `Search` that answers as the RL runs' retriever does."""
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path)))

    def search(query: str) -> list[dict]:
        return [hit["document"] for hit in retriever.search_documents([query], topk)[0]]

    return retriever, search


def agent_loop_example(
    tokenizer, messages: Sequence[dict], search: Search, session: PaperSession | None = None
) -> Example:
    """Token ids and loss mask of one demonstration, laid out as the CARL agent loop builds a trajectory.

    Args:
        tokenizer: the policy's tokenizer (with a chat template).
        messages: system and user messages, then assistant actions (tool messages are ignored: observations are
            re-fetched with `search` so they match what the retriever returns during RL).
        search: the retriever.
        session: the paper's action space: a fresh session over the same retriever and its pages, which computes
            every observation (searches, accesses, reads); None: Search-R1's searches only.

    Returns:
        The example; `loss_mask` is 1 on action tokens only.
    """
    prompt = [m for m in messages if m["role"] in ("system", "user")]
    actions = [m["content"] for m in messages if m["role"] == "assistant"]
    if not prompt or not actions:
        raise ValueError("a demonstration needs a user message and at least one assistant action.")
    ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    mask = [0] * len(ids)
    for i, text in enumerate(actions):
        action = tokenizer.encode(text, add_special_tokens=False)
        ids += action
        mask += [1] * len(action)
        if i == len(actions) - 1:
            break  # no observation follows the last action
        if session is not None:
            shown = session.step(text)
            if shown.observation is None:
                raise ValueError(
                    f"demonstration action {i} {text!r} gets no observation ({shown.reason}): fix the data"
                )
            observation = shown.observation
        else:
            parsed = parse_action(text)
            if parsed.kind != "search":
                continue
            observation = observation_text(search(parsed.query))
        obs = tokenizer.encode(observation, add_special_tokens=False)
        ids += obs
        mask += [0] * len(obs)
    return Example(ids, mask)
