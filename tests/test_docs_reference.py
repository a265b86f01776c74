"""docs/config.md names every `algorithm.carl` key and docs/metrics.md every metric the trainer logs, so the reference
cannot fall behind the code: a new key or metric without its row fails here (CONTRIBUTING.md, "A setting or a
metric"). Fast: reads the dataclasses and the sources that log, nothing runs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from omegaconf import OmegaConf

from carl_core import CARLConfig
from recipe.carl.settings import RECIPE_KEYS

REPO = Path(__file__).resolve().parents[1]
#: The modules that put metrics into the trainer's step metrics (`compute_*_stats`, `search_metrics`, `plan_metrics`,
#: `BudgetTotals`, the action kinds' stats).
LOGGING_SOURCES = [
    "carl_core/stats.py",
    "recipe/carl/trainer.py",
    "recipe/carl/schedule.py",
    "recipe/carl/totals.py",
    "recipe/carl/action_kinds.py",
]
METRIC = re.compile(r"""["']((?:carl|search)/[a-z_]+(?:/\{[a-z_]+\})?)["']""")


def test_config_reference_has_a_row_per_key():
    keys = [f.name for f in dataclasses.fields(CARLConfig)] + list(RECIPE_KEYS)
    yaml = OmegaConf.load(REPO / "recipe" / "carl" / "config" / "carl_trainer.yaml")
    assert set(yaml.algorithm.carl) <= set(keys)  # the yaml sets no key the code does not know
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert sorted(rows) == sorted(keys)


def test_metrics_reference_names_every_logged_metric():
    logged = {m for path in LOGGING_SOURCES for m in METRIC.findall((REPO / path).read_text(encoding="utf-8"))}
    logged = {re.sub(r"\{([a-z_]+)\}", r"<\1>", m) for m in logged}  # f"carl/finish/{reason}" -> carl/finish/<reason>
    assert len(logged) >= 30  # the sources were read: about 30 names
    named = set(re.findall(r"`((?:carl|search)/[\w<>/]+)`", (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")))
    assert sorted(logged - named) == []
