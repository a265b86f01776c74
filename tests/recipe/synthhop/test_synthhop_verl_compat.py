"""verl 0.9.1 accepts SynthHop outputs: its continuous-token builder and RLHFDataset (skipped without verl)."""

import pytest

pytest.importorskip("verl")

from omegaconf import OmegaConf
from verl.utils.tokenizer.chat_template import initialize_system_prompt, initialize_turn_separator
from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder


def test_incremental_rollout_tokens_equal_the_full_render(small_data):
    # The agent loop renders the prompt once, appends generated tokens, then renders each tool turn as a suffix
    # diff; with this template the result must equal tokenizing the whole conversation at once.
    tok = small_data.tokenizer
    builder = ContinuousTokenBuilder(tok)
    messages = next(d for d in small_data.demos if len(d.turns) >= 3).to_messages()
    ids = builder.build_initial_tokens(messages[:2])
    for i in range(2, len(messages)):
        if messages[i]["role"] == "assistant":
            generated = tok.encode(messages[i]["content"] + " <|end|>", add_special_tokens=False)
            ids = builder.merge_assistant_tokens(ids, generated).token_ids
        else:
            ids = builder.merge_context_tokens(messages[:i], messages[: i + 1], ids).token_ids
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert initialize_system_prompt(tok) == []
    assert initialize_turn_separator(tok) == []


def test_rlhf_dataset_reads_the_parquet(small_data, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from recipe.carl.synthhop.make_data import write

    write(small_data, tmp_path)
    config = OmegaConf.create({"max_prompt_length": 64, "filter_overlong_prompts": True, "cache_dir": str(tmp_path)})
    dataset = RLHFDataset(str(tmp_path / "test.parquet"), small_data.tokenizer, config)
    assert len(dataset) == len(small_data.test)  # no prompt filtered as overlong: prompts are ~40 tokens
    item = dataset[0]
    assert [m["role"] for m in item["raw_prompt"]] == ["system", "user"]
    assert item["agent_name"] == "carl_chain_agent"  # test rows: one trajectory per question
    assert item["tools_kwargs"]["search"]["create_kwargs"]["question"] == item["raw_prompt"][1]["content"]
