"""SynthHop's pages variant: pages longer than a snippet with the needed fact inside, a reference agent that searches,
opens and reads, its files, and its demonstrations laid out for SFT exactly as the agent loop shows them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from recipe.carl.search.action_space import parse_paper_action
from recipe.carl.search.actions import render_documents
from recipe.carl.synthhop.agent import make_demos, success_rate
from recipe.carl.synthhop.env import LocalSearch
from recipe.carl.synthhop.kb import RELATION_BY_NAME
from recipe.carl.synthhop.make_data import SynthHopConfig, build, main
from recipe.carl.synthhop.pages import (
    PAGES_SYSTEM_PROMPT,
    PagesConfig,
    PagesReferenceAgent,
    page_corpus,
    page_text,
    session,
)


def test_every_page_is_longer_than_its_snippet_and_holds_its_facts_after_it(kb):
    config = PagesConfig()
    for doc in page_corpus(kb)[:60]:
        name = doc["id"]
        entity = kb.index[name]
        assert doc["contents"] == f"{name}\n{page_text(kb, name)}" and page_text(kb, name).startswith(f"{name} is a ")
        shown = render_documents([doc], show_ids=True, snippet_words=config.snippet_words)
        assert shown == f"Doc 1 (id: {name}, Title: {name}) {name} is a {entity.type} . ..."
        for relation, target in entity.facts.items():
            sentence = f"{name} {RELATION_BY_NAME[relation].verb} {target} ."
            assert sentence in doc["contents"] and sentence not in shown  # in the page, never in the snippet


def test_the_oracle_reads_every_fact_it_needs(kb, splits):
    """Without noise and with turns to spare the reference agent answers every question: each needed page is found,
    opened and read until its fact, and no fact is cut between two parts."""
    train, _ = splits
    corpus = page_corpus(kb)
    agent = PagesReferenceAgent(kb, LocalSearch(corpus, top_k=2, doc_words=60), PagesConfig(), max_turns=40)
    demos = make_demos(agent, train[:150])
    assert success_rate(demos)["all"] == 1.0
    for demo in demos[:20]:
        kinds = [parse_paper_action(t.action).kind for t in demo.turns]
        assert kinds[-1] == "answer" and kinds.count("search") == demo.hops == kinds.count("access")
        # every access is right after its search, every read after an access or a read
        for before, kind in zip(kinds, kinds[1:], strict=False):
            assert kind != "access" or before == "search"
            assert kind != "read" or before in ("access", "read")


def test_noise_and_the_turn_budget_fail_some_demonstrations_as_the_default_agent_does(kb, splits):
    train, _ = splits
    agent = PagesReferenceAgent(kb, LocalSearch(page_corpus(kb), top_k=2, doc_words=60), PagesConfig(), 0.3, 0, 14)
    demos = make_demos(agent, train[:300])
    rate = success_rate(demos)["all"]
    assert 0.6 < rate < 0.95 and all(len(d.turns) <= 14 for d in demos)
    assert any(d.wrong_searches for d in demos) and any(d.early_answer for d in demos)


def test_make_data_pages_writes_the_variant_and_keeps_the_default_manifest(tmp_path):
    out = tmp_path / "pages"
    manifest = main(["--out", str(out), "--pages", "--n-entities", "120", "--n-train", "60", "--n-test", "10",
                     "--quiet"])  # fmt: skip
    assert manifest["config"]["pages"] == {"snippet_words": 5, "chunk_chars": 64}
    assert manifest["config"]["max_turns"] == 14
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert all(doc["id"] == doc["contents"].split("\n")[0] for doc in corpus)
    row = pd.read_parquet(out / "train.parquet").iloc[0]
    assert row["prompt"][0]["content"] == PAGES_SYSTEM_PROMPT
    demos = [json.loads(line) for line in (out / "demos.jsonl").read_text().splitlines()]
    actions = [m["content"] for d in demos for m in d["messages"] if m["role"] == "assistant"]
    assert any(a.startswith("<access>") for a in actions) and any(a.startswith("<read>") for a in actions)
    assert demos[0]["messages"][0]["content"] == PAGES_SYSTEM_PROMPT
    plain = main(["--out", str(tmp_path / "plain"), "--n-entities", "120", "--n-train", "60", "--n-test", "10",
                  "--quiet"])  # fmt: skip
    assert "pages" not in plain["config"] and plain["config"]["max_turns"] == 6


def test_a_part_size_that_would_cut_a_fact_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"page_chunk_chars \(--page-chunk-chars\) = 20 would cut fact sentences"):
        build(SynthHopConfig(n_entities=120, n_train=20, n_test=5, pages=PagesConfig(chunk_chars=20)))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--pages", "--snippet-words", "0", "--quiet"])
    assert "snippet_words must be an int >= 1" in capsys.readouterr().err


def test_demonstrations_are_laid_out_with_the_agent_loops_observations(tmp_path):
    """The SFT layout of a pages demonstration: each action trained, each observation (search results with ids,
    page parts) exactly the agent loop's and never trained."""
    from recipe.carl.synthhop.make_data import write
    from recipe.carl.tiny.trajectory import agent_loop_example, corpus_search

    data = build(SynthHopConfig(n_entities=120, n_train=30, n_test=5, seed=1, pages=PagesConfig(), max_turns=14))
    write(data, tmp_path)
    _, search = corpus_search(tmp_path / "corpus.jsonl", 2)
    contents = {doc["id"]: doc["contents"] for doc in page_corpus(data.kb)}
    tok = data.tokenizer
    demo = next(d for d in data.demos if d.success and d.hops >= 2)
    messages = demo.to_messages(PAGES_SYSTEM_PROMPT)
    example = agent_loop_example(tok, messages, search, session(search, contents, PagesConfig()))
    trained = tok.decode([i for i, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    assert trained.split() == " ".join(t.action for t in demo.turns).split()
    shown = tok.decode([i for i, m in zip(example.input_ids, example.loss_mask, strict=True) if not m])
    assert shown.count("<information>") == len(demo.turns) - 1  # every action but the answer gets an observation
    assert "Page " in shown and "part 1 of" in shown and "( id :" in shown  # the tokenizer splits "(", ":" and ","
    with pytest.raises(ValueError, match="gets no observation \\(unknown_page\\): fix the data"):
        bad = [*messages[:2], {"role": "assistant", "content": "<access> Nowhere </access>"}]
        agent_loop_example(tok, [*bad, {"role": "assistant", "content": "<answer> x </answer>"}], search,
                           session(search, contents, PagesConfig()))  # fmt: skip


def test_the_pages_sft_key_names_its_action_space_and_the_default_key_does_not():
    """The shipped start is keyed on the default data's key fields: the pages variant must not change them."""
    from recipe.carl.tiny.config import DemoConfig
    from recipe.carl.tiny.sft import Example
    from recipe.carl.tiny.warm_start import sft_key

    data = build(SynthHopConfig(n_entities=120, n_train=10, n_test=5))
    examples = [Example([1, 2], [0, 1])]
    default = sft_key(DemoConfig(), data.tokenizer, examples)
    assert "action_space" not in default and len(default) == 10
    pages = sft_key(DemoConfig().with_pages(), data.tokenizer, examples)
    assert pages["action_space"] == "paper" and pages["page_chunk_chars"] == 64 and pages["snippet_words"] == 5
