"""Running totals of what a run generated and trained, kept with its checkpoints so that a resumed run goes on counting.

Runs compare at equal budgets, not only at equal steps: a CARL step generates fewer actions than a GRPO step of 16
chains and trains far fewer. The trainer adds each step's counts (`carl_core.compute_budget_stats`, logged for CARL
and its baselines alike) and logs the sums since step 1 as `carl/total/*`. Totals are not something verl restores:
its checkpoint holds the model, the optimizer and the dataloader, and a resumed process starts with empty
counters. So the CARL trainer writes them into every checkpoint it saves (`global_step_N/carl_totals.json`) and reads
them back from the checkpoint it resumes from; a checkpoint written before this file existed restarts them at 0,
with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from recipe.carl.io import write_json

logger = logging.getLogger(__name__)

TOTALS_FILE = "carl_totals.json"
#: Each count and the metric that logs it (docs/metrics.md).
METRICS = {
    "questions": "carl/total/questions",
    "actions_generated": "carl/total/actions_generated",
    "actions_trained": "carl/total/actions_trained",
    "tokens_generated": "carl/total/tokens_generated",
    "tokens_trained": "carl/total/tokens_trained",
}


@dataclass
class BudgetTotals:
    """Sums over the steps so far (all counts: every sample of an action, and each trained action once)."""

    step: int = 0
    """The step the totals count up to (the last step added; a saved checkpoint's step)."""
    questions: int = 0
    actions_generated: int = 0
    actions_trained: int = 0
    tokens_generated: int = 0
    tokens_trained: int = 0

    def add(self, step: int, budget: Mapping[str, float]) -> dict[str, float]:
        """Adds one step's `compute_budget_stats` and returns the `carl/total/*` metrics after it.

        The per-question means are multiplied back by the step's questions (rounded: they are counts divided by
        an integer).
        """
        questions = float(budget["carl/questions"])
        self.step = int(step)
        self.questions += round(questions)
        self.actions_generated += round(budget["carl/actions_generated_per_question"] * questions)
        self.actions_trained += round(budget["carl/actions_trained_per_question"] * questions)
        self.tokens_generated += round(budget["carl/tokens_generated"])
        self.tokens_trained += round(budget["carl/tokens_trained"])
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        return {metric: float(getattr(self, name)) for name, metric in METRICS.items()}

    def save(self, folder: str) -> str:
        """Writes `folder/carl_totals.json` (whole, `recipe.carl.io`); returns its path."""
        path = os.path.join(folder, TOTALS_FILE)
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, folder: str, step: int) -> BudgetTotals:
        """The totals saved with the checkpoint `folder` of step `step`; zeros (with a warning) when it has none.

        Raises:
            ValueError: the file belongs to another step, or is not a totals record.
        """
        path = os.path.join(folder, TOTALS_FILE)
        if not os.path.exists(path):
            logger.warning("CARL: %s has no %s: the carl/total/* counts restart at 0 from step %d", folder, TOTALS_FILE,
                           step)  # fmt: skip
            return cls()
        with open(path) as f:
            record = json.load(f)
        names = {f.name for f in fields(cls)}
        if not isinstance(record, dict) or set(record) != names:
            raise ValueError(f"{path} is not a totals record: need the keys {sorted(names)}, got {record!r:.200}")
        if record["step"] != step:
            raise ValueError(f"{path} counts up to step {record['step']}, but its checkpoint is step {step}")
        return cls(**{k: int(v) for k, v in record.items()})


def checkpoint_folder(config, step: int) -> str:
    """The `global_step_N` folder verl resumed from (`trainer.resume_mode`: auto -> the checkpoint folder's)."""
    if config.trainer.get("resume_mode") == "resume_path" and config.trainer.get("resume_from_path"):
        return os.path.abspath(str(config.trainer.resume_from_path))
    return os.path.join(os.path.abspath(str(config.trainer.default_local_dir)), f"global_step_{step}")
