"""Shared fixtures: a small generated Wikipedia-like corpus and a BM25 retriever over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.carl.search.retriever import Retriever, RetrieverConfig

# Distinct vocabulary per document, so the expected top hit of each query below is unambiguous.
DOCS = [
    ("Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("Berlin", "Berlin is the capital of Germany and its largest city by population."),
    ("Georges Seurat", "Seurat painted A Sunday Afternoon on the Island of La Grande Jatte in a pointillist style."),
    ("Cat", "The cat is a small domesticated carnivorous mammal kept as a pet."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Ada Lovelace", "Ada Lovelace wrote the first published algorithm for Babbage's Analytical Engine."),
]
FILLER = [
    (f"Filler {i}", f"Filler passage number {i} about weather, rivers and farming in region {i}.") for i in range(30)
]


def write_corpus(path: Path, docs: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, (title, text) in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "contents": f'"{title}"\n{text}'}) + "\n")
    return path


@pytest.fixture
def corpus_path(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", DOCS + FILLER)


@pytest.fixture(scope="module")
def bm25_retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    path = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", DOCS + FILLER)
    return Retriever.from_config(RetrieverConfig(corpus_path=str(path)))


@pytest.fixture
def make_corpus(tmp_path: Path):
    """Returns ``make(name, docs=None, lines=None)``: writes docs (default: the shared corpus) or raw lines."""

    def make(name: str = "corpus.jsonl", docs: list[tuple[str, str]] | None = None, lines: list[str] | None = None):
        path = tmp_path / name
        if lines is not None:
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            return path
        return write_corpus(path, DOCS + FILLER if docs is None else docs)

    return make
