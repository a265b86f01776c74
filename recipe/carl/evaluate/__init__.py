"""Evaluation of a model (and a baseline) on search-QA test sets, in the environment the policy is trained in.

    python -m recipe.carl.evaluate --model <model folder | hub id | .../global_step_N/actor> --data <test.parquet> ...

One module per job, importing in one direction (`study` -> `cli` -> `runner` / `report` -> `engines`, `models`,
`data`, `stats` -> `settings`):

- `settings`: `EvalSettings` (how a question is rolled out) and `EvalError` (every bad input);
- `engines`: the inference engines (`HFEngine`, the CPU backend; `VLLMEngine`) and `choose_engine`;
- `models`: model and checkpoint resolution (hub ids, verl checkpoints merged with verl's merger), labels;
- `data`: the test parquet files;
- `runner`: `Evaluator`, which rolls questions out through the agent loop's `SearchEnvironment`;
- `stats`: the bootstrap intervals (shared with the CARL-against-GRPO experiment);
- `judge`: LasJ, an LLM judge's verdict on each prediction (`--judge-url`);
- `report`: per-data-set tables, diagnosis, the comparison of two models, `results.md`;
- `cli`: the command line, the retriever and reward plumbing, the per-question files and resuming, `main`;
- `study`: several models and RL seeds compared from their saved per-question files
  (`python -m recipe.carl.evaluate.study`).

The names below are re-exported so that `from recipe.carl.evaluate import Evaluator` keeps working.
"""

from recipe.carl.evaluate.cli import check_retriever, load_reward, main, make_search, run
from recipe.carl.evaluate.data import load_datasets
from recipe.carl.evaluate.engines import HFEngine, VLLMEngine, choose_engine, vllm_installed
from recipe.carl.evaluate.models import model_label, resolve_model
from recipe.carl.evaluate.report import compare, diagnose, markdown, summarize
from recipe.carl.evaluate.runner import Evaluator, evaluate_model
from recipe.carl.evaluate.settings import EvalError, EvalSettings

__all__ = [
    "EvalError",
    "EvalSettings",
    "Evaluator",
    "HFEngine",
    "VLLMEngine",
    "check_retriever",
    "choose_engine",
    "compare",
    "diagnose",
    "evaluate_model",
    "load_datasets",
    "load_reward",
    "main",
    "make_search",
    "markdown",
    "model_label",
    "resolve_model",
    "run",
    "summarize",
    "vllm_installed",
]
