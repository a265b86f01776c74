"""Write a SynthHop data set: corpus, verl parquet splits, demonstrations, tokenizer and a manifest.

Usage::

    python -m recipe.carl.synthhop.make_data --out data/synthhop --seed 0 --n-entities 300 --n-train 3000 --n-test 200
    python -m recipe.carl.synthhop.make_data --out data/synthhop_pages --pages   # the paper's action space

``--pages`` writes the pages variant (`recipe.carl.synthhop.pages`): one page per entity, longer than a search
snippet, whose facts are read with ``<access>`` and ``<read>``; the demonstrations use both.

Output folder:

- ``corpus.jsonl``: ``{"id", "contents": "Title\\ntext"}`` per entity, the retriever server's corpus format.
- ``train.parquet`` / ``test.parquet``: verl ``RLHFDataset`` rows (see :func:`make_row`).
- ``demos.jsonl``: reference-agent episodes on training questions (turns, chat messages, rendered chat text).
- ``tokenizer/``: word-level ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained`` loads it).
- ``manifest.json``: the exact command, seed, knobs, counts and measured reference-agent success.

Every file is written to a temporary name and moved into place (``recipe.carl.io``), so an interrupted run leaves no
half file, and files get the usual public modes (0644 under the usual umask).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from transformers import PreTrainedTokenizerFast

from recipe.carl.io import atomic_dir, atomic_path, write_jsonl, write_text

from .agent import Demo, ReferenceAgent, make_demos, success_rate
from .env import SYSTEM_PROMPT, LocalSearch, SynthHopEnv
from .kb import RELATION_BY_NAME, RELATIONS, KBConfig, KnowledgeBase, make_kb
from .pages import PAGES_SYSTEM_PROMPT, PagesConfig, PagesReferenceAgent, page_corpus, vocabulary_texts
from .questions import Question, QuestionConfig, make_questions
from .tokenizer import build_tokenizer, embedding_size

DATA_SOURCE = "synthhop"
#: Training rows follow `algorithm.adv_estimator` (a CARL tree, or one trajectory under GRPO); test rows are validated
#: with one trajectory per question.
AGENT_NAMES = {"train": "carl_agent", "test": "carl_chain_agent"}
#: Actions per episode of the pages variant: a hop is a search, an access and up to two reads.
PAGES_MAX_TURNS = 14
# Below this many demonstrations a progress bar is noise.
_PROGRESS_MIN = 1000


@dataclass(frozen=True)
class SynthHopConfig:
    """All knobs of a SynthHop data set (the defaults are the probe's recommended configuration)."""

    seed: int = 0
    """Seed of the KB, the question draw and the agent noise."""
    n_entities: int = 300
    """Entities in the KB (50% persons, 20% companies, 20% cities, 10% countries)."""
    relations_per_entity: tuple[int, int] = (3, 4)
    """Inclusive (min, max) relations per entity."""
    n_train: int = 3000
    """Training questions."""
    n_test: int = 200
    """Held-out questions."""
    hop_mix: tuple[float, ...] = (0.2, 0.4, 0.4)
    """Fractions of 1-, 2-, 3-hop questions."""
    n_demos: int | None = None
    """Reference-agent demonstrations on training questions; None means one per training question."""
    noise: float = 0.3
    """Detour probability p of the reference agent (p=0.3 gives about 87% successful demonstrations)."""
    top_k: int = 2
    """Documents per search observation."""
    doc_words: int = 48
    """Words kept per document in an observation; must cover the longest document."""
    max_turns: int = 6
    """Actions per episode."""
    pages: PagesConfig | None = None
    """The pages variant (the paper's action space: search, access, read, answer); None: the default data."""

    def __post_init__(self):
        for knob in ("n_demos", "top_k", "doc_words", "max_turns"):
            value = getattr(self, knob)
            low = 0 if knob == "n_demos" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{knob} (--{knob.replace('_', '-')}) must be an int >= {low}, got {value!r}.")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise (--noise) must be in [0, 1], got {self.noise}.")
        # Validate the sub-configs now, before anything is built or written.
        self.kb_config()
        self.question_config()

    def kb_config(self) -> KBConfig:
        """The knowledge-base part of the knobs."""
        return KBConfig(
            n_entities=self.n_entities, relations_per_entity=tuple(self.relations_per_entity), seed=self.seed
        )

    def question_config(self) -> QuestionConfig:
        """The question part of the knobs."""
        return QuestionConfig(n_train=self.n_train, n_test=self.n_test, hop_mix=tuple(self.hop_mix), seed=self.seed)


@dataclass
class SynthHopData:
    """A generated data set, in memory."""

    config: SynthHopConfig
    kb: KnowledgeBase
    search: LocalSearch
    train: list[Question]
    test: list[Question]
    demos: list[Demo]
    tokenizer: PreTrainedTokenizerFast


def build(config: SynthHopConfig = SynthHopConfig(), progress: bool = False) -> SynthHopData:
    """Generate everything in memory; the same config always gives the same data.

    Args:
        config: knobs and seed.
        progress: show a tqdm bar while making demonstrations.

    Returns:
        The data set.

    Raises:
        ValueError: a knob is out of range or the KB is too small for the requested questions; the message names
            the knob and how to fix it.
    """
    kb = make_kb(config.kb_config())
    corpus = kb.corpus() if config.pages is None else page_corpus(kb)
    longest = max(len(kb.document_text(n).split()) for n in kb.names())
    if config.doc_words < longest:
        raise ValueError(
            f"doc_words (--doc-words) = {config.doc_words} would cut documents of up to {longest} words and drop "
            f"facts that questions ask for. Set --doc-words to at least {longest}."
        )
    if config.pages is not None:
        sentence = max(
            len(f"{e.name} {RELATION_BY_NAME[r].verb} {t} .") for e in kb.entities for r, t in e.facts.items()
        )
        if config.pages.chunk_chars < sentence:
            raise ValueError(
                f"page_chunk_chars (--page-chunk-chars) = {config.pages.chunk_chars} would cut fact sentences of up "
                f"to {sentence} characters across two parts of a page. Set --page-chunk-chars to at least {sentence}."
            )
    train, test = make_questions(kb, config.question_config())
    search = LocalSearch(corpus, top_k=config.top_k, doc_words=config.doc_words)
    if config.pages is None:
        agent = ReferenceAgent(kb, SynthHopEnv(search, config.max_turns), noise=config.noise, seed=config.seed)
    else:
        agent = PagesReferenceAgent(kb, search, config.pages, config.noise, config.seed, config.max_turns)
    demos = make_demos(agent, train, config.n_demos, progress=progress)
    # The vocabulary covers everything the policy reads or may write, test questions and unused relations included.
    texts = [d["contents"] for d in corpus] + [q.text for q in train + test] + [SYSTEM_PROMPT]
    texts += [r.name for r in RELATIONS] + [t.action for d in demos for t in d.turns]
    if config.pages is not None:
        texts += [PAGES_SYSTEM_PROMPT, *vocabulary_texts(corpus, config.pages)]
    return SynthHopData(config, kb, search, train, test, demos, build_tokenizer(texts))


def make_row(question: Question, split: str, index: int, system_prompt: str = SYSTEM_PROMPT) -> dict:
    """One verl ``RLHFDataset`` row for ``question``.

    Args:
        question: the question.
        split: "train" or "test".
        index: position in its split.
        system_prompt: the prompt's system message (the pages variant's names its two page actions).

    Returns:
        A dict with ``data_source``, ``prompt`` (system + user chat messages), ``ability``, ``reward_model``,
        ``extra_info`` (with the oracle path and the search tool's ``create_kwargs``) and ``agent_name``.
    """
    ground_truth = {"target": [question.answer]}
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": question.text}],
        "ability": "search",
        "reward_model": {"ground_truth": ground_truth, "style": "rule"},
        "extra_info": {
            "index": index,
            "split": split,
            "question": question.text,
            "hops": question.hops,
            "oracle_queries": question.oracle_queries,
            "oracle_path": list(question.path),
            "need_tools_kwargs": True,
            "tools_kwargs": {
                "search": {
                    "create_kwargs": {
                        "question": question.text,
                        "ground_truth": ground_truth,
                        "data_source": DATA_SOURCE,
                    }
                }
            },
        },
        "agent_name": AGENT_NAMES.get(split, AGENT_NAMES["test"]),
    }


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; create it otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file; choose a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {path} is not empty. Pass --overwrite to replace its SynthHop files, or choose another --out."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(data: SynthHopData, out: str | os.PathLike, overwrite: bool = False, command: str | None = None) -> dict:
    """Write a generated data set to ``out``.

    Args:
        data: from :func:`build`.
        out: output folder; must be empty or absent unless ``overwrite``.
        overwrite: replace the SynthHop files of a non-empty folder (other files are left alone).
        command: the command line to record in the manifest.

    Returns:
        The manifest, also written as ``manifest.json``.
    """
    out = check_out_dir(out, overwrite)
    pages = data.config.pages
    corpus = data.kb.corpus() if pages is None else page_corpus(data.kb)
    write_jsonl(out / "corpus.jsonl", corpus)
    system = SYSTEM_PROMPT if pages is None else PAGES_SYSTEM_PROMPT
    for split, questions in (("train", data.train), ("test", data.test)):
        frame = pd.DataFrame([make_row(q, split, i, system) for i, q in enumerate(questions)])
        with atomic_path(out / f"{split}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    tok = data.tokenizer
    # The turns are in "messages" already; "text" is the same episode rendered by the chat template, for SFT.
    demo_rows = [
        {"index": i, **d.to_dict(system), "text": tok.apply_chat_template(d.to_messages(system), tokenize=False)}
        for i, d in enumerate(data.demos)
    ]
    write_jsonl(out / "demos.jsonl", demo_rows)
    with atomic_dir(out / "tokenizer") as tmp:
        tok.save_pretrained(tmp)

    doc_words = [len(d["contents"].split()) - 1 for d in corpus]  # minus the title line
    knobs = asdict(data.config)
    if pages is None:
        del knobs["pages"]  # the default data's manifest as before the pages variant existed
    manifest = {
        "command": command,
        "seed": data.config.seed,
        "config": knobs,
        "counts": {
            "entities": dict(Counter(e.type for e in data.kb.entities)),
            "facts": sum(len(e.facts) for e in data.kb.entities),
            "train": dict(sorted(Counter(f"hops={q.hops}" for q in data.train).items())),
            "test": dict(sorted(Counter(f"hops={q.hops}" for q in data.test).items())),
            "demos": len(data.demos),
        },
        "corpus": {
            "docs": len(corpus),
            "doc_words_mean": sum(doc_words) / len(doc_words),
            "doc_words_max": max(doc_words),
        },
        "demo_success": success_rate(data.demos) if data.demos else {},
        "tokenizer": {"vocab_size": len(tok), "embedding_size": embedding_size(tok), "eos_token": tok.eos_token},
        "files": sorted(
            ["corpus.jsonl", "train.parquet", "test.parquet", "demos.jsonl", "tokenizer/", "manifest.json"]
        ),
    }
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse the command line (defaults come from :class:`SynthHopConfig`)."""
    d = SynthHopConfig()
    p = argparse.ArgumentParser(prog="python -m recipe.carl.synthhop.make_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of everything")
    p.add_argument("--n-entities", type=int, default=d.n_entities, help="entities in the KB")
    p.add_argument("--relations-per-entity", type=int, nargs=2, default=d.relations_per_entity, metavar=("MIN", "MAX"))
    p.add_argument("--n-train", type=int, default=d.n_train, help="training questions")
    p.add_argument("--n-test", type=int, default=d.n_test, help="held-out questions")
    p.add_argument("--hop-mix", type=float, nargs="+", default=d.hop_mix, help="fractions of 1-, 2-, 3-hop questions")
    p.add_argument("--n-demos", type=int, default=d.n_demos, help="demonstrations (default: one per train question)")
    p.add_argument("--noise", type=float, default=d.noise, help="reference-agent detour probability p")
    p.add_argument("--top-k", type=int, default=d.top_k, help="documents per observation")
    p.add_argument("--doc-words", type=int, default=d.doc_words, help="words kept per document in an observation")
    p.add_argument(
        "--max-turns", type=int, default=None, help=f"actions per episode (default {d.max_turns}; 14 with --pages)"
    )
    p.add_argument("--pages", action="store_true", help="the pages variant: search, access, read, answer")
    p.add_argument("--snippet-words", type=int, default=PagesConfig().snippet_words, help="--pages: words per result")
    p.add_argument(
        "--page-chunk-chars", type=int, default=PagesConfig().chunk_chars, help="--pages: characters per part"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the SynthHop files of a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv), p


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the manifest."""
    argv = sys.argv[1:] if argv is None else argv
    args, parser = parse_args(argv)
    start = time.perf_counter()
    try:
        default_turns = PAGES_MAX_TURNS if args.pages else SynthHopConfig.max_turns
        config = SynthHopConfig(
            seed=args.seed,
            n_entities=args.n_entities,
            relations_per_entity=tuple(args.relations_per_entity),
            n_train=args.n_train,
            n_test=args.n_test,
            hop_mix=tuple(args.hop_mix),
            n_demos=args.n_demos,
            noise=args.noise,
            top_k=args.top_k,
            doc_words=args.doc_words,
            max_turns=args.max_turns if args.max_turns is not None else default_turns,
            pages=PagesConfig(args.snippet_words, args.page_chunk_chars) if args.pages else None,
        )
        check_out_dir(args.out, args.overwrite)  # fail before the work, not after
        n_demos = config.n_train if config.n_demos is None else config.n_demos
        data = build(config, progress=not args.quiet and n_demos >= _PROGRESS_MIN)
        command = shlex.join(["python", "-m", "recipe.carl.synthhop.make_data", *argv])
        manifest = write(data, args.out, overwrite=args.overwrite, command=command)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    if not args.quiet:
        print(
            f"wrote {args.out} in {time.perf_counter() - start:.1f}s: {manifest['counts']}, "
            f"demo success {manifest['demo_success']}, vocab {manifest['tokenizer']['vocab_size']}",
            file=sys.stderr,
        )
    return manifest


if __name__ == "__main__":
    main()
