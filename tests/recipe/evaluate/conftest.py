"""Fixtures of the evaluation tests: SynthHop of the shipped policy's knowledge base, its retriever and tokenizer."""

from __future__ import annotations

import pytest

from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.search.server import serve_in_thread
from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from tests.recipe.evaluate.common import SHIPPED


@pytest.fixture(scope="package")
def data_dir(tmp_path_factory):
    """SynthHop of the shipped policy's knowledge base (seed 0, 300 entities: every name is in its vocabulary)."""
    out = tmp_path_factory.mktemp("synthhop0")
    write(build(SynthHopConfig(seed=0, n_entities=300, n_train=20, n_test=24)), out, overwrite=True)
    return out


@pytest.fixture(scope="package")
def retriever_url(data_dir):
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data_dir / "corpus.jsonl")))
    with serve_in_thread(retriever) as url:
        yield f"{url}/retrieve"


@pytest.fixture(scope="package")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHIPPED))
