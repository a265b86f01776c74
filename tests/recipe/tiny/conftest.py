"""Shared fixtures for the tiny-policy tests: one small SynthHop data set on disk and a tiny random policy."""

import pytest

from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from recipe.carl.tiny.policy import TinyPolicyConfig, build_tiny_policy, save_policy

# Far below the real sizes so the whole folder runs in seconds; the tokenizer still covers the data.
TINY_SHAPE = TinyPolicyConfig(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=512
)


@pytest.fixture(scope="session")
def data():
    """An in-memory SynthHop data set (p=0.3 demonstrations)."""
    return build(SynthHopConfig(n_entities=120, n_train=120, n_test=40, seed=5))


@pytest.fixture(scope="session")
def data_dir(data, tmp_path_factory):
    """The same data set written by make_data (corpus, parquet splits, demos, tokenizer, manifest)."""
    out = tmp_path_factory.mktemp("synthhop")
    write(data, out)
    return out


@pytest.fixture(scope="session")
def tiny_policy_dir(data, tmp_path_factory):
    """A tiny random policy saved with its tokenizer."""
    out = tmp_path_factory.mktemp("policy")
    save_policy(build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=0), data.tokenizer, out)
    return out
