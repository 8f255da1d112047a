"""Training program: ``python -m alp_jax.train --config=configs/NAME.py`` (or ``alp-train``).

The original's flags still work (``--hparams="train_adv_method=pgdll_16_2_10,
train_lp_weight=0.5" --dataset=imagenet --dataset_image_size=64 --output_dir=...``).
The loop is thin: everything it runs is a pure, jit-compiled step from ``alp_jax.steps``,
sharded by ``alp_jax.sharding``; checkpoints live in ``alp_jax.checkpoints``.

Sections: config -> mesh -> model and optimizer -> state (resume / fine-tune / fresh) ->
data -> loop (summaries, checkpoints, NaN guard, preemption).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from alp_jax import (
    checkpoints,
    cli,
    data,
    finetune,
    objectives,
    pgd,
    sharding,
    steps,
    summaries,
)
from alp_jax import train_state as ts
from alp_jax.model import create_model

FLAGS = flags.FLAGS
DONE_FILE = "TRAINING_DONE.json"


def resolve_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills the fields derived from the dataset (classes, epoch size); returns a copy."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.num_classes <= 0:
        cfg.num_classes = data.num_classes(cfg.dataset)
    if cfg.examples_per_epoch <= 0:
        cfg.examples_per_epoch = data.num_examples(cfg.dataset, "train", cli.data_dir(cfg))
    return cfg


def model_from_config(cfg: Any):
    return create_model(cfg.model_name, cfg.num_classes, dtype=cfg.compute_dtype,
                        bn_group_size=cfg.bn_group_size, bn_decay=cfg.bn_decay,
                        conv_impl=cfg.get("conv_impl", "auto"))


def checkpoint_meta(cfg: Any, step: int) -> dict[str, Any]:
    return {"model_name": cfg.model_name, "num_classes": int(cfg.num_classes),
            "step": int(step), "config": json.loads(cfg.to_json())}


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _first_non_finite(history: list[tuple[int, dict[str, Any]]]) -> tuple[int, dict] | None:
    for step, m in history:
        if not np.isfinite(float(m["total_loss"])):
            return step, m
    return None


def train(cfg: ml_collections.ConfigDict) -> ts.TrainState:
    """Trains until ``max_steps`` (or forever with -1); returns the final state.

    Resumes from the newest checkpoint in ``output_dir``; otherwise fine-tunes from
    ``finetune_checkpoint_path`` when given; otherwise starts fresh.
    """
    # ---- config ----
    cli.validate_config(cfg, training=True)
    cfg = resolve_config(cfg)
    out = os.path.abspath(cfg.output_dir)
    is_main = jax.process_index() == 0

    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh_model_axis)
    global_batch = cfg.batch_size * cfg.num_replicas
    sharding.check_global_batch(global_batch, mesh)
    local_batch = global_batch // jax.process_count()

    # ---- model and optimizer ----
    model = model_from_config(cfg)
    tx, schedule = ts.optimizer_from_config(cfg, cfg.examples_per_epoch)
    rng = jax.random.PRNGKey(cfg.seed)

    def fresh_state(rng, variables=None):
        return ts.create_train_state(model, tx, rng, cfg.dataset_image_size,
                                     moving_average_decay=cfg.moving_average_decay,
                                     variables=variables)

    abstract = jax.eval_shape(fresh_state, rng)
    state_sh = sharding.state_sharding(abstract, mesh)

    # ---- state: resume, fine-tune or fresh ----
    os.makedirs(out, exist_ok=True)
    mngr = checkpoints.manager(out, max_to_keep=cfg.keep_checkpoints, async_save=True)
    latest = mngr.latest_step()
    if latest is not None:
        like = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
        state = checkpoints.restore_state(mngr, latest, like)
        logging.info("Resumed from %s at step %d.", checkpoints.checkpoint_dir(out), latest)
    else:
        variables = None
        if cfg.finetune_checkpoint_path:
            fresh = ts.init_variables(model, jax.random.split(rng)[0], cfg.dataset_image_size)
            variables = finetune.finetune_variables(
                jax.device_get(fresh), cfg.finetune_checkpoint_path,
                exclude_scopes=cfg.finetune_exclude_pretrained_scopes,
                trainable_scopes=cfg.finetune_trainable_scopes,
                use_ema=cfg.moving_average_decay > 0)
        state = jax.jit(fresh_state, out_shardings=state_sh)(rng, variables)

    # ---- steps ----
    train_step = sharding.jit_train_step(steps.make_train_step(cfg, model), state_sh, mesh)
    objective = objectives.get_objective(cfg)
    attack = pgd.parse_attack(cfg.train_adv_method)
    n_img = max(0, min(cfg.num_summary_images, local_batch))

    @jax.jit
    def summary_images(state, images, labels):
        images, labels = images[:n_img], labels[:n_img]
        key = jax.random.fold_in(state.rng, state.step)
        adv = objective.craft(model, state.variables(), images, labels, key, attack,
                              tuple(cfg.bounds))
        return images, (images if adv is None else adv)

    # ---- data ----
    start_step = int(jax.device_get(state.step))
    batches = sharding.prefetch_to_mesh(data.train_iterator(
        cfg.dataset, cli.data_dir(cfg), cfg.dataset_image_size, local_batch, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step), mesh)

    # ---- loop ----
    writer = summaries.SummaryWriter(out, enabled=is_main)
    if is_main:
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(cfg.to_json(indent=2))
    max_steps = cfg.max_steps
    step = start_step
    history: list[tuple[int, dict[str, Any]]] = []
    last_good = start_step
    t_last, s_last = time.time(), step
    weight = cfg.train_lp_weight if cfg.train_objective == "alp" else cfg.objective_weight
    logging.info("Training %s on %s: global batch %d on %d devices (%d processes), "
                 "objective %s (weight %g), attack %s, from step %d to %s.", cfg.model_name,
                 cfg.dataset, global_batch, jax.device_count(), jax.process_count(),
                 cfg.train_objective, weight, cfg.train_adv_method, step,
                 max_steps if max_steps >= 0 else "unlimited")

    def check_finite() -> list[tuple[int, dict[str, Any]]]:
        nonlocal history, last_good
        fetched = [(s, jax.device_get(m)) for s, m in history]
        bad = _first_non_finite(fetched)
        if bad is not None:
            mngr.wait_until_finished()
            raise FloatingPointError(
                f"Loss is {float(bad[1]['total_loss'])} at step {bad[0]} (loss_xent="
                f"{float(bad[1]['loss_xent'])}); stopping. The last good checkpoint is step "
                f"{mngr.latest_step()} in {checkpoints.checkpoint_dir(out)}.")
        if history:
            last_good = history[-1][0]
        history = []
        return fetched

    def save(step: int) -> None:
        check_finite()
        if mngr.latest_step() == step:
            return
        checkpoints.save(mngr, step, state, checkpoint_meta(cfg, step), force=True)

    with _Preemption() as preemption:
        while max_steps < 0 or step < max_steps:
            batch = next(batches)
            state, metrics = train_step(state, batch["images"], batch["labels"])
            step += 1
            history.append((step, metrics))
            if preemption.requested:
                save(step)
                mngr.wait_until_finished()
                logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
                writer.close()
                return state
            log_now = step % cfg.log_every_steps == 0 or step == max_steps
            summ_now = cfg.save_summaries_steps > 0 and step % cfg.save_summaries_steps == 0
            if log_now or summ_now:
                fetched = check_finite()
                m = fetched[-1][1]
                now = time.time()
                rate = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                eta = (max_steps - step) / rate if max_steps > 0 and rate > 0 else float("nan")
                if log_now and is_main:
                    terms = ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in m.items()
                                      if k.startswith("loss_"))
                    logging.info(
                        "step %d%s | %.2f steps/s | %.1f examples/s | ETA %s | loss %.4f "
                        "(%s) | lr %.5g | acc clean %.3f%s", step,
                        f"/{max_steps}" if max_steps > 0 else "", rate, rate * global_batch,
                        _format_eta(eta), m["total_loss"], terms, m["learning_rate"],
                        m["clean_accuracy"],
                        f" adv {float(m['adv_accuracy']):.3f}" if "adv_accuracy" in m else "")
                if summ_now:
                    writer.scalars(step, {**m, "global_step/sec": rate})
                    if n_img:
                        clean, adv = jax.device_get(summary_images(
                            state, batch["images"], batch["labels"]))
                        writer.images(step, "clean_images", clean, tuple(cfg.bounds))
                        writer.images(step, "adversarial_images", adv, tuple(cfg.bounds))
                    writer.flush()
            if cfg.save_model_steps > 0 and step % cfg.save_model_steps == 0:
                save(step)

    save(step)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    if is_main:
        _write_json_atomic(os.path.join(out, DONE_FILE), {"step": step})
    logging.info("Done at step %d; checkpoints in %s.", step, checkpoints.checkpoint_dir(out))
    return state


def config_from_flags(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    """The training config: --config, its overrides, then the original's flags."""
    cfg = cli.common_config(fv)
    cli.layer_flags(cfg, {name: name for name in _TRAIN_FLAGS}, fv)
    return cfg


_TRAIN_FLAGS = {
    "output_dir": (flags.DEFINE_string, "Directory for checkpoints and summaries."),
    "max_steps": (flags.DEFINE_integer, "Training steps; -1 trains forever."),
    "finetune_checkpoint_path": (flags.DEFINE_string,
                                 "Checkpoint (directory or step) to fine-tune from."),
    "finetune_exclude_pretrained_scopes": (
        flags.DEFINE_string, "Comma-separated scopes that keep their fresh initialisation."),
    "finetune_trainable_scopes": (flags.DEFINE_string,
                                  "Comma-separated scopes that train (others stay frozen)."),
}


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_common_flags(fv)
    for name, (define, help_) in _TRAIN_FLAGS.items():
        define(name, None, help_, flag_values=fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    cfg = config_from_flags()
    cli.validate_config(cfg, training=True)  # before anything is written or initialised
    cli.maybe_initialize_distributed()
    train(cfg)


def run() -> None:
    """Console entry point ``alp-train``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
