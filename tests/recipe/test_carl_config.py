"""Config: every run script's overrides compose against verl 0.9.1's real config, and bad settings fail by name."""

from __future__ import annotations

import os
import pathlib
import re
import stat
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

import recipe.carl.plugin  # noqa: F401
from carl_core import CARLConfigError
from recipe.carl import preflight
from recipe.carl.settings import check_trainer_config, read_settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "recipe/carl/config")
SCRIPTS = sorted((ROOT / "scripts").glob("run_*qwen*.sh"))


def run_script(script: pathlib.Path, tmp_path: pathlib.Path, **env_vars: str) -> subprocess.CompletedProcess:
    """Runs the script with `python3` replaced by a recorder (`tmp_path/args`), so shell defaults and arithmetic are
    evaluated."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shim = tmp_path / "python3"
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$CARL_ARGS_OUT"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CARL_ARGS_OUT": str(tmp_path / "args")}
    env.update(HOME="/home/x", **env_vars)
    return subprocess.run(["bash", str(script)], env=env, cwd=ROOT, capture_output=True, text=True)


def script_overrides(script: pathlib.Path, tmp_path: pathlib.Path, **env_vars: str) -> list[str]:
    run_script(script, tmp_path, **env_vars).check_returncode()
    args = (tmp_path / "args").read_text().split("\0")[:-1]
    assert args[:2] == ["-m", "recipe.carl.main_carl"], args[:2]
    return args[2:]


def compose_carl(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="carl_trainer", overrides=list(overrides))


def test_five_scripts_exist():
    names = {s.name for s in SCRIPTS}
    assert names == {
        "run_carl_qwen7b.sh",
        "run_carl_lite_qwen7b.sh",
        "run_grpo_qwen7b.sh",
        "run_carl_qwen3_4b.sh",
        "run_carl_asearcher_qwen3_4b.sh",
    }


@pytest.mark.parametrize("packing", ["path", "tree"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_overrides_compose(script, packing, tmp_path):
    text = script.read_text()
    assert [line for line in text.splitlines() if not line.startswith("#")][0] == "set -xeuo pipefail"
    overrides = script_overrides(script, tmp_path, PACKING=packing)
    assert overrides and all("=" in o for o in overrides)
    cfg = compose_carl(overrides)
    settings = check_trainer_config(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    OmegaConf.resolve(cfg)
    if "grpo" in script.name:
        assert cfg.algorithm.adv_estimator == "grpo" and cfg.actor_rollout_ref.rollout.n == 16
    else:
        assert cfg.algorithm.adv_estimator == "carl" and cfg.actor_rollout_ref.rollout.n == 1
        assert settings.carl.n_forks == 16
        assert settings.carl.n0 == (1 if "lite" in script.name else 8)
    # CARL and its baseline run the same trainer (verl's sync paths) and so log the same budget metrics.
    assert cfg.trainer.v1.trainer_mode == "carl"
    qwen3 = "qwen3" in script.name
    assert settings.carl.max_actions == (10 if qwen3 else 32)
    # Thinking-aware per-turn budget for Qwen3; the whole-trajectory budget leaves room for T_max typical turns.
    assert settings.max_action_tokens == (2048 if qwen3 else 512)
    assert settings.thinking is qwen3  # a stop string inside <think> continues the turn
    assert cfg.data.max_response_length == (16384 if qwen3 else 12288)
    prompt_and_response = cfg.data.max_prompt_length + cfg.data.max_response_length
    assert cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu >= prompt_and_response
    preflight.check_batch(cfg)
    assert cfg.data.train_batch_size == (64 if qwen3 else 128)
    # Questions (GRPO: prompts) per update, whatever the row layout: 8 updates a step (Qwen3's 64 questions: 4).
    assert cfg.data.train_batch_size // cfg.actor_rollout_ref.actor.ppo_mini_batch_size == (4 if qwen3 else 8)
    assert settings.packing == packing
    attention = cfg.actor_rollout_ref.model.override_config.get("attn_implementation")
    assert attention == ("flex_attention" if packing == "tree" else None)  # path: verl's default (flash-attn)
    assert cfg.actor_rollout_ref.actor.optim.lr == (1e-5 if qwen3 else 5e-6)
    assert cfg.trainer.total_training_steps == 100
    # scripts/run_settings.sh, the same in every script: one seed everywhere, validation every 10 steps and before
    # step 1 of a fresh run, a checkpoint every 10 steps with the last 2 kept, the metrics file and wandb on.
    seeds = (cfg.data.seed, cfg.actor_rollout_ref.rollout.seed, cfg.actor_rollout_ref.actor.data_loader_seed)
    assert seeds == (0, 0, 0) and settings.carl.seed == 0
    assert (cfg.trainer.test_freq, cfg.trainer.val_before_train) == (10, True)
    assert (cfg.trainer.save_freq, cfg.trainer.max_actor_ckpt_to_keep) == (10, 2)
    assert list(cfg.trainer.logger) == ["console", "file", "wandb"]
    # The paper's main setting: its action space, with the tools that show ids and open pages.
    paper = "asearcher" in script.name
    assert settings.action_space == ("paper" if paper else "search_r1") and settings.page_chunk_chars == 4000
    tools = cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path
    assert tools == f"recipe/carl/search/{'pages_tool' if paper else 'search_tool'}.yaml"


def run_settings_overrides(overrides: list[str]) -> dict[str, str]:
    """The overrides of keys that scripts/run_settings.sh sets, as {key: value}."""
    keys = ("data.seed", "rollout.seed", "data_loader_seed", "carl.seed", "trainer.test_freq", "val_before_train")
    keys += ("trainer.save_freq", "ckpt_to_keep", "trainer.logger")
    return dict(o.split("=", 1) for o in overrides if any(k in o.split("=", 1)[0] for k in keys))


def test_carl_and_grpo_share_seed_validation_checkpoints_and_logging(tmp_path):
    """One definition (scripts/run_settings.sh) for both arms: the same variables give the same overrides."""
    env = {"SEED": "3", "TEST_FREQ": "5", "SAVE_FREQ": "20", "MAX_CKPT_TO_KEEP": "1", "LOGGER": "console,file"}
    carl = script_overrides(ROOT / "scripts" / "run_carl_qwen7b.sh", tmp_path / "carl", **env)
    grpo = script_overrides(ROOT / "scripts" / "run_grpo_qwen7b.sh", tmp_path / "grpo", **env)
    assert run_settings_overrides(carl) == run_settings_overrides(grpo)
    cfg = compose_carl(grpo)
    seeds = (cfg.data.seed, cfg.actor_rollout_ref.rollout.seed, cfg.actor_rollout_ref.actor.data_loader_seed)
    assert seeds == (3, 3, 3) and read_settings(cfg).carl.seed == 3
    assert (cfg.trainer.test_freq, cfg.trainer.save_freq, cfg.trainer.max_actor_ckpt_to_keep) == (5, 20, 1)
    assert list(cfg.trainer.logger) == ["console", "file"]
    # The update size: one variable, PPO_MINI_BATCH_QUESTIONS, in both (32 questions: 4 updates of 128).
    for script in ("run_carl_qwen7b.sh", "run_grpo_qwen7b.sh"):
        cfg = compose_carl(
            script_overrides(ROOT / "scripts" / script, tmp_path / script, PPO_MINI_BATCH_QUESTIONS="32")
        )
        assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 32


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_resumed_run_skips_the_validation_before_training(script, tmp_path):
    """VAL_BEFORE_TRAIN=auto: false once $CKPT_DIR/$EXPERIMENT holds verl's tracker file (resume_mode=auto resumes
    from it); an explicit value wins either way."""
    ckpt = tmp_path / "ckpt"
    fresh = compose_carl(script_overrides(script, tmp_path / "a", CKPT_DIR=str(ckpt)))
    assert fresh.trainer.val_before_train is True
    folder = pathlib.Path(fresh.trainer.default_local_dir)
    folder.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("20")
    resumed = run_script(script, tmp_path / "b", CKPT_DIR=str(ckpt))
    assert "resuming from" in resumed.stderr + resumed.stdout and "(step 20)" in resumed.stderr + resumed.stdout
    assert compose_carl(script_overrides(script, tmp_path / "b", CKPT_DIR=str(ckpt))).trainer.val_before_train is False
    forced = script_overrides(script, tmp_path / "c", CKPT_DIR=str(ckpt), VAL_BEFORE_TRAIN="true")
    assert compose_carl(forced).trainer.val_before_train is True


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_stop_when_the_questions_do_not_split_into_updates(script, tmp_path):
    """A step of 100 questions in updates of 16: the script stops before Ray, with preflight's message (the same
    advice as main_carl); 3 nodes x 6 GPUs no longer do (the CARL trainer pads a step to whole updates)."""
    result = run_script(script, tmp_path, TRAIN_BATCH_SIZE="100")
    assert result.returncode == 2 and not (tmp_path / "args").exists()
    expected = preflight.updates_message(16, 100)
    assert expected and "=10 (10 updates a step) or 20 (5 updates a step)" in expected
    assert f"error: {expected}" in " ".join(result.stderr.split()), result.stderr[-800:]
    cfg = compose_carl(script_overrides(script, tmp_path, NNODES="3", GPUS_PER_NODE="6"))
    preflight.check_batch(cfg)


@pytest.mark.parametrize(
    ("script", "env", "error"),
    [
        ("carl", {"PPO_MINI_BATCH_ROWS": "256"}, "PPO_MINI_BATCH_ROWS is gone: ppo_mini_batch_size counts questions"),
        ("carl", {"PACKING": "trees"}, "PACKING=trees: use path (one row per leaf path) or tree"),
        ("grpo", {"PPO_MINI_BATCH_PROMPTS": "16"}, "PPO_MINI_BATCH_PROMPTS is gone: CARL and GRPO share one variable"),
        ("carl", {"VAL_BEFORE_TRAIN": "yes"}, "VAL_BEFORE_TRAIN=yes: use auto (true unless the run resumes), true or"),
        ("grpo", {"SEED": "x"}, "SEED=x must be an integer"),
        ("carl", {"MAX_CKPT_TO_KEEP": "0"}, "MAX_CKPT_TO_KEEP=0 must be >= 1"),
        ("grpo", {"LOGGER": "[console]"}, "LOGGER=[console]: give trainer.logger's backends comma-separated"),
    ],
)
def test_the_scripts_refuse_unknown_settings_by_name(script, env, error, tmp_path):
    result = run_script(ROOT / "scripts" / f"run_{script}_qwen7b.sh", tmp_path, **env)
    assert result.returncode == 2 and not (tmp_path / "args").exists()
    assert error in " ".join(result.stderr.split()), result.stderr[-800:]


def test_the_yaml_and_the_docs_name_the_grpo_scripts_overrides(tmp_path):
    """The GRPO baseline's overrides, as the yaml's header and docs/config.md name them, are what the script sets
    beyond the CARL script's keys (carl_agent runs one trajectory under GRPO: no agent-loop override)."""
    header = (ROOT / "recipe/carl/config/carl_trainer.yaml").read_text().split("\n\n", 1)[0]
    named = set(re.findall(r"(?:algorithm|actor_rollout_ref)\.[\w.]+=\w+", header))
    docs = (ROOT / "docs/config.md").read_text()
    grpo = set(script_overrides(ROOT / "scripts" / "run_grpo_qwen7b.sh", tmp_path / "grpo"))
    carl_keys = {o.split("=", 1)[0] for o in script_overrides(ROOT / "scripts" / "run_carl_qwen7b.sh", tmp_path)}
    assert (
        named
        == {o for o in grpo if o.split("=", 1)[0] not in carl_keys}
        == {
            "algorithm.adv_estimator=grpo",
            "actor_rollout_ref.rollout.n=16",
        }
    )
    assert all(f"`{o}`" in docs or o in docs for o in named)


def test_the_paper_action_space_is_one_variable_of_every_carl_script(tmp_path):
    """ACTION_SPACE=paper on the Qwen2.5 script: the paper's action space, its tool yaml, a chosen part size; the
    ASearcher script's data paths and experiment name; an unknown action space fails by name at start."""
    cfg = compose_carl(script_overrides(ROOT / "scripts" / "run_carl_qwen7b.sh", tmp_path, ACTION_SPACE="paper",
                                        PAGE_CHUNK_CHARS="2000"))  # fmt: skip
    settings = check_trainer_config(cfg)
    assert (settings.action_space, settings.page_chunk_chars) == ("paper", 2000)
    assert cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path == "recipe/carl/search/pages_tool.yaml"
    paper = compose_carl(script_overrides(ROOT / "scripts" / "run_carl_asearcher_qwen3_4b.sh", tmp_path))
    assert paper.data.train_files == "/home/x/data/asearcher_paper/train.parquet"
    assert paper.trainer.experiment_name == "carl_n08_qwen3_4b_asearcher_paper"
    bad = compose_carl(script_overrides(ROOT / "scripts" / "run_carl_qwen7b.sh", tmp_path, ACTION_SPACE="pages"))
    with pytest.raises(CARLConfigError, match="action_space='pages' is unknown: use search_r1"):
        check_trainer_config(bad)


@pytest.mark.parametrize(("script", "tokens"), [("run_carl_qwen3_4b.sh", "4096"), ("run_grpo_qwen7b.sh", "1024")])
def test_scripts_pass_the_per_turn_budget(script, tokens, tmp_path):
    overrides = script_overrides(ROOT / "scripts" / script, tmp_path, MAX_ACTION_TOKENS=tokens)
    assert read_settings(compose_carl(overrides)).max_action_tokens == int(tokens)


def test_misspelt_keys_fail():
    with pytest.raises(ConfigCompositionException):
        compose_carl(["algorithm.carl.n_fork=3"])  # struct config: unknown keys need `+`, and then ...
    cfg = compose_carl(["+algorithm.carl.n_fork=3"])
    with pytest.raises(CARLConfigError, match="n_fork"):  # ... CARLConfig names the key
        read_settings(cfg)
    with pytest.raises(ConfigCompositionException):
        compose_carl(["actor_rollout_ref.rollout.carl_n0=3"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("actor_rollout_ref.rollout.n=16", "rollout.n=1"),
        ("trainer.v1.trainer_mode=sync", "trainer_mode=carl"),
        ("algorithm.use_kl_in_reward=true", "use_kl_in_reward"),
        ("algorithm.carl.n0=0", "n0"),
        ("algorithm.carl.selection=greedy", "selection"),
        ("algorithm.carl.dump_every=-1", "dump_every"),
        ("algorithm.carl.max_action_tokens=0", "max_action_tokens=0 must be an integer >= 1"),
        ("algorithm.carl.invalid_action=retry", "invalid_action='retry' is unknown: use end"),
        ("algorithm.carl.thinking=maybe", "thinking='maybe' must be true or false"),
        ("algorithm.carl.max_search_error_rate=1.5", r"max_search_error_rate=1.5 must be in \[0, 1\]"),
        ("algorithm.carl.tail_share=1", r"tail_share=1 must be in \(0, 1\)"),
        ("algorithm.carl.tail_forks_in_flight=-1", "tail_forks_in_flight=-1 must be 0 \\(off\\) or an integer >= "),
    ],
)
def test_bad_settings_name_the_fix(override, match):
    with pytest.raises(CARLConfigError, match=match):
        check_trainer_config(compose_carl([override]))


def test_the_tail_boost_is_checked_against_k_and_full_determinism():
    low = ["algorithm.carl.forks_in_flight=4", "algorithm.carl.tail_forks_in_flight=2"]
    with pytest.raises(
        CARLConfigError, match="tail_forks_in_flight=2 must be 0 \\(off\\) or an integer >= forks_in_flight=4"
    ):
        check_trainer_config(compose_carl(low))
    boost = ["algorithm.carl.forks_in_flight=4", "algorithm.carl.tail_forks_in_flight=16"]
    assert check_trainer_config(compose_carl(boost)).tail_forks_in_flight == 16
    with pytest.raises(CARLConfigError, match="set algorithm.carl.tail_forks_in_flight=0 for repeatable runs"):
        check_trainer_config(compose_carl([*boost, "actor_rollout_ref.rollout.full_determinism=true"]))


def test_grpo_needs_no_carl_checks():
    cfg = compose_carl(["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=16"])
    assert check_trainer_config(cfg).carl.max_actions == 32


def test_the_grpo_fork_pool_is_checked_as_the_trainer_computes_its_advantages():
    pool = ["actor_rollout_ref.rollout.n=1", "algorithm.carl.fork_pool={floor: 2, group: 4}"]
    assert check_trainer_config(compose_carl(["algorithm.adv_estimator=grpo", *pool])).fork_pool.floor == 2
    with pytest.raises(CARLConfigError, match="fork_pool needs algorithm.adv_estimator=grpo or carl \\(got rloo\\)"):
        check_trainer_config(compose_carl(["algorithm.adv_estimator=rloo", *pool]))
    for override, match in [("algorithm.use_kl_in_reward=true", "use_kl_in_reward=false"),
                            ("trainer.v1.trainer_mode=sync", "trainer_mode=carl")]:  # fmt: skip
        with pytest.raises(CARLConfigError, match=f"fork_pool under GRPO needs: .*{match}"):
            check_trainer_config(compose_carl(["algorithm.adv_estimator=grpo", *pool, override]))


def test_yaml_has_a_comment_above_every_key():
    lines = (ROOT / "recipe/carl/config/carl_trainer.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[a-z_0-9]+:", line) and not line.strip().startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {line!r}"


def test_verl_never_instantiates_algorithm_config():
    """`algorithm.carl` is safe only while verl keeps `algorithm` a DictConfig: AlgoConfig(**) rejects `carl`."""
    import verl

    pattern = re.compile(r"(omega_conf_to_dataclass|instantiate)\([^)]*\balgorithm\b")
    hits = [
        str(p)
        for p in pathlib.Path(verl.__file__).parent.rglob("*.py")
        if "trainer/config" not in str(p) and pattern.search(p.read_text(errors="ignore"))
    ]
    assert not hits, f"verl now builds AlgoConfig from config.algorithm in {hits}: move CARL's block out of it"


@pytest.mark.parametrize("shape", ["7b", "7b_lite", "qwen3_4b"])
def test_each_script_runs_the_forks_in_flight_its_predicted_rollout_chose(shape, tmp_path):
    """Issue 29 item 6: a script's K (and the straggler boost) are the rollout-time model's choice for its shape,
    as committed in benchmarks/results/rollout_time.json (docs/measurements.md, "Rollout time")."""
    import json

    results = json.loads((ROOT / "benchmarks/results/rollout_time.json").read_text())
    predicted = results["shapes"][shape]
    settings = check_trainer_config(compose_carl(script_overrides(ROOT / "scripts" / predicted["script"], tmp_path)))
    assert settings.carl.forks_in_flight == predicted["default_forks_in_flight"]
    chosen = results["tail_7b"]["chosen"]
    assert settings.tail_forks_in_flight == (chosen[0] if chosen else 0)
    if chosen:
        assert settings.tail_share == chosen[1]
