"""The knowledge base: determinism, one-token search-safe names, single-target typed facts, documents."""

import pytest
import Stemmer

from recipe.carl.synthhop.kb import ENTITY_TYPES, PERSON, RELATION_BY_NAME, RELATIONS, KBConfig, make_kb, split_counts


def test_same_seed_same_kb_and_other_seed_differs(kb):
    assert make_kb(KBConfig(n_entities=300, seed=0)).corpus() == kb.corpus()
    assert make_kb(KBConfig(n_entities=300, seed=1)).corpus() != kb.corpus()


def test_type_counts_follow_the_mix(kb):
    counts = {t: len(kb.names(t)) for t in ENTITY_TYPES}
    assert counts == {"person": 150, "company": 60, "city": 60, "country": 30}


def test_names_are_unique_single_tokens_and_stemmer_fixed_points(kb):
    names = kb.names()
    assert len(set(names)) == len(names) == 300
    stem = Stemmer.Stemmer("english").stemWord
    words = {w for r in RELATIONS for w in (r.name, *r.verb.split())}
    for e in kb.entities:
        assert len(e.name.split()) == 1
        # persons are First_Last, the others one capitalised word
        assert e.name.count("_") == (1 if e.type == PERSON else 0)
        assert stem(e.name.lower()) == e.name.lower()
        assert e.name.lower() not in words


def test_facts_are_typed_single_target_and_within_the_relation_budget(kb):
    for e in kb.entities:
        own = [r.name for r in RELATIONS if r.subject_type == e.type]
        assert 3 <= len(e.facts) <= min(4, len(own))
        for relation, target in e.facts.items():
            assert relation in own
            assert target != e.name
            assert kb.index[target].type == RELATION_BY_NAME[relation].object_type


def test_documents_hold_every_fact_once_in_the_corpus_format(kb):
    corpus = kb.corpus()
    assert [d["id"] for d in corpus] == [str(i) for i in range(len(kb.entities))]
    for doc, e in zip(corpus, kb.entities, strict=True):
        title, text = doc["contents"].split("\n")
        assert title == e.name
        sentences = [s.strip() for s in text.split(" .") if s.strip()]
        assert sorted(sentences) == sorted(f"{e.name} {RELATION_BY_NAME[r].verb} {o}" for r, o in e.facts.items())
        assert len(text.split()) <= 30  # compact: fits the 48-word observation cut with room to spare


def test_split_counts_is_exact():
    assert split_counts(10, (0.2, 0.4, 0.4)) == [2, 4, 4]
    assert sum(split_counts(7, (0.5, 0.2, 0.2, 0.1))) == 7


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_entities": -1}, "--n-entities"),
        ({"n_entities": 10}, "Raise --n-entities to at least"),
        ({"relations_per_entity": (4, 3)}, "--relations-per-entity"),
        ({"relations_per_entity": (0, 2)}, "--relations-per-entity"),
        ({"type_mix": (0.5, 0.5, 0.1, 0.1)}, "type_mix"),
    ],
)
def test_bad_knobs_name_the_knob(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        KBConfig(**kwargs)
