"""Word-level tokenizer: no unknown words on SynthHop text, contiguous ids, a chat template that works."""

import pytest
from transformers import AutoTokenizer

from recipe.carl.synthhop.tokenizer import CONTROL_TOKENS, TAG_TOKENS, build_tokenizer, embedding_size


def _texts(data):
    yield from (d["contents"] for d in data.kb.corpus())
    yield from (q.text for q in data.train + data.test)
    yield from (t.action for d in data.demos for t in d.turns)
    yield from (t.observation for d in data.demos for t in d.turns if t.observation)


def test_round_trip_without_unk(small_data):
    tok = small_data.tokenizer
    for text in _texts(small_data):
        text = " ".join(text.split())  # the title line break is whitespace
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert len(ids) == len(text.split())  # one token per word: names are single tokens
        assert tok.decode(ids) == text


def test_ids_are_contiguous_and_size_the_embedding(small_data):
    tok = small_data.tokenizer
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))
    assert embedding_size(tok) == len(tok)
    assert all(t in tok.get_vocab() for t in (*CONTROL_TOKENS, *TAG_TOKENS))


def test_tags_survive_skip_special_tokens_and_split_without_spaces(small_data):
    tok = small_data.tokenizer
    name = small_data.kb.names()[0]
    ids = tok.encode(f"<search>{name} spouse</search><|end|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<search>", name, "spouse", "</search>", "<|end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == f"<search> {name} spouse </search>"


def test_chat_template_with_generation_prompt(small_data, tmp_path):
    tok = small_data.tokenizer
    messages = small_data.demos[0].to_messages()
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|system|> ") and prompt.endswith("<|assistant|> ")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>") and tok.unk_token_id not in ids
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.count("<|end|>") == sum(m["role"] == "assistant" for m in messages)
    # save_pretrained / from_pretrained keeps vocabulary, specials and template.
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(messages, tokenize=False) == full
    assert loaded(full)["input_ids"] == tok(full)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<|end|>", "<pad>", "<unk>")


def test_unknown_role_is_refused(small_data):
    with pytest.raises(Exception, match="unknown role"):
        small_data.tokenizer.apply_chat_template([{"role": "critic", "content": "x"}], tokenize=False)


def test_unseen_words_are_unk():
    tok = build_tokenizer(["a b c"])
    assert tok.encode("a zzz", add_special_tokens=False) == [tok.convert_tokens_to_ids("a"), tok.unk_token_id]
