"""How each question is rolled out (`EvalSettings`), and the error every bad input of the evaluation raises."""

from __future__ import annotations

import dataclasses
from typing import Any

from carl_core import CARLConfig


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

    def __post_init__(self) -> None:
        for name in ("max_actions", "max_action_tokens", "prompt_length", "response_length", "samples", "concurrency"):
            if int(getattr(self, name)) < 1:
                raise EvalError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1.")
        if self.temperature < 0:
            raise EvalError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy).")
        if self.samples > 1 and self.temperature == 0:
            raise EvalError(
                f"--samples {self.samples} with greedy decoding gives {self.samples} identical trajectories: "
                "add --temperature (e.g. 0.7), or drop --samples."
            )
        if self.invalid_action not in ("end", "feedback"):
            raise EvalError(f"--invalid-action {self.invalid_action}: use end or feedback.")

    def sampling_params(self) -> dict[str, Any]:
        """What verl's agent loop sends per request (greedy: temperature 0, no top-k/top-p cut)."""
        if self.temperature == 0:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": 1.0}
