"""Build a tiny random Qwen2 model and a byte-level chat tokenizer offline, for CPU tests and smoke runs.

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (every byte is one token) plus ChatML
special tokens, built with the ``tokenizers`` library; the model is a randomly initialised
``Qwen2ForCausalLM`` from a config. ``save_tiny_model(dir)`` writes both in the Hugging Face layout that verl's
``actor_rollout_ref.model.path`` expects.
"""

from __future__ import annotations

import os

# ChatML, as Qwen2 uses; verl's RLHFDataset renders prompts with apply_chat_template(add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer():
    """Return a ``PreTrainedTokenizerFast``: 256 byte tokens, then the ChatML specials (ids 256-258).

    Returns:
        The tokenizer, with ``eos_token="<|im_end|>"`` and ``pad_token="<|endoftext|>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny_model(
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    embed_std: float = 0.04,
):
    """Return a random ``Qwen2ForCausalLM`` (fp32, eval mode) that fits :func:`build_tokenizer`.

    Args:
        vocab_size: Embedding rows; default ``len(tokenizer)`` (259). More rows
            than tokens make verl's vLLM rollout, which masks logits at or above ``len(tokenizer)``, normalise its
            log-probs over fewer tokens than the FSDP actor (a 0.05 gap with 320 rows); ``carl_hf`` masks the same
            way (``engine.CausalLMEngine``'s ``vocab_size``), so both rollouts agree with the actor only when the
            two sizes are equal.
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention when smaller than ``num_heads``).
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence.
        seed: ``torch.manual_seed`` used for the random weights.
        attn_implementation: ``sdpa`` or ``eager`` (flash-attn is not installed on CPU).
        embed_std: Standard deviation of the (tied) embedding init.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    vocab_size = len(tok) if vocab_size is None else int(vocab_size)
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is too small for the {len(tok)}-token tokenizer; use >= {len(tok)}")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # The default init (std 0.02) gives near-uniform next-token distributions; a slightly larger embedding scale
    # (tied to the LM head) gives ~4 nats of entropy: varied samples, yet greedy decoding is not all ties.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
    return model.eval()


def save_tiny_model(path: str | os.PathLike, **kwargs) -> str:
    """Write a tiny model, its generation config and tokenizer to ``path`` (created if missing).

    Args:
        path: Target directory.
        **kwargs: Forwarded to :func:`build_tiny_model`.

    Returns:
        ``str(path)``.
    """
    from transformers import GenerationConfig

    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    model = build_tiny_model(**kwargs)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
