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
import sys
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
    losses,
    objectives,
    pgd,
    provenance,
    run_dir,
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


class Preemption:
    """Turns SIGTERM into a save-and-exit at a step every process agrees on.

    One process: a SIGTERM handler sets a flag the loop polls. Several processes: JAX's
    coordination service owns SIGTERM (its preemption notifier), and
    ``multihost_utils.reached_preemption_sync_point`` returns True on every process at
    the same step, so all of them reach the collective save together. The handler stays
    installed until ``__exit__``, i.e. through the final save.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self) -> Preemption:
        if self._multi:
            return self  # the coordination service's notifier handles SIGTERM
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether to save and exit after ``step`` (call once per step, on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(int(step))
        return self._flag

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _first_step(train_step, state, batch) -> tuple[Any, Any, float]:
    """Runs the first step, logging the compile (the call returns once XLA has compiled;
    execution is asynchronous) and the step's own time; returns (state, metrics, 1/time)."""
    logging.info("Compiling the train step (the first step waits for it)...")
    t0 = time.time()
    state, metrics = train_step(state, batch["images"], batch["labels"])
    t1 = time.time()
    jax.block_until_ready(metrics)
    t2 = time.time()
    logging.info("Compiled the train step in %.1f s; the first step ran in %.2f s.",
                 t1 - t0, t2 - t1)
    return state, metrics, 1.0 / max(t2 - t1, 1e-9)


def _first_bad_loss(history: list[tuple[int, dict[str, Any]]], ceiling: float
                    ) -> tuple[int, dict] | None:
    for step, m in history:
        loss = float(m["total_loss"])
        if not np.isfinite(loss) or (ceiling > 0 and loss > ceiling):
            return step, m
    return None


def restore_or_init(cfg: ml_collections.ConfigDict, model: Any, tx: Any, mesh: Any,
                    out: str) -> tuple[ts.TrainState, str]:
    """The state to train from, and how it was obtained: ``resumed`` from the newest good
    checkpoint in ``out`` (after checking it is the same run), ``fine-tuned`` from
    ``finetune_checkpoint_path``, or ``fresh``.

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
    found = checkpoints.steps(out)
    damaged = []
    for step in reversed(found):
        step_dir = checkpoints.step_dir(out, step)
        try:
            meta = checkpoints.read_meta(step_dir)
            run_dir.check_resume(meta.get("config"), json.loads(cfg.to_json()),
                                 where=out, allow_changes=cfg.allow_resume_changes)
            mngr = checkpoints.manager(out, max_to_keep=None, async_save=False)
            try:
                like = jax.tree_util.tree_map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    abstract, state_sh)
                state = checkpoints.restore_state(mngr, step, like)
            finally:
                mngr.close()
        except checkpoints.CheckpointDamaged as e:
            moved = checkpoints.quarantine(out, step)
            damaged.append(step)
            logging.error("%s; moved it to %s and trying the previous checkpoint.", e, moved)
            continue
        if damaged:
            logging.warning("Resuming from step %d, the newest good checkpoint (damaged: %s).",
                            step, ", ".join(map(str, damaged)))
        logging.info("Resumed from %s at step %d.", step_dir, step)
        return state, "resumed"
    if damaged:
        raise checkpoints.CheckpointError(
            f"Every checkpoint in {checkpoints.checkpoint_dir(out)} is damaged (steps "
            f"{', '.join(map(str, damaged))}, moved to {checkpoints.DAMAGED_SUBDIR}/); not "
            "starting over in this directory. Use another --output_dir.")
    variables, how = None, "fresh"
    if cfg.finetune_checkpoint_path:
        fresh = ts.init_variables(model, jax.random.split(rng)[0], cfg.dataset_image_size)
        variables = finetune.finetune_variables(
            jax.device_get(fresh), cfg.finetune_checkpoint_path,
            exclude_scopes=cfg.finetune_exclude_pretrained_scopes,
            trainable_scopes=cfg.finetune_trainable_scopes,
            use_ema=cfg.moving_average_decay > 0)
        how = "fine-tuned"
    return jax.jit(fresh_state, out_shardings=state_sh)(rng, variables), how


def _checked_labels(batches, num_classes: int):
    for batch in batches:
        losses.check_labels(batch["labels"], num_classes, what="training labels")
        yield batch


def train(cfg: ml_collections.ConfigDict) -> ts.TrainState:
    """Trains until ``max_steps`` (or forever with -1); returns the final state.

    Resumes from the newest good checkpoint in ``output_dir`` (refusing a different
    run's directory); otherwise fine-tunes from ``finetune_checkpoint_path`` when given;
    otherwise starts fresh. Holds ``output_dir``'s lock for the whole run.
    """
    cli.validate_config(cfg, training=True)
    cfg = resolve_config(cfg)
    out = os.path.abspath(cfg.output_dir)
    lock = run_dir.OutputDirLock(out) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(cfg, out)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: ml_collections.ConfigDict, out: str) -> ts.TrainState:
    is_main = jax.process_index() == 0

    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh_model_axis)
    global_batch = cfg.batch_size * cfg.num_replicas
    sharding.check_global_batch(global_batch, mesh)
    local_batch = global_batch // jax.process_count()

    # ---- model, optimizer, state ----
    model = model_from_config(cfg)
    tx, _ = ts.optimizer_from_config(cfg, cfg.examples_per_epoch)
    state, how = restore_or_init(cfg, model, tx, mesh, out)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    mngr = checkpoints.manager(out, max_to_keep=cfg.keep_checkpoints, async_save=True)

    # ---- steps ----
    train_step = sharding.jit_train_step(steps.train_step_from_config(cfg, model), state_sh, mesh)
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
    batches = sharding.prefetch_to_mesh(_checked_labels(data.train_iterator(
        cfg.dataset, cli.data_dir(cfg), cfg.dataset_image_size, local_batch, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step), cfg.num_classes), mesh)

    # ---- loop ----
    prov = provenance.record()
    logging.info("Running %s.", provenance.describe(prov))
    writer = summaries.SummaryWriter(out, enabled=is_main, provenance=prov)
    if is_main:
        _write_json_atomic(os.path.join(out, "config.json"),
                           {**json.loads(cfg.to_json()), "provenance": prov})
    max_steps = cfg.max_steps
    step = start_step
    history: list[tuple[int, dict[str, Any]]] = []
    last_saved = start_step if how == "resumed" else None
    t_last, s_last, first_rate = time.time(), step + 1, float("nan")
    images_compiled = False
    weight = cfg.train_lp_weight if cfg.train_objective == "alp" else cfg.objective_weight
    logging.info("Training %s on %s: global batch %d on %d devices (%d processes), "
                 "objective %s (weight %g), attack %s, from step %d (%s) to %s.",
                 cfg.model_name, cfg.dataset, global_batch, jax.device_count(),
                 jax.process_count(), cfg.train_objective, weight, cfg.train_adv_method, step,
                 how, max_steps if max_steps >= 0 else "unlimited")

    def last_good() -> str:
        checkpoints.wait(mngr)
        if last_saved is None:
            return f"No checkpoint was saved in {checkpoints.checkpoint_dir(out)}."
        return (f"The last good checkpoint is step {last_saved} in "
                f"{checkpoints.checkpoint_dir(out)}.")

    def check_loss() -> list[tuple[int, dict[str, Any]]]:
        nonlocal history
        fetched = [(s, jax.device_get(m)) for s, m in history]
        bad = _first_bad_loss(fetched, cfg.max_loss)
        if bad is not None:
            loss = float(bad[1]["total_loss"])
            why = "" if not np.isfinite(loss) else f" (above max_loss {cfg.max_loss:g})"
            raise FloatingPointError(
                f"Loss is {loss} at step {bad[0]}{why} (loss_xent="
                f"{float(bad[1]['loss_xent'])}); stopping. {last_good()}")
        history = []
        return fetched

    def save(step: int) -> None:
        nonlocal last_saved
        check_loss()
        if last_saved == step:
            return
        try:  # save fingerprints the state once: checksums and the finiteness check
            checkpoints.save(mngr, step, state, checkpoint_meta(cfg, step), force=True)
        except checkpoints.NonFiniteState as e:
            raise FloatingPointError(
                f"NaN or infinity in {', '.join(e.groups)} after step {step} although the "
                f"loss was finite; not saving it. {last_good()}") from None
        last_saved = step

    with Preemption() as preemption:
        while max_steps < 0 or step < max_steps:
            batch = next(batches)
            if step == start_step:
                state, metrics, first_rate = _first_step(train_step, state, batch)
                t_last = time.time()  # steps/s and ETA from steady-state steps only
            else:
                state, metrics = train_step(state, batch["images"], batch["labels"])
            step += 1
            history.append((step, metrics))
            if preemption.reached(step):
                save(step)
                checkpoints.wait(mngr)
                mngr.close()
                logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
                writer.close()
                return state
            log_now = step % cfg.log_every_steps == 0 or step == max_steps
            summ_now = cfg.save_summaries_steps > 0 and step % cfg.save_summaries_steps == 0
            if log_now or summ_now:
                fetched = check_loss()
                m = fetched[-1][1]
                now = time.time()
                rate = ((step - s_last) / max(now - t_last, 1e-9) if step > s_last
                        else first_rate)  # no steady-state step timed yet
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
                        t_img = time.time()
                        clean, adv = jax.device_get(summary_images(
                            state, batch["images"], batch["labels"]))
                        if not images_compiled:  # its compile is no training time
                            t_last += time.time() - t_img
                            images_compiled = True
                        writer.images(step, "clean_images", clean, tuple(cfg.bounds))
                        writer.images(step, "adversarial_images", adv, tuple(cfg.bounds))
                    writer.flush()
            if cfg.save_model_steps > 0 and step % cfg.save_model_steps == 0:
                save(step)

        # Still inside the SIGTERM handler: a preemption notice now waits for this save.
        save(step)
        checkpoints.wait(mngr)
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
    try:
        train(cfg)
    except (run_dir.OutputDirInUse, run_dir.ResumeMismatch, checkpoints.CheckpointError,
            FloatingPointError) as e:
        # One line, then exit at once: after a failed write Orbax still holds pending
        # background writes, which would otherwise print hundreds of lines at shutdown.
        logging.flush()
        sys.stderr.write(f"FATAL: {e}\n")
        sys.stderr.flush()
        os._exit(1)


def run() -> None:
    """Console entry point ``alp-train``."""
    cli.run_program(main, define_flags)


if __name__ == "__main__":
    run()
