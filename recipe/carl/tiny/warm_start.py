"""The demo's SFT start (`policy_sft/`): the shipped one when it was built from exactly this run's training tokens,
otherwise a tiny word-level policy (or SmolLM2-135M) trained here, with `recipe.carl.tiny.sft`, on the data's
demonstrations laid out as the agent loop lays out a trajectory (`recipe.carl.tiny.trajectory`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from recipe.carl.cpu.platform import empty_host_cache
from recipe.carl.io import atomic_dir, write_json
from recipe.carl.search.actions import render_observation
from recipe.carl.synthhop.pages import PagesConfig, session, vocabulary_texts
from recipe.carl.synthhop.tokenizer import build_tokenizer
from recipe.carl.tiny.policy import build_tiny_policy, load_smollm2, save_policy
from recipe.carl.tiny.sft import Example, SFTConfig, train_sft
from recipe.carl.tiny.trajectory import agent_loop_example, observation_text


def read_corpus(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "corpus.jsonl").read_text().splitlines() if line.strip()]


def pages_config(cfg) -> PagesConfig | None:
    """The pages variant's knobs of a `DemoConfig` under the paper's action space, else None."""
    if getattr(cfg, "action_space", "search_r1") != "paper":
        return None
    return PagesConfig(snippet_words=cfg.snippet_words, chunk_chars=cfg.page_chunk_chars)


def build_tokenizer_for(data_dir: Path, demos: Sequence[dict], pages: PagesConfig | None = None):
    """The word-level tokenizer, trained on everything the policy reads or writes in the RL layout (with `pages`:
    every search result line and every part of every page, as the paper's action space shows them)."""
    corpus = read_corpus(data_dir)
    texts = [observation_text([doc]) for doc in corpus] + [observation_text(corpus[:2]), observation_text([])]
    if pages is not None:
        texts += [render_observation(text) for text in vocabulary_texts(corpus, pages)]
    for demo in demos:
        texts += [m["content"] for m in demo["messages"] if m["role"] != "tool"]
    return build_tokenizer(texts)


def sft_key(cfg, tokenizer, examples: Sequence[Example]) -> dict:
    """What an SFT start depends on: the policy, its seed and SFT settings, the exact vocabulary and the exact
    training tokens (`examples`: prompts, demonstrated actions and re-fetched observations, with their loss masks).

    Hashing the tokens, not the data knobs, catches every change that alters the SFT data: another `n_test` (it
    changes which questions are drawn for training), noise, hop mix, `topk`, the chat layout.

    Args:
        cfg: the demo's `DemoConfig` (any object with its `policy`, `seed`, `n_entities`, `n_train`, `sft_steps`,
            `sft_lr`, `sft_batch_size` and `topk`).
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    data = hashlib.sha256()
    for example in examples:
        data.update(json.dumps([example.input_ids, example.loss_mask]).encode())
    names = ("policy", "seed", "n_entities", "n_train", "sft_steps", "sft_lr", "sft_batch_size", "topk")
    key = {
        **{name: getattr(cfg, name) for name in names},
        "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
        "data_sha256": data.hexdigest(),
    }
    if pages_config(cfg) is not None:  # the default's key (and so the shipped start's) keeps its fields
        key.update(action_space="paper", snippet_words=cfg.snippet_words, page_chunk_chars=cfg.page_chunk_chars)
    return key


MUST_MATCH_ENV = "CARL_SFT_MUST_MATCH"
"""Set to 1 (the test suite does) to refuse, rather than train for half an hour, a default-sized SFT start whose
settings are the shipped one's but whose training data differ."""
DATA_FIELDS = ("vocab_sha256", "data_sha256")
"""Key fields that the settings do not set: they follow the generated data (and its search results)."""


class ShippedStartMismatch(RuntimeError):
    """The shipped SFT start was built from other training data than this run's (names the differing key fields)."""


def key_mismatch(shipped: dict, key: dict) -> dict[str, tuple]:
    """The key fields that differ, as `{field: (shipped value, this run's value)}`."""
    return {f: (shipped.get(f), key.get(f)) for f in sorted(set(shipped) | set(key)) if shipped.get(f) != key.get(f)}


def mismatch_message(differ: dict[str, tuple], manifest: dict, cfg) -> str:
    """Why the shipped start is not reused, and what training one here costs (from the shipped start's own build)."""
    fields = ", ".join(f"{f} (shipped {str(a)[:12]}, here {str(b)[:12]})" for f, (a, b) in differ.items())
    built = manifest.get("result") or {}
    minutes = ""
    if built.get("wall_s") and built.get("steps") and "policy" not in differ:
        est = built["wall_s"] * cfg.sft_steps / built["steps"] / 60
        minutes = f", about {est:.0f} min on a 2-core machine (the shipped start took {built['wall_s'] / 60:.0f} min)"
    why = ""
    if set(differ) <= set(DATA_FIELDS):
        why = (
            " The settings are the shipped start's, so its demonstrations differ: the data generator, tokenizer or "
            "search results changed (retrieval ties are broken by corpus position, the same on every machine, since "
            "issue 28; a change there must rebuild the start with its manifest's command)."
        )
    return (
        f"the shipped SFT start does not fit this run: {fields}.{why} Training a new start: {cfg.sft_steps} steps"
        f"{minutes}. Rebuild the shipped one with: {manifest.get('command')}"
    )


def warm_start(run_dir: Path, data_dir: Path, search, cfg, shipped: Path | None) -> tuple[Path, dict]:
    """The run's SFT start in `run_dir/policy_sft`: the shipped start when its key matches this run's (see
    :func:`sft_key`), otherwise a tiny policy (or SmolLM2) trained here on the data's demonstrations.

    Args:
        run_dir: the run folder (gets `policy_init/` when a start is trained, and `policy_sft/`).
        data_dir: the SynthHop folder (`corpus.jsonl`, `demos.jsonl`).
        search: the run's retriever, `query -> documents` (observations are re-fetched, as in RL).
        cfg: the demo's `DemoConfig`.
        shipped: a folder with `sft_manifest.json` (`{"key", "result", "command"}`), or None to always train.

    Returns:
        The start's folder and `{"steps", "wall_s", "final_loss"}` (plus `"shipped"`: its source, when reused).
    """
    demos = [json.loads(line) for line in (data_dir / "demos.jsonl").read_text().splitlines() if line.strip()]
    pages = pages_config(cfg)
    if cfg.policy == "smollm2":
        tokenizer, model = load_smollm2(run_dir / "policy_init")
    else:
        tokenizer = build_tokenizer_for(data_dir, demos, pages)
    contents = {doc["id"]: doc["contents"] for doc in read_corpus(data_dir)} if pages else {}

    def layout(messages: list[dict]) -> Example:  # the paper's action space: a fresh session per demonstration
        return agent_loop_example(tokenizer, messages, search, session(search, contents, pages) if pages else None)

    examples = [layout(d["messages"]) for d in demos]
    key = sft_key(cfg, tokenizer, examples)
    out = run_dir / "policy_sft"
    manifest = json.loads((shipped / "sft_manifest.json").read_text()) if shipped else None
    if manifest and manifest["key"] == key:
        with atomic_dir(out) as tmp:  # public modes, whatever the checkout's
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        return out, {**manifest["result"], "shipped": str(shipped)}
    if manifest:
        differ = key_mismatch(manifest["key"], key)
        if os.environ.get(MUST_MATCH_ENV) == "1" and set(differ) <= set(DATA_FIELDS):
            raise ShippedStartMismatch(f"{MUST_MATCH_ENV}=1 and {mismatch_message(differ, manifest, cfg)}")
        print(f"note: {mismatch_message(differ, manifest, cfg)}", flush=True)
    torch.manual_seed(cfg.seed)
    if cfg.policy != "smollm2":
        model = build_tiny_policy(tokenizer, seed=cfg.seed)
        save_policy(model, tokenizer, run_dir / "policy_init")
    config = SFTConfig(
        max_steps=cfg.sft_steps,
        time_budget_s=cfg.sft_time_budget_s,
        seed=cfg.seed,
        lr=cfg.sft_lr,
        batch_size=cfg.sft_batch_size,
        warmup_steps=min(50, cfg.sft_steps // 10),
    )
    if cfg.gradient_checkpointing:  # SmolLM2: recompute activations (nothing of it is saved with the policy)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    result = train_sft(model, examples, tokenizer.pad_token_id, config, progress=True)
    save_policy(model, tokenizer, out)
    info = {"steps": result.steps, "wall_s": result.wall_s, "final_loss": result.final_loss}
    command = shlex.join(["python", "-m", "recipe.carl.tiny.demo", *sys.argv[1:]])
    write_json(out / "sft_manifest.json", {"key": key, "result": info, "command": command})
    del model, examples
    release_memory()
    return out, info


def release_memory() -> None:
    """Hands freed heap memory back to the OS: glibc keeps the SFT's activations otherwise (~15 GB for SmolLM2),
    and the demo's process would hold them while the trainer runs beside it."""
    gc.collect()
    empty_host_cache()
