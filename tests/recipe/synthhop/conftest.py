"""Shared SynthHop fixtures: one 300-entity KB (the recommended size) reused by every test module."""

import pytest

from recipe.carl.synthhop.env import LocalSearch, SynthHopEnv
from recipe.carl.synthhop.kb import KBConfig, make_kb
from recipe.carl.synthhop.make_data import SynthHopConfig, build
from recipe.carl.synthhop.questions import QuestionConfig, make_questions


@pytest.fixture(scope="session")
def kb():
    return make_kb(KBConfig(n_entities=300, seed=0))


@pytest.fixture(scope="session")
def splits(kb):
    return make_questions(kb, QuestionConfig(n_train=400, n_test=200, seed=0))


@pytest.fixture(scope="session")
def search(kb):
    return LocalSearch(kb.corpus(), top_k=2, doc_words=48)


@pytest.fixture()
def env(search):
    return SynthHopEnv(search, max_turns=6)


@pytest.fixture(scope="session")
def small_data():
    return build(SynthHopConfig(n_entities=120, n_train=150, n_test=50, seed=3))
