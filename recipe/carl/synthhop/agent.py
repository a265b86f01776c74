"""A scripted reference agent: the correct search strategy with tunable noise, for demonstrations and baselines.

At hop h the agent knows the current entity (the subject, then what it read), and:

1. from the second hop on, with probability p/3 answers early with the current (wrong) entity; the episode fails;
2. otherwise, with probability p makes one wrong search: half the time a wrong relation of the right entity, half
   the time a random other entity with the right relation;
3. searches "ENTITY relation" and reads the next entity from the observation.

After the last hop it answers. It reads facts from the observation text, not from the KB, so its success at p=0
also checks that retrieval returns the needed document. Detours count against the turn budget, so at p=0.3 about
87% of episodes succeed (probe: 87.4%).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from .env import SYSTEM_PROMPT, SynthHopEnv, format_answer, format_search
from .kb import RELATION_BY_NAME, RELATIONS, KnowledgeBase
from .questions import Question


@dataclass(frozen=True)
class Turn:
    """One action and what came back (``observation`` is "" after an answer or an invalid action)."""

    action: str
    observation: str


@dataclass(frozen=True)
class Demo:
    """One episode of the reference agent.

    Attributes:
        question: the question text.
        answer: the gold answer.
        hops: hops of the question.
        turns: the episode, in order.
        success: whether it ended with the gold answer.
        wrong_searches: detour searches made.
        early_answer: whether it answered before the last hop.
    """

    question: str
    answer: str
    hops: int
    turns: tuple[Turn, ...]
    success: bool
    wrong_searches: int
    early_answer: bool

    def to_messages(self, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
        """Chat messages for SFT: system, user question, then per turn an assistant action and a tool observation."""
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": self.question}]
        for turn in self.turns:
            messages.append({"role": "assistant", "content": turn.action})
            if turn.observation:
                messages.append({"role": "tool", "content": turn.observation})
        return messages

    def to_dict(self, system_prompt: str = SYSTEM_PROMPT) -> dict:
        """JSON-ready dict; the turns are given as chat ``"messages"`` (see :meth:`from_dict`)."""
        row = {k: v for k, v in asdict(self).items() if k != "turns"}
        return {**row, "messages": self.to_messages(system_prompt)}

    @classmethod
    def from_dict(cls, row: dict) -> Demo:
        """Inverse of :meth:`to_dict` (extra keys such as ``"index"`` or ``"text"`` are ignored)."""
        turns: list[Turn] = []
        for m in row["messages"][2:]:
            if m["role"] == "assistant":
                turns.append(Turn(m["content"], ""))
            else:  # a tool observation belongs to the action before it
                turns[-1] = Turn(turns[-1].action, m["content"])
        fields = ("question", "answer", "hops", "success", "wrong_searches", "early_answer")
        return cls(turns=tuple(turns), **{k: row[k] for k in fields})


def read_fact(observation: str, subject: str, relation: str) -> str | None:
    """Find "subject verb O ." in an observation and return O, or None when the fact is not there."""
    verb = RELATION_BY_NAME[relation].verb
    m = re.search(rf"(?:^|\s){re.escape(subject)} {re.escape(verb)} (\S+) \.", observation)
    return m.group(1) if m else None


class ReferenceAgent:
    """The scripted agent.

    Args:
        kb: the knowledge base (only its entity and relation names are used, to draw detours).
        env: the environment to act in.
        noise: p, the detour probability (see the module docstring); 0 gives the oracle.
        seed: seed of the noise.
    """

    def __init__(self, kb: KnowledgeBase, env: SynthHopEnv, noise: float = 0.0, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise (--noise) must be in [0, 1], got {noise}.")
        self.env = env
        self.noise = noise
        self.rng = random.Random(f"synthhop-agent-{seed}")
        self._names = kb.names()
        self._relations = [r.name for r in RELATIONS]

    def _wrong_query(self, entity: str, relation: str) -> str:
        if self.rng.random() < 0.5:
            return f"{entity} {self.rng.choice([r for r in self._relations if r != relation])}"
        return f"{self.rng.choice([n for n in self._names if n != entity])} {relation}"

    def run(self, question: Question) -> Demo:
        """Play one episode of ``question``."""
        env, p, rng = self.env, self.noise, self.rng
        env.reset(question.answer)
        turns: list[Turn] = []
        wrong, early = 0, False

        def act(action: str) -> str:
            result = env.step(action)
            turns.append(Turn(action, result.observation))
            return result.observation

        current = question.subject
        for hop, relation in enumerate(question.relations):
            if hop >= 1 and rng.random() < p / 3:
                early = True
                break
            if rng.random() < p:
                wrong += 1
                act(format_search(self._wrong_query(current, relation)))
                if env.done:
                    break
            observation = act(format_search(f"{current} {relation}"))
            if env.done:
                break
            found = read_fact(observation, current, relation)
            if found is None:  # retrieval missed the fact: answer what we have, which fails
                break
            current = found
        if not env.done:
            result = env.step(format_answer(current))
            turns.append(Turn(format_answer(current), ""))
            success = result.success
        else:
            success = False
        return Demo(question.text, question.answer, question.hops, tuple(turns), success, wrong, early)


def make_demos(
    agent: ReferenceAgent, questions: list[Question], n: int | None = None, progress: bool = False
) -> list[Demo]:
    """Run the agent on ``n`` questions, cycling through ``questions`` (noise differs on each pass).

    Args:
        agent: the reference agent.
        questions: questions to play, usually the training split.
        n: number of demonstrations; defaults to ``len(questions)``.
        progress: show a tqdm bar.

    Returns:
        The demonstrations, successful or not.
    """
    n = len(questions) if n is None else n
    if n > 0 and not questions:
        raise ValueError("make_demos needs at least one question; raise --n-train or set --n-demos 0.")
    return [agent.run(questions[i % len(questions)]) for i in tqdm(range(n), disable=not progress, desc="demos")]


def success_rate(demos: Iterable[Demo]) -> dict[str, float]:
    """Success overall and by hop count, e.g. ``{"all": 0.87, "hops=1": 1.0, ...}`` (empty groups left out)."""
    demos = list(demos)
    groups: dict[str, list[bool]] = {"all": [d.success for d in demos]}
    for d in demos:
        groups.setdefault(f"hops={d.hops}", []).append(d.success)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items()) if v}
