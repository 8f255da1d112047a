"""The state a training run starts from: resumed, fine-tuned or fresh."""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from absl import logging

from alp_jax import checkpoints, finetune, run_dir, sharding
from alp_jax import train_state as ts


def restore_or_init(cfg: ml_collections.ConfigDict, model: Any, tx: Any, mesh: Any,
                    out: str) -> tuple[ts.TrainState, str]:
    """The state to train from, laid out on ``mesh``, and how it was obtained: ``resumed``
    from the newest good checkpoint in ``out`` (after checking it is the same run),
    ``fine-tuned`` from ``finetune_checkpoint_path``, or ``fresh``.

    A damaged newest checkpoint is reported by step, moved to ``checkpoints_damaged/``
    and the next older one used; if every checkpoint is damaged the run stops rather
    than silently starting over.
    """
    rng = jax.random.PRNGKey(cfg.seed)

    def fresh_state(rng, variables=None):
        return ts.create_train_state(model, tx, rng, cfg.dataset_image_size,
                                     moving_average_decay=cfg.moving_average_decay,
                                     variables=variables)

    abstract = jax.eval_shape(fresh_state, rng)
    state_sh = sharding.state_sharding(abstract, mesh)
    like = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    damaged = []
    for step in reversed(checkpoints.steps(out)):
        try:
            state = _resume(cfg, out, step, like)
        except checkpoints.CheckpointDamaged as e:
            moved = checkpoints.quarantine(out, step)
            damaged.append(step)
            logging.error("%s; moved it to %s and trying the previous checkpoint.", e, moved)
            continue
        if damaged:
            logging.warning("Resuming from step %d, the newest good checkpoint (damaged: %s).",
                            step, ", ".join(map(str, damaged)))
        logging.info("Resumed from %s at step %d.", checkpoints.step_dir(out, step), step)
        return state, "resumed"
    if damaged:
        raise checkpoints.CheckpointError(
            f"Every checkpoint in {checkpoints.checkpoint_dir(out)} is damaged (steps "
            f"{', '.join(map(str, damaged))}, moved to {checkpoints.DAMAGED_SUBDIR}/); not "
            "starting over in this directory. Use another --output_dir.")
    variables, how = None, "fresh"
    if cfg.finetune_checkpoint_path:
        init = ts.init_variables(model, jax.random.split(rng)[0], cfg.dataset_image_size)
        variables = finetune.finetune_variables(
            jax.device_get(init), cfg.finetune_checkpoint_path,
            exclude_scopes=cfg.finetune_exclude_pretrained_scopes,
            trainable_scopes=cfg.finetune_trainable_scopes,
            use_ema=cfg.moving_average_decay > 0,
            allow_unverified=cfg.allow_unverified_checkpoint)
        how = "fine-tuned"
    return jax.jit(fresh_state, out_shardings=state_sh)(rng, variables), how


def _resume(cfg: ml_collections.ConfigDict, out: str, step: int, like: Any) -> ts.TrainState:
    """Checkpoint ``step`` of ``out`` onto ``like``, refusing another run's checkpoint
    (ResumeMismatch) and one without checksums (CheckpointUnverified, unless
    ``allow_unverified_checkpoint``), and reporting a damaged one (CheckpointDamaged)."""
    meta = checkpoints.read_meta(checkpoints.step_dir(out, step))
    run_dir.check_resume(meta.get("config"), json.loads(cfg.to_json()), where=out,
                         allow_changes=cfg.allow_resume_changes)
    mngr = checkpoints.manager(out, max_to_keep=None, async_save=False)
    try:
        return checkpoints.restore_state(mngr, step, like,
                                         allow_unverified=cfg.allow_unverified_checkpoint)
    finally:
        mngr.close()
