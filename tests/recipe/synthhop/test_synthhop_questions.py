"""Questions: oracle paths agree with the KB and with BM25 search; no question can be answered without searching."""

from collections import Counter

import pytest

from recipe.carl.synthhop.kb import KBConfig, make_kb
from recipe.carl.synthhop.questions import QuestionConfig, enumerate_questions, make_questions, question_text


def test_same_seed_same_questions(kb, splits):
    assert make_questions(kb, QuestionConfig(n_train=400, n_test=200, seed=0)) == splits
    assert make_questions(kb, QuestionConfig(n_train=400, n_test=200, seed=1)) != splits


def test_hop_mix_is_exact_and_splits_are_disjoint(splits):
    train, test = splits
    assert Counter(q.hops for q in train) == {1: 80, 2: 160, 3: 160}
    assert Counter(q.hops for q in test) == {1: 40, 2: 80, 3: 80}
    assert len({q.text for q in train}) == len(train)
    assert not {q.text for q in train} & {q.text for q in test}


def test_oracle_path_follows_the_kb_without_repeats(kb, splits):
    for q in splits[0] + splits[1]:
        assert len(q.path) == q.hops + 1 == len(q.oracle_queries) + 1
        assert len(set(q.path)) == len(q.path)
        for src, relation, dst in zip(q.path[:-1], q.relations, q.path[1:], strict=True):
            assert kb.fact(src, relation) == dst
        assert q.answer == q.path[-1]
        assert q.text == question_text(q.subject, q.relations)
        assert q.oracle_queries[0] == f"{q.subject} {q.relations[0]}"


def test_following_the_oracle_searches_reaches_the_answer(search, splits):
    # The entity of every hop, and finally the answer, is in the observation of that hop's oracle query.
    for q in splits[0] + splits[1]:
        for query, found in zip(q.oracle_queries, q.path[1:], strict=True):
            assert found in search.observation(query).split(), (q.text, query)


def test_only_the_subject_is_named_in_the_question(kb, splits):
    names = set(kb.names())
    for q in splits[0] + splits[1]:
        assert [w for w in q.text.split() if w in names] == [q.subject]
        assert q.answer not in q.text.split()


def test_no_search_baselines_are_near_zero(splits):
    train, test = splits
    # 1. Copy an entity of the question (the subject): never right, since paths have no repeats.
    assert sum(q.subject == q.answer for q in test) == 0
    # 2. The most frequent training answer, for every test question.
    top = Counter(q.answer for q in train).most_common(1)[0][0]
    assert sum(q.answer == top for q in test) / len(test) < 0.05
    # 3. Type-aware prior: the most frequent training answer for the question's last relation.
    by_relation = {}
    for q in train:
        by_relation.setdefault(q.relations[-1], Counter())[q.answer] += 1
    hits = sum(q.answer == by_relation[q.relations[-1]].most_common(1)[0][0] for q in test)
    assert hits / len(test) < 0.10


def test_enumeration_counts_every_distinct_path(kb):
    one_hop = enumerate_questions(kb, 1)
    assert len(one_hop) == sum(len(e.facts) for e in kb.entities)
    assert len({q.text for q in enumerate_questions(kb, 2)}) == len(enumerate_questions(kb, 2))


def test_too_small_kb_for_the_hop_mix_names_the_knobs():
    tiny = make_kb(KBConfig(n_entities=20))
    with pytest.raises(ValueError, match=r"1-hop.*--n-entities.*--n-train / --n-test.*--hop-mix"):
        make_questions(tiny, QuestionConfig(n_train=1000, n_test=10))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"n_train": -5}, "--n-train"), ({"n_test": -1}, "--n-test"), ({"hop_mix": (0.5, 0.6)}, "--hop-mix")],
)
def test_bad_sizes_name_the_knob(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        QuestionConfig(**kwargs)
