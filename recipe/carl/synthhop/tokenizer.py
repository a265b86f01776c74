"""A word-level Hugging Face tokenizer for SynthHop, with a minimal chat template that verl's agent loop can use.

Every SynthHop text is whitespace-separated words (names are one word, punctuation and tags are spaced), so a
WordLevel model with a WhitespaceSplit pre-tokenizer gives one token per word and about 360 tokens for 300 entities.
One token per name is the design choice that let a 1M-parameter policy learn to copy names in the probe.

Chat template (role markers are special tokens; the model ends each action with the eos ``<|end|>``)::

    <|system|> Answer the question ...
    <|user|> What is the capital of Vexdal ?
    <|assistant|> <search> Vexdal capital </search> <|end|>
    <|tool|> <information> [ Vexdal ] ... </information>
    <|assistant|>                                            <- add_generation_prompt=True

Rendering messages one by one only appends tokens (newlines are not tokens), so verl's continuous-token builder,
which tokenizes each new turn as a suffix diff of two renders, reproduces the full render exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS = "<pad>", "<unk>", "<|end|>"
ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
CONTROL_TOKENS = (PAD, UNK, EOS, *ROLE_TOKENS)
"""Special tokens: dropped by ``decode(skip_special_tokens=True)``."""
TAG_TOKENS = ("<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "[", "]")
"""Action and observation tags: split out even without spaces, but kept by ``skip_special_tokens`` (a response
decoded for parsing must keep its ``<search>`` tags, as Qwen keeps ``<tool_call>``)."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('SynthHop chat template: unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|> ' + (message['content'] or '') }}"
    "{%- if message['role'] == 'assistant' %}{{ ' <|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif -%}"
)


def _space_tags(text: str) -> str:
    for tag in TAG_TOKENS:
        text = text.replace(tag, f" {tag} ")
    return text


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is every word of ``texts``.

    Args:
        texts: every text the model will read or write (documents, questions, actions, the system prompt); a word
            not seen here becomes ``<unk>``.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/unk/eos, the role and tag tokens and the chat template; save it
        with ``save_pretrained`` and load it with ``AutoTokenizer.from_pretrained``.
    """
    control = set(CONTROL_TOKENS)
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # Words split at whitespace, and the punctuation of the search tool's rendering ("Doc 1 (Title: T) text") is cut
    # off the words it sticks to, so a name reads the same in a question, an action and an observation.
    # `_` is not cut: it joins the parts of a person's name into one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[()\[\]:;,.?!]"), behavior="isolated")]
    )
    # Control tokens are removed from the training text: WordLevelTrainer leaves gaps in the ids when a special
    # token also occurs as a word (probe pitfall 6). The tags go in once so they are in the vocabulary even if
    # ``texts`` lacks one, and become non-special added tokens afterwards.
    # Tags are cut out of the words they touch first ("<information>Doc"), as the added tokens are when encoding.
    spaced = (_space_tags(t) for t in (" ".join(TAG_TOKENS), *texts))
    corpus = (" ".join(w for w in t.split() if w not in control) for t in spaced)
    tok.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=list(CONTROL_TOKENS)))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    ids = sorted(tok.get_vocab(with_added_tokens=True).values())
    if ids != list(range(len(ids))):  # the model sizes its embedding from this; see embedding_size
        raise RuntimeError(f"tokenizer ids are not contiguous (max id {ids[-1]}, {len(ids)} tokens)")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # HF's cleanup would glue " ." and " ?" to the previous word on decode, which breaks word round-trips.
        clean_up_tokenization_spaces=False,
    )


def embedding_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Rows the model's embedding needs: max id + 1 (not ``len(tokenizer)``, which undercounts if ids have gaps)."""
    return max(tokenizer.get_vocab().values()) + 1
