"""Training a config: ``train(cfg)``, the loop that ``alp_jax.train`` (``alp-train``) runs.

The loop is assembled from named pieces, each in its own module: the state to start from
(``alp_jax.restore``: resume | fine-tune | fresh), the jitted, sharded step
(``alp_jax.steps`` through ``alp_jax.sharding``), what the run reports
(``alp_jax.monitor``: history, loss guard, logs, summaries), preemption
(``alp_jax.preemption``) and checkpoints (``alp_jax.checkpoints.Checkpointer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

from alp_jax import (
    checkpoints,
    cli,
    data,
    losses,
    monitor,
    objectives,
    provenance,
    restore,
    run_dir,
    sharding,
    steps,
    summaries,
)
from alp_jax import train_state as ts
from alp_jax.config import resolve_config
from alp_jax.model import model_from_config
from alp_jax.preemption import Preemption

DONE_FILE = "TRAINING_DONE.json"


def train(cfg: ml_collections.ConfigDict) -> ts.TrainState:
    """Trains ``cfg`` until ``max_steps`` (or forever with -1); returns the final state.

    Resumes from the newest good checkpoint in ``output_dir`` (refusing a different
    run's directory); otherwise fine-tunes from ``finetune_checkpoint_path`` when given;
    otherwise starts fresh. Holds ``output_dir``'s lock (process 0) for the whole run.
    """
    cli.validate_config(cfg, training=True)
    cfg = resolve_config(cfg)
    out = os.path.abspath(cfg.output_dir)
    is_main = jax.process_index() == 0
    with run_dir.OutputDirLock(out) if is_main else contextlib.nullcontext():
        mesh = sharding.make_mesh(cfg.mesh_model_axis)
        global_batch = cfg.batch_size * cfg.num_replicas
        sharding.check_global_batch(global_batch, mesh)
        model = model_from_config(cfg)
        tx, schedule = ts.optimizer_from_config(cfg)
        state, how = restore.restore_or_init(cfg, model, tx, mesh, out)
        train_step = sharding.jit_train_step(
            steps.train_step_from_config(cfg, model, tx, schedule),
            jax.tree_util.tree_map(lambda x: x.sharding, state), mesh)
        start = step = int(jax.device_get(state.step))
        batches = training_batches(cfg, mesh, start)
        prov = provenance.record()
        logging.info("Running %s.", provenance.describe(prov))
        if is_main:
            write_json_atomic(os.path.join(out, "config.json"),
                              {**json.loads(cfg.to_json()), "provenance": prov})
        ckpt = checkpoints.Checkpointer(out, keep=cfg.keep_checkpoints,
                                        meta=functools.partial(checkpoint_meta, cfg),
                                        last_saved=start if how == "resumed" else None)
        mon = make_monitor(cfg, model, out, prov, last_good=ckpt.last_good)
        logging.info("Training %s on %s: global batch %d on %d devices (%d processes), "
                     "objective %s (weight %g), attack %s, from step %d (%s) to %s.",
                     cfg.model_name, cfg.dataset, global_batch, jax.device_count(),
                     jax.process_count(), cfg.train_objective,
                     cfg[objectives.weight_field(cfg.train_objective)], cfg.train_adv_method,
                     start, how, cfg.max_steps if cfg.max_steps >= 0 else "unlimited")
        preempted = False
        with Preemption() as preemption, ckpt:
            while cfg.max_steps < 0 or step < cfg.max_steps:
                batch = next(batches)
                if step == start:  # logs the compile; steps/s count from the next step
                    state, metrics = mon.first_step(train_step, state, batch)
                else:
                    state, metrics = train_step(state, batch["images"], batch["labels"])
                step += 1
                mon.record(step, metrics)
                if preemption.reached(step):
                    preempted = True
                    break
                mon.report(step, state, batch)
                if cfg.save_model_steps > 0 and step % cfg.save_model_steps == 0:
                    mon.check_loss()
                    ckpt.save(step, state)
            # Still inside the SIGTERM handler: a preemption notice now waits for this save.
            mon.check_loss()
            ckpt.save(step, state)
        mon.writer.close()
    if preempted:
        logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
        return state
    if is_main:
        write_json_atomic(os.path.join(out, DONE_FILE), {"step": step})
    logging.info("Done at step %d; checkpoints in %s.", step, checkpoints.checkpoint_dir(out))
    return state


def training_batches(cfg: ml_collections.ConfigDict, mesh: Any, start_step: int
                     ) -> Iterator[dict[str, jax.Array]]:
    """This process's share of each global batch from ``start_step`` on, labels checked
    on the host, prefetched onto ``mesh``."""
    local_batch = cfg.batch_size * cfg.num_replicas // jax.process_count()
    batches = data.train_iterator(
        cfg.dataset, data.data_dir(cfg), cfg.dataset_image_size, local_batch, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step)
    return sharding.prefetch_to_mesh(_checked_labels(batches, cfg.num_classes), mesh)


def _checked_labels(batches, num_classes: int):
    for batch in batches:
        losses.check_labels(batch["labels"], num_classes, what="training labels")
        yield batch


def make_monitor(cfg: ml_collections.ConfigDict, model: Any, out: str,
                 prov: dict[str, Any], *, last_good) -> monitor.Monitor:
    """The run's Monitor: summaries in ``out`` (process 0), and summary images of
    ``num_summary_images`` examples of this process's batch crafted as the step does."""
    is_main = jax.process_index() == 0
    global_batch = cfg.batch_size * cfg.num_replicas
    n_img = max(0, min(cfg.num_summary_images, global_batch // jax.process_count()))
    images_fn = monitor.summary_images_fn(
        model, objectives.get_objective(cfg), cfg.train_adv_method, tuple(cfg.bounds),
        n_img) if n_img else None
    return monitor.Monitor(
        summaries.SummaryWriter(out, enabled=is_main, provenance=prov),
        max_steps=cfg.max_steps, global_batch=global_batch, log_every=cfg.log_every_steps,
        summary_every=cfg.save_summaries_steps, max_loss=cfg.max_loss, last_good=last_good,
        images_fn=images_fn, bounds=tuple(cfg.bounds), is_main=is_main)


def checkpoint_meta(cfg: Any, step: int) -> dict[str, Any]:
    """What every checkpoint records besides the state: model, classes, step, config."""
    return {"model_name": cfg.model_name, "num_classes": int(cfg.num_classes),
            "step": int(step), "config": json.loads(cfg.to_json())}


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
