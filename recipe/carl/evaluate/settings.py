"""How each question is rolled out (`EvalSettings`), which of it a training run fixes (`RECORDED_FLAGS`, read back
from the run's record by `with_recorded`), and the error every bad input of the evaluation raises."""

from __future__ import annotations

import dataclasses
from typing import Any

from carl_core import CARLConfig
from recipe.carl.search.action_space import ACTION_SPACES


class EvalError(RuntimeError):
    """A bad input: the message names it and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How each question is rolled out (defaults: a real model, as `scripts/run_carl_qwen7b.sh` trains it)."""

    max_actions: int = CARLConfig().max_actions
    """T_max: agent turns per trajectory (`algorithm.carl.max_actions`)."""
    max_action_tokens: int = 512
    """Token budget of one turn (`algorithm.carl.max_action_tokens`)."""
    prompt_length: int = 2048
    """Prompts longer than this end at the root as `prompt_too_long` (`data.max_prompt_length`)."""
    response_length: int = 12288
    """Budget of a whole trajectory after the prompt, observations included (`data.max_response_length`)."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = -1
    samples: int = 1
    """Trajectories per question."""
    seed: int = 0
    """With temperature > 0, every request gets its own seed derived from this one (reproducible samples)."""
    invalid_action: str = "end"
    """`algorithm.carl.invalid_action`: a malformed turn ends the trajectory (end) or gets feedback and goes on."""
    thinking: bool = False
    """`algorithm.carl.thinking` (Qwen3-style models)."""
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`data.apply_chat_template_kwargs`, e.g. {"enable_thinking": false}."""
    concurrency: int = 256
    """Trajectories in flight at once (the engine batches them)."""
    topk: int = 3
    """Documents per search (the search tool's `topk` in the training run's tool yaml)."""
    action_space: str = "search_r1"
    """`algorithm.carl.action_space`: search_r1 (search, answer) or paper (search, access, read, answer)."""
    page_chunk_chars: int = 4000
    """`algorithm.carl.page_chunk_chars`: the part size of a page under the paper's action space."""
    snippet_words: int | None = None
    """Words of each search result shown (the search tool's `snippet_words`; None: the whole passage)."""

    def __post_init__(self) -> None:
        for name in ("max_actions", "max_action_tokens", "prompt_length", "response_length", "topk", "samples"):
            if int(getattr(self, name)) < 1:
                raise EvalError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1.")
        if self.concurrency < 1:
            raise EvalError(f"--concurrency {self.concurrency}: must be >= 1.")
        if self.temperature < 0:
            raise EvalError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy).")
        if self.samples > 1 and self.temperature == 0:
            raise EvalError(
                f"--samples {self.samples} with greedy decoding gives {self.samples} identical trajectories: "
                "add --temperature (e.g. 0.7), or drop --samples."
            )
        if self.invalid_action not in ("end", "feedback"):
            raise EvalError(f"--invalid-action {self.invalid_action}: use end or feedback.")
        if self.action_space not in ACTION_SPACES:
            raise EvalError(f"--action-space {self.action_space}: use {' or '.join(ACTION_SPACES)}.")
        if self.page_chunk_chars < 1 or (self.snippet_words is not None and self.snippet_words < 1):
            raise EvalError(
                f"--page-chunk-chars {self.page_chunk_chars} / --snippet-words {self.snippet_words}: must be >= 1."
            )

    def sampling_params(self) -> dict[str, Any]:
        """What verl's agent loop sends per request (greedy: temperature 0, no top-k/top-p cut)."""
        if self.temperature == 0:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": 1.0}


#: The settings a training run fixes, each with its flag. The CARL trainer records them beside every checkpoint
#: (`recipe.carl.run_record`); evaluating that checkpoint takes them from there unless the flag is given.
RECORDED_FLAGS = {
    "max_actions": "--max-actions",
    "max_action_tokens": "--max-action-tokens",
    "prompt_length": "--prompt-length",
    "response_length": "--response-length",
    "topk": "--topk",
    "thinking": "--thinking",
    "invalid_action": "--invalid-action",
    "chat_template_kwargs": "--chat-template-kwargs",
    "action_space": "--action-space",
    "page_chunk_chars": "--page-chunk-chars",
    "snippet_words": "--snippet-words",
}


@dataclasses.dataclass(frozen=True)
class Override:
    """A flag whose value differs from the one the training run recorded."""

    key: str
    recorded: Any
    used: Any

    def line(self) -> str:
        flag = RECORDED_FLAGS[self.key]
        return f"{flag} overrides the training run: {self.key} recorded {self.recorded!r}, used {self.used!r}"


def with_recorded(given: dict[str, Any], recorded: dict[str, Any]) -> tuple[dict[str, Any], list[Override]]:
    """The value of each setting of `RECORDED_FLAGS`: the flag's when given (not None), else the recorded one, else
    none (`EvalSettings`' default applies); and an `Override` for every given flag that differs from the record."""
    values: dict[str, Any] = {}
    overrides = []
    for key in RECORDED_FLAGS:
        if given.get(key) is not None:
            values[key] = given[key]
            if key in recorded and recorded[key] != given[key]:
                overrides.append(Override(key, recorded[key], given[key]))
        elif key in recorded:
            values[key] = recorded[key]
    return values, overrides
