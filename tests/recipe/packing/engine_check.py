"""verl's own FSDP2 engine on CPU (the one `EngineRegistry` builds for the actor), packed rows against per-path rows.

Run as a script (it switches the process to the CPU platform and starts a 1-rank gloo group, so the slow test runs
it in a subprocess); prints one JSON line:

    CARL_DEVICE=cpu python tests/recipe/packing/engine_check.py [--loss-agg-mode token-mean] [--remove-padding]

Same trees, same initial weights, two batches: the tree-packed rows and the per-path rows of the same trained
actions. Reported: the engine class verl resolved, the largest difference of any trained token's log-prob
(`infer_batch`, the old-log-prob pass), and of the gradient and the parameter change after one `train_batch` with
verl's `ppo_loss` (the update pass), under SGD (change = -lr * clipped gradient) and under the config's AdamW.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import socket
import sys
import tempfile
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
CONFIG_DIR = REPO / "recipe" / "carl" / "config"


def _start_cpu_group() -> None:
    import torch.distributed as dist

    import recipe.carl.cpu as carl_cpu

    assert carl_cpu.register(), "run with CARL_DEVICE=cpu"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def _trees(seed: int):
    from carl_core import CARLConfig
    from tests.core.conftest import random_tree

    rng = random.Random(seed)
    trees = [random_tree(rng, CARLConfig(n0=2, n_forks=4, max_actions=3), uid=f"t{i}") for i in range(3)]
    trained = [[False] + [rng.random() < 0.6 for _ in t.nodes[1:]] for t in trees]
    return trees, trained


def _nodes(row) -> list[int]:
    return [node for node, count in row.token_nodes for _ in range(count)]


def _rows(trees, trained, packed: bool):
    """(prompt, response, response_mask, per-token (tree, node) key or None, runs or None) per row."""
    from recipe.carl.packing.layout import pack_tree

    rows = []
    for b, (tree, tr) in enumerate(zip(trees, trained, strict=True)):
        if packed:
            for r in pack_tree(tree, tr, max_response_tokens=60):
                keys = [(b, v) if m else None for v, m in zip(_nodes(r), r.response_mask, strict=True)]
                rows.append((r.prompt_ids, r.response_ids, r.response_mask, keys, r.tree_runs))
            continue
        covered: set[int] = set()
        for leaf in tree.leaves():
            path = tree.path(leaf)[1:]
            new = [v for v in path if tr[v] and v not in covered]
            if not new:
                continue
            response, mask, keys = [], [], []
            for v in path[: path.index(new[-1]) + 1]:
                action = tree.nodes[v].action
                on = v in new
                response += action.token_ids
                mask += [int(on)] * len(action.token_ids)
                keys += [(b, v) if on else None] * len(action.token_ids)
                if v != new[-1]:
                    response += action.observation_ids
                    mask += [0] * len(action.observation_ids)
                    keys += [None] * len(action.observation_ids)
            covered.update(new)
            rows.append((tree.prompt_ids, response, mask, keys, None))
    return rows


def _batch(rows, old_log_probs=None, advantage=None):
    """verl's V1 row layout (nested tensors, `extra_fields`), plus a padding row as `_balance_batch` adds."""
    import torch
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    from recipe.carl.packing import RUNS_KEY

    fields = []
    for i, (prompt, response, mask, keys, runs) in enumerate(rows):
        ids = torch.tensor(prompt + response)
        field = {
            "prompts": torch.tensor(prompt),
            "responses": torch.tensor(response),
            "input_ids": ids,
            "position_ids": torch.arange(len(ids)),  # what verl stores; the engine replaces it for packed rows
            "response_mask": torch.tensor(mask),
            "loss_mask": torch.tensor(mask),
            "extra_fields": {RUNS_KEY: runs} if runs is not None else {},
            "uid": f"row{i}",
        }
        if old_log_probs is not None:
            field["old_log_probs"] = old_log_probs[i]
            field["advantages"] = torch.tensor([advantage[k] if k else 0.0 for k in keys])
        fields.append(field)
    # verl's padding row: 127 + 1 EOS tokens, response_mask 0, another row's extra_fields (so runs that don't fit)
    pad = copy.deepcopy(fields[0])
    pad.update(
        prompts=torch.full((127,), 2),
        responses=torch.tensor([2]),
        input_ids=torch.full((128,), 2),
        position_ids=torch.arange(128),
        response_mask=torch.tensor([0]),
        loss_mask=torch.tensor([0]),
        uid="pad0",
    )
    if old_log_probs is not None:
        pad.update(old_log_probs=torch.zeros(1), advantages=torch.zeros(1))
    fields.append(pad)
    return list_of_dict_to_tensordict(fields)


def _engine_inputs(td, use_remove_padding: bool, n_rows: int) -> None:
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(
        td,
        temperature=1.0,
        use_remove_padding=use_remove_padding,
        use_dynamic_bsz=True,
        max_token_len_per_gpu=400,
        micro_batch_size_per_gpu=4,
        use_fused_kernels=False,
        calculate_entropy=True,
        global_batch_size=n_rows,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loss-agg-mode", default="token-mean")
    p.add_argument("--remove-padding", action="store_true")
    p.add_argument("--attn", default="sdpa")
    args = p.parse_args()
    _start_cpu_group()

    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine import EngineRegistry
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import response_from_nested

    import recipe.carl.packing.register  # noqa: F401  (the recipe plugin imports it with verl.workers.engine)
    from recipe.carl.cpu.tiny_model import save_tiny_model
    from recipe.carl.packing import check_packing_config

    model_dir = save_tiny_model(Path(tempfile.mkdtemp()) / "model", seed=3, attn_implementation=args.attn)
    overrides = [
        "+device=cpu",
        f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.model.use_remove_padding={args.remove_padding}",
        f"actor_rollout_ref.model.override_config.attn_implementation={args.attn}",
        f"actor_rollout_ref.actor.loss_agg_mode={args.loss_agg_mode}",
        "data.max_prompt_length=64",
        "data.max_response_length=256",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=400",
        "actor_rollout_ref.actor.optim.lr=0.05",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.actor.grad_clip=1000.0",
    ]

    def config(optimizer: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(
                config_name="carl_trainer",
                overrides=[*overrides, f"actor_rollout_ref.actor.optim.optimizer={optimizer}"],
            )

    cfg = config("AdamW")
    refused = check_packing_config(cfg, "tree")
    model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    trees, trained = _trees(11)
    rows = {"packed": _rows(trees, trained, True), "per-path": _rows(trees, trained, False)}
    advantage = {(b, v): (-1.0) ** v * (0.3 + 0.1 * v + b) for b, t in enumerate(trees) for v in range(len(t.nodes))}

    result: dict = {"refused": refused}
    for optimizer in ("SGD", "AdamW"):
        actor = omega_conf_to_dataclass(config(optimizer).actor_rollout_ref.actor)
        logps, grads, deltas = {}, {}, {}
        for name, layout in rows.items():
            engine_config = copy.deepcopy(actor.engine)
            engine_config.use_remove_padding = args.remove_padding
            engine_config.use_dynamic_bsz = True
            engine_config.max_token_len_per_gpu = engine_config.infer_max_token_len_per_gpu = 400
            engine = EngineRegistry.new(
                model_type="language_model",
                backend="fsdp2",
                model_config=copy.deepcopy(model_config),
                engine_config=engine_config,
                optimizer_config=copy.deepcopy(actor.optim),
                checkpoint_config=actor.checkpoint,
            )
            result["engine"] = type(engine).__name__
            engine.initialize()
            td = _batch(layout)
            _engine_inputs(td, args.remove_padding, len(layout))
            with engine.eval_mode():
                out = engine.infer_batch(td)
            old = response_from_nested(out["model_output"]["log_probs"], td["response_mask"])
            per_key: dict = {}
            for row, lp in zip(layout, old.unbind(), strict=False):
                for key, value in zip(row[3], lp.tolist(), strict=True):
                    if key is not None:
                        per_key.setdefault(key, []).append(value)
            logps[name] = per_key
            before = {k: v.full_tensor().clone() for k, v in engine.module.state_dict().items()}
            td = _batch(layout, list(old.unbind())[: len(layout)], advantage)
            _engine_inputs(td, args.remove_padding, len(layout))
            with engine.train_mode():
                engine.train_batch(td, loss_function=partial(ppo_loss, config=actor))
                # (the train-mode context zeroes gradients on exit)
                grads[name] = {n: p.grad.full_tensor().clone() for n, p in engine.module.named_parameters()}
            after = {k: v.full_tensor() for k, v in engine.module.state_dict().items()}
            deltas[name] = {k: after[k] - before[k] for k in before}
        a, b = logps["packed"], logps["per-path"]
        assert a.keys() == b.keys()
        result["max_abs_logp_diff"] = max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))
        scale = max(v.abs().max().item() for v in grads["per-path"].values())
        result[f"{optimizer}_max_grad_diff_rel"] = (
            max((grads["packed"][k] - grads["per-path"][k]).abs().max().item() for k in grads["packed"]) / scale
        )
        scale = max(v.abs().max().item() for v in deltas["per-path"].values())
        result[f"{optimizer}_max_delta_diff_rel"] = (
            max((deltas["packed"][k] - deltas["per-path"][k]).abs().max().item() for k in deltas["packed"]) / scale
        )
        result[f"{optimizer}_delta_scale"] = scale
    result["trained_tokens"] = sum(len(v) for v in logps["packed"].values())
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
