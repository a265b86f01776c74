"""A fictional knowledge base of persons, companies, cities and countries, rendered as a search corpus.

Every relation has exactly one target, so a chain of relations from a subject names exactly one entity, which is
what makes a multi-hop question well posed. Names are built from syllables and each is ONE whitespace token
(persons are ``First_Last``): the feasibility probe found that a 1M-parameter policy copies one-token names after
~2000 SFT steps but never learned to copy multi-token names in the same budget.

Each entity gets one compact document of shuffled "S verb O ." sentences, written in the Search-R1 / FlashRAG
corpus format ``{"id", "contents": "Title\\ntext"}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

PERSON, COMPANY, CITY, COUNTRY = "person", "company", "city", "country"
ENTITY_TYPES = (PERSON, COMPANY, CITY, COUNTRY)


@dataclass(frozen=True)
class Relation:
    """A single-target relation and how it is written.

    Attributes:
        name: one lowercase word, used both in questions ("the ``name`` of X") and in search queries ("X ``name``").
        subject_type: entity type that has this relation.
        object_type: entity type of its target.
        verb: the words between subject and object in the document sentence "S ``verb`` O .". Unique across
            relations so a reader can find the fact by pattern.
    """

    name: str
    subject_type: str
    object_type: str
    verb: str


# The "compact" schema of the probe: 4 relations for persons, 3 for the other types.
RELATIONS: tuple[Relation, ...] = (
    Relation("mentor", PERSON, PERSON, "was mentored by"),
    Relation("spouse", PERSON, PERSON, "is married to"),
    Relation("birthplace", PERSON, CITY, "was born in"),
    Relation("employer", PERSON, COMPANY, "works for"),
    Relation("founder", COMPANY, PERSON, "was founded by"),
    Relation("headquarters", COMPANY, CITY, "is headquartered in"),
    Relation("ceo", COMPANY, PERSON, "is run by"),
    Relation("country", CITY, COUNTRY, "is located in"),
    Relation("mayor", CITY, PERSON, "is governed by"),
    Relation("twin", CITY, CITY, "is twinned with"),
    Relation("capital", COUNTRY, CITY, "has its capital in"),
    Relation("leader", COUNTRY, PERSON, "is led by"),
    Relation("neighbor", COUNTRY, COUNTRY, "borders"),
)
RELATION_BY_NAME: dict[str, Relation] = {r.name: r for r in RELATIONS}

# 36 syllables chosen to give names that read as made up, not as English words.
SYLLABLES: tuple[str, ...] = (
    "dal", "vex", "nuy", "oax", "kov", "bri", "tal", "mon", "zen", "rax", "lio", "pem",
    "sar", "dru", "vol", "kem", "nys", "uld", "gor", "fen", "hal", "qui", "tor", "yel",
    "bas", "wen", "mur", "xan", "cel", "dor", "lum", "ris", "thi", "vin", "ost", "kal",
)  # fmt: skip

# Words of the templates; a name equal to one of them would be confused with it by BM25 (which lowercases).
_TEMPLATE_WORDS = frozenset(w for r in RELATIONS for w in (r.name, *r.verb.split())) | {"what", "the", "of"}
_STEMMER = Stemmer.Stemmer("english")
# Smallest count per type: mentor, spouse, twin and neighbor need a second entity of the same type.
_MIN_PER_TYPE = 2


@dataclass(frozen=True)
class KBConfig:
    """Size knobs of the knowledge base."""

    n_entities: int = 300
    """Number of entities of all types together."""
    relations_per_entity: tuple[int, int] = (3, 4)
    """Inclusive (min, max) number of relations per entity, capped by the relations its type has."""
    type_mix: tuple[float, float, float, float] = (0.5, 0.2, 0.2, 0.1)
    """Fractions of persons, companies, cities and countries."""
    seed: int = 0
    """Seed of names, facts and sentence order."""

    def __post_init__(self):
        if not isinstance(self.n_entities, int) or self.n_entities < 0:
            raise ValueError(f"n_entities (--n-entities) must be a non-negative int, got {self.n_entities!r}.")
        lo, hi = self.relations_per_entity
        if not 1 <= lo <= hi:
            raise ValueError(
                f"relations_per_entity (--relations-per-entity) must satisfy 1 <= min <= max, got ({lo}, {hi})."
            )
        if len(self.type_mix) != len(ENTITY_TYPES) or min(self.type_mix) < 0 or abs(sum(self.type_mix) - 1) > 1e-6:
            raise ValueError(f"type_mix must be 4 non-negative fractions summing to 1, got {self.type_mix}.")
        counts = split_counts(self.n_entities, self.type_mix)
        if min(counts) < _MIN_PER_TYPE:
            need = min(n for n in range(self.n_entities, 100_000) if min(split_counts(n, self.type_mix)) >= 2)
            per_type = dict(zip(ENTITY_TYPES, counts, strict=True))
            raise ValueError(
                f"n_entities (--n-entities) = {self.n_entities} gives type counts {per_type}, "
                f"but every type needs at least {_MIN_PER_TYPE}. Raise --n-entities to at least {need}."
            )


@dataclass
class Entity:
    """One entity and its outgoing facts (relation name -> target name)."""

    name: str
    type: str
    facts: dict[str, str] = field(default_factory=dict)
    sentence_order: tuple[str, ...] = ()
    """Relation names in the (seeded, shuffled) order their sentences appear in the document."""


@dataclass
class KnowledgeBase:
    """Entities in generation order; ``index`` maps a name to its entity."""

    entities: list[Entity]
    config: KBConfig
    index: dict[str, Entity] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {e.name: e for e in self.entities}

    def fact(self, subject: str, relation: str) -> str | None:
        """The target of ``relation`` for ``subject``, or None when the entity has no such fact."""
        return self.index[subject].facts.get(relation)

    def names(self, entity_type: str | None = None) -> list[str]:
        """Entity names, optionally of one type, in generation order."""
        return [e.name for e in self.entities if entity_type is None or e.type == entity_type]

    def document_text(self, name: str) -> str:
        """The document body of ``name``: its facts as "S verb O ." sentences in the entity's shuffled order."""
        e = self.index[name]
        return " ".join(f"{e.name} {RELATION_BY_NAME[r].verb} {e.facts[r]} ." for r in e.sentence_order)

    def corpus(self) -> list[dict[str, str]]:
        """One document per entity in the Search-R1 / FlashRAG corpus format.

        Returns:
            ``[{"id": str(i), "contents": "Title\\ntext"}, ...]`` in entity order.
        """
        return [
            {"id": str(i), "contents": f"{e.name}\n{self.document_text(e.name)}"} for i, e in enumerate(self.entities)
        ]


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``fractions`` (largest remainder, ties to the earlier part)."""
    raw = [n * f for f in fractions]
    counts = [int(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _is_search_safe(name: str) -> bool:
    # A name must be a fixed point of the English stemmer and not a stopword or template word, so that BM25 (with
    # or without stemming) indexes it as its own unique term: "Dalris" would stem to "dalri" and could collide.
    low = name.lower()
    return low not in STOPWORDS_EN and low not in _TEMPLATE_WORDS and _STEMMER.stemWord(low) == low


def _make_names(rng: random.Random, entity_type: str, n: int, taken: set[str]) -> list[str]:
    def word(k: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()

    names: list[str] = []
    for _ in range(1000 * max(n, 1)):
        if len(names) == n:
            return names
        if entity_type == PERSON:
            name = f"{word(rng.randint(1, 2))}_{word(2)}"
        else:
            name = word(rng.randint(2, 3))
        if name not in taken and _is_search_safe(name):
            taken.add(name)
            names.append(name)
    raise RuntimeError(f"could not draw {n} unique {entity_type} names; lower --n-entities")


def make_kb(config: KBConfig = KBConfig()) -> KnowledgeBase:
    """Generate a knowledge base.

    Args:
        config: size knobs and seed.

    Returns:
        The knowledge base; the same config always gives the same KB.
    """
    rng = random.Random(f"synthhop-kb-{config.seed}")
    # Step 1: names, type by type.
    counts = dict(zip(ENTITY_TYPES, split_counts(config.n_entities, config.type_mix), strict=True))
    taken: set[str] = set()
    entities = [Entity(name, t) for t in ENTITY_TYPES for name in _make_names(rng, t, counts[t], taken)]
    by_type = {t: [e.name for e in entities if e.type == t] for t in ENTITY_TYPES}

    # Step 2: facts. Each entity draws k of its type's relations and one target per relation (never itself).
    lo, hi = config.relations_per_entity
    for e in entities:
        own = [r for r in RELATIONS if r.subject_type == e.type]
        chosen = rng.sample(own, min(rng.randint(lo, hi), len(own)))
        for r in sorted(chosen, key=own.index):
            e.facts[r.name] = rng.choice([n for n in by_type[r.object_type] if n != e.name])
        # Step 3: sentence order, shuffled so that position in the document says nothing about the relation.
        order = list(e.facts)
        rng.shuffle(order)
        e.sentence_order = tuple(order)
    return KnowledgeBase(entities, config)
