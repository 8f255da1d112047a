"""Evaluating checkpoints: top-1 / top-5 under one attack or several (``evaluate``,
``evaluate_checkpoint``, ``continuous_eval``, what ``alp_jax.eval`` runs) and the
robustness suite with its masking checks and outputs (``run_robustness``, what
``alp_jax.robustness`` runs). Both load a checkpoint the same way (``load_for_eval``) and
compute on the evaluation engine (``alp_jax.engine``): sharded over every device and
process, attack randomness per example (``attack_seed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from alp_jax import checkpoints, cli, data, engine, provenance, run_dir, sharding, summaries
from alp_jax.attacks import grammar
from alp_jax.engine import autoattack
from alp_jax.engine import suite as suite_lib
from alp_jax.errors import ConfigError
from alp_jax.model import model_from_config

DONE_FILE = "TRAINING_DONE.json"


def check_before_load(cfg: Any, meta: dict[str, Any], step_dir: str,
                      process_count: int) -> None:
    """ConfigError for what is known wrong before a checkpoint's state is read: an
    ``eval_batch_size`` that does not split over ``process_count`` processes, or a
    ``model_name`` / ``num_classes`` other than the ones the checkpoint's ``meta`` records."""
    try:
        engine.core.padded_local_size(cfg.eval_batch_size, 1, process_count)
    except ValueError as e:  # the engine owns the rule; here it becomes the flag's error
        raise ConfigError(f"--eval_batch_size={cfg.eval_batch_size}: {e} Pass a multiple "
                          f"of {process_count}.") from None
    recorded = meta.get("model_name")
    if recorded is not None and cfg.model_name != recorded:
        raise ConfigError(
            f"model_name {cfg.model_name} does not match checkpoint {step_dir}, which "
            f"holds a {recorded}; leave model_name unset to use the checkpoint's.")
    classes = meta.get("num_classes")
    if classes is not None and cfg.num_classes > 0 and cfg.num_classes != classes:
        raise ConfigError(
            f"num_classes {cfg.num_classes} does not match checkpoint {step_dir}, which "
            f"has {classes} classes; leave num_classes unset to use the checkpoint's.")


def _load(step_dir: str, cfg: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, variables, meta) of a checkpoint step; see ``load_for_eval``."""
    meta = checkpoints.read_meta(step_dir)
    check_before_load(cfg, meta, step_dir, jax.process_count())
    use_ema = cfg.moving_average_decay > 0
    tree, _, step_dir = checkpoints.load_raw(  # read (and verified) once
        step_dir, allow_unverified=cfg.allow_unverified_checkpoint)
    if use_ema and tree.get("ema_params") is None:
        raise ValueError(
            f"--moving_average_decay={cfg.moving_average_decay} asks for moving "
            f"averages, but {step_dir!r} has none (e.g. an imported release "
            "checkpoint); pass --moving_average_decay=-1.")
    variables = checkpoints.variables_from_tree(tree, step_dir, use_ema=use_ema)
    return model_from_config(cfg), variables, meta


def load_for_eval(step_dir: str, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """(model, variables) of a checkpoint step: the moving averages when
    ``cfg.moving_average_decay`` > 0 (ValueError if the checkpoint has none).

    ``check_before_load`` runs first, so a batch that does not split over the processes
    or a model other than the recorded one is refused before the state is read; a
    checkpoint without checksums is refused unless ``cfg.allow_unverified_checkpoint``.
    """
    model, variables, _ = _load(step_dir, cfg)
    return model, variables


def evaluate(model: Any, variables: dict[str, Any], cfg: Any, *, attack: str = "clean",
             num_examples: int = -1, split: str = "validation", seed: int | None = None,
             mesh: Any | None = None, progress: bool = True,
             drop_remainder: bool | None = None) -> dict[str, float]:
    """Top-1 / top-5 of ``variables`` on ``cfg.dataset`` under ``attack`` (one spec).

    Runs on the evaluation engine (``alp_jax.engine``): sharded over every device, attack
    keys per example (``seed``, default ``cfg.attack_seed``). With ``drop_remainder``
    (default ``cfg.eval_drop_remainder``, True) the last partial batch of the split is
    dropped, as in the original; False pads and masks it so that every example counts.
    """
    return evaluate_specs(model, variables, cfg, [attack], num_examples=num_examples,
                          split=split, seed=seed, mesh=mesh, progress=progress,
                          drop_remainder=drop_remainder)[attack]


def evaluate_specs(model: Any, variables: dict[str, Any], cfg: Any, attacks: list[str], *,
                   num_examples: int = -1, split: str = "validation", seed: int | None = None,
                   mesh: Any | None = None, progress: bool = True,
                   drop_remainder: bool | None = None) -> dict[str, dict[str, float]]:
    """``{attack: {'top1', 'top5', 'count'}}`` for several specs in one pass over the data
    (the clean pass is shared); see ``evaluate``."""
    mesh = mesh or sharding.make_mesh()
    batch = cfg.eval_batch_size  # the engine checks it splits over the processes
    drop = cfg.get("eval_drop_remainder", True) if drop_remainder is None else drop_remainder
    seed = cfg.get("attack_seed", 0) if seed is None else seed
    batches, total = engine.split_batches(cfg, data.data_dir(cfg), batch, split=split,
                                          num_examples=num_examples, drop_remainder=drop,
                                          devices=mesh.shape[sharding.DATA])
    if total == 0:
        raise ValueError(f"No examples evaluated: eval_batch_size {batch} is larger than "
                         f"num_examples {num_examples} or the split, and the last partial "
                         "batch is dropped (eval_drop_remainder=True, as the original).")
    if progress:
        logging.info("Evaluating %d examples of %s/%s (%s) under %s.", total, cfg.dataset, split,
                     "last partial batch dropped, as the original" if drop
                     else "every example, the last batch padded", ", ".join(attacks))
    last = [0.0]

    def report(p: engine.core.Progress) -> None:
        if time.time() - last[0] > 10 or p.done >= total:
            last[0] = time.time()
            for a in attacks:
                s = grammar.canonical(a)
                logging.info("[%s] %d/%d examples | top-1 %.4f | %.1f examples/s", a, p.done,
                             total, p.correct[s] / max(p.done, 1), p.done / max(p.elapsed, 1e-9))

    r = engine.evaluate_specs(engine.ModelLogits(model), variables, batches, attacks,
                              num_classes=cfg.num_classes if cfg.num_classes > 0 else
                              data.num_classes(cfg.dataset), seed=seed,
                              bounds=tuple(cfg.bounds), mesh=mesh, total=total,
                              progress=report if progress else None)
    out = {}
    for a in attacks:
        s = grammar.canonical(a)
        n = r.num_examples
        out[a] = {"top1": float(r.correct[s].mean()), "top5": float(r.top5[s].mean()),
                  "count": n}
    return out


def evaluate_checkpoint(step_dir: str, cfg: Any, summary_dir: str | None,
                        output_file: str | None = None) -> dict[str, float]:
    """Evaluates one checkpoint directory; writes summaries and the CSV row."""
    return _evaluate_loaded(step_dir, _load(step_dir, cfg), cfg, summary_dir, output_file)


def _evaluate_loaded(step_dir: str, loaded: tuple[Any, dict[str, Any], dict[str, Any]],
                     cfg: Any, summary_dir: str | None,
                     output_file: str | None) -> dict[str, float]:
    model, variables, meta = loaded
    result = evaluate(model, variables, cfg, attack=cfg.adv_method,
                      num_examples=cfg.num_examples, split=cfg.split_name)
    base = os.path.basename(step_dir)
    step = int(meta.get("step", base if base.isdigit() else 0))
    logging.info("%s step %d, %s on %s/%s: top-1 %.4f, top-5 %.4f (%d examples)",
                 step_dir, step, cfg.adv_method, cfg.dataset, cfg.split_name, result["top1"],
                 result["top5"], result["count"])
    if jax.process_index() == 0:
        if summary_dir:
            # One writer per evaluation: each record says which code and devices computed it.
            w = summaries.SummaryWriter(summary_dir, provenance=provenance.record())
            w.scalars(step, {"eval/Accuracy": result["top1"], "eval/Recall_5": result["top5"]})
            w.close()
        if output_file:
            os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
            with open(output_file, "a") as f:
                f.write(f"{cfg.eval_name},{result['top1']:.6f},{result['top5']:.6f}\n")
    return result


def _done_step(train_dir: str) -> int | None:
    path = os.path.join(train_dir, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["step"])


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process must call this)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _from_process_zero(step: int | None, done: int | None) -> tuple[int | None, int | None]:
    """Process 0's view of (newest step, finished step), so that every process of a
    cluster evaluates the same checkpoint and stops at the same time."""
    if jax.process_count() == 1:
        return step, done
    from jax.experimental import multihost_utils

    got = multihost_utils.broadcast_one_to_all(
        np.array([-1 if step is None else step, -1 if done is None else done], np.int64))
    return tuple(None if int(v) < 0 else int(v) for v in got)


def _load_unless_rotated(step_dir: str, config_for: Callable[[dict[str, Any]], Any]
                         ) -> tuple[Any, tuple[Any, dict[str, Any], dict[str, Any]]] | None:
    """(config, loaded) of a checkpoint step, or None when training's rotation removed the
    step while it was being read (agreed by every process). A step still present but
    unreadable is damage: CheckpointDamaged naming it."""
    try:
        cfg = config_for(checkpoints.read_meta(step_dir))
        cli.validate_config(cfg, training=False)
        loaded, error = (cfg, _load(step_dir, cfg)), None
    except (checkpoints.CheckpointDamaged, checkpoints.CheckpointUnverified,
            FileNotFoundError) as e:  # integrity deleted first reads as "no checksums"
        loaded, error = None, e
    gone = error is not None and checkpoints.vanished(step_dir)
    if _any_process(gone):
        return None
    if error is not None:
        raise error
    return loaded


_IDLE_POLL_S = 1.0


def continuous_eval(train_dir: str, config_for: Callable[[dict[str, Any]], Any],
                    interval: float, once: bool, output_file: str | None = None) -> None:
    """Evaluates the newest checkpoint whenever a new one appears, until training ends.

    ``config_for(meta)`` gives the config of a checkpoint from its recorded meta (the
    program: its recorded config with the command line on top). A checkpoint that
    training's rotation (``keep_checkpoints``) removes while it is being read is skipped
    with one log line and the newest one present taken next; one still there but
    unreadable is reported as damaged (CheckpointDamaged, naming the step)."""
    evaluated: set[int] = set()
    while True:
        step, done = _from_process_zero(checkpoints.latest_step(train_dir),
                                        _done_step(train_dir))
        new = step is not None and step not in evaluated
        if new:
            step_dir = checkpoints.step_dir(train_dir, step)
            loaded = _load_unless_rotated(step_dir, config_for)
            if loaded is None:
                logging.warning("Checkpoint %s was removed by training's checkpoint rotation "
                                "while being read; skipping it for the newest one.", step_dir)
                continue
            cfg, model_variables_meta = loaded
            _evaluate_loaded(step_dir, model_variables_meta, cfg,
                             os.path.join(train_dir, cfg.eval_name), output_file)
            evaluated.add(step)
            if once:
                return
        elif once and step is None:
            raise FileNotFoundError(f"No checkpoint in {train_dir!r} to evaluate.")
        if done is not None and done in evaluated:
            logging.info("Training finished at step %d; evaluation done.", done)
            return
        # Nothing new: poll at most once a second (--eval_interval_secs=0 would spin a core
        # that training beside it needs).
        time.sleep(interval if new else max(interval, _IDLE_POLL_S))


def run_robustness(cfg: ml_collections.ConfigDict, checkpoint_path: str, output_dir: str, *,
                   log: Callable[[str], None] = print,
                   progress: Callable[[engine.Progress], None] | None = None,
                   mesh: Any = None) -> dict[str, Any]:
    """Loads the checkpoint, runs the suite and the masking probes, writes the outputs.

    ``cfg`` is a full config (``config_from_flags``, or ``default_config()`` with fields
    set). Returns ``{'result', 'checks', 'paths', 'probes', 'num_examples'}``.

    Process 0 holds ``output_dir``'s lock (``run_dir.OutputDirLock``, as training does)
    for the whole run: a second run into the same directory is refused at once, and an
    unwritable one is refused before any attack (OutputDirNotWritable).
    """
    cli.validate_config(cfg, training=False)
    if not output_dir:
        raise ValueError("--output_dir is required.")
    lock = (run_dir.OutputDirLock(output_dir) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _run_robustness(cfg, checkpoint_path, output_dir, log=log, progress=progress,
                               mesh=mesh)


def _run_robustness(cfg: ml_collections.ConfigDict, checkpoint_path: str, output_dir: str, *,
                    log: Callable[[str], None],
                    progress: Callable[[engine.Progress], None] | None,
                    mesh: Any) -> dict[str, Any]:
    preset = autoattack.is_preset(cfg.robustness_attacks)
    eps = suite_lib.parse_eps_list(cfg.robustness_eps, "robustness_eps")
    attacks = (autoattack.standard_specs(max(eps), cfg.num_classes) if preset else
               suite_lib.parse_attack_list(cfg.robustness_attacks, "robustness_attacks"))
    step_dir = checkpoints.resolve(checkpoint_path)
    use_ema = cfg.moving_average_decay > 0
    model, variables = load_for_eval(step_dir, cfg)
    mesh = mesh or sharding.make_mesh()
    batches, total = engine.split_batches(
        cfg, data.data_dir(cfg), cfg.eval_batch_size, split=cfg.split_name,
        num_examples=cfg.num_examples, devices=mesh.shape[sharding.DATA])
    probes = engine.default_probes(attacks, large_eps_attack=cfg.robustness_large_eps_attack)
    log(f"Checkpoint {step_dir} ({cfg.model_name}, moving averages "
        f"{'on' if use_ema else 'off'}), {cfg.dataset} {cfg.split_name} at "
        f"{cfg.dataset_image_size}px: all {total} examples in global batches of "
        f"{cfg.eval_batch_size} (the last one padded), over {mesh.shape[sharding.DATA]} "
        f"devices in {jax.process_count()} process(es).")
    log(("AutoAttack (standard): " if preset else "Attacks ")
        + f"{', '.join(attacks)} at eps {', '.join(map(str, eps))}"
        + (", each on the examples still robust" if preset else "")
        + f"; masking probes {', '.join(probes.specs)}.")
    t0 = time.time()
    cascade = None
    if preset:
        cascade = autoattack.evaluate_autoattack(
            engine.ModelLogits(model), batches, eps, variables=variables,
            num_classes=cfg.num_classes, seed=cfg.attack_seed, bounds=tuple(cfg.bounds),
            mesh=mesh, extra_specs=probes.specs, total=total,
            progress=progress if jax.process_index() == 0 else None,
            log=log if jax.process_index() == 0 else None)
        result = cascade.suite
    else:
        result = engine.evaluate_suite(
            engine.ModelLogits(model), batches, attacks, eps, variables=variables,
            num_classes=cfg.num_classes, seed=cfg.attack_seed, bounds=tuple(cfg.bounds),
            mesh=mesh, extra_specs=probes.specs, num_images=cfg.robustness_num_images,
            total=total, progress=progress if jax.process_index() == 0 else None)
    if result.num_examples != total:
        raise RuntimeError(f"Evaluated {result.num_examples} examples, expected {total}.")
    seconds = time.time() - t0
    checks = engine.masking_checks(result, probes)
    info = {"checkpoint": step_dir, "split": cfg.split_name, "attack_seed": cfg.attack_seed,
            "seconds": round(seconds, 1),
            "examples_per_second": round(result.num_examples / max(seconds, 1e-9), 3),
            "devices": int(mesh.shape[sharding.DATA]), "processes": jax.process_count(),
            "eval_batch_size": cfg.eval_batch_size, "probes": dict(
                large_eps=probes.large_eps, base=probes.base,
                more_iterations=probes.more_iterations, more_restarts=probes.more_restarts),
            **{k: cfg[k] for k in ("model_name", "num_classes", "dataset",
                                   "dataset_image_size", "moving_average_decay",
                                   "compute_dtype")},
            "bounds": list(cfg.bounds)}
    if cascade is not None:
        info["autoattack"] = {"version": "standard", "cumulative_columns": True, "stages": {
            str(e): [dict(name=st.name, spec=st.spec, attacked=st.attacked,
                          robust_after=st.robust_after, seconds=st.seconds) for st in stages]
            for e, stages in cascade.stages.items()}}
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        paths = engine.write_outputs(output_dir, result, checks, info, tuple(cfg.bounds))
        if cascade is not None:
            paths.update(write_autoattack_summaries(output_dir, cascade, cfg, step_dir))
        log(engine.format_table(result))
        if cascade is not None:
            log("AutoAttack's columns are cumulative: robust clean and under that attack and "
                "every one before it (AutoAttack's 'robust accuracy after'); the last is the "
                f"robust accuracy. Wrote autoattack_eps{{E}}.json for eps "
                f"{', '.join(map(str, eps))}.")
        log(engine.format_checks(checks))
        compile_s = sum(result.compile_seconds.values())
        attack_s = sum(result.seconds.values())
        log(f"{result.num_examples} examples in {seconds:.0f}s "
            f"({result.num_examples / max(seconds, 1e-9):.2f} examples/s): compile "
            f"{compile_s:.0f}s, attacks {attack_s:.0f}s. Wrote {', '.join(paths.values())}.")
    return {"result": result, "checks": checks, "paths": paths, "probes": probes,
            "num_examples": total, "autoattack": cascade}


def write_autoattack_summaries(output_dir: str, cascade: autoattack.AutoAttackResult,
                               cfg: ml_collections.ConfigDict,
                               checkpoint: str) -> dict[str, str]:
    """``autoattack_eps{E}.json`` per eps: the RobustBench-style summary of the cascade."""
    paths = {}
    for e in cascade.suite.eps_list:
        summary = autoattack.robustbench_summary(
            cascade, e, model=checkpoint, dataset=cfg.dataset,
            code_version=provenance.code_version(), architecture=cfg.model_name,
            split=cfg.split_name, seed=cfg.attack_seed)
        summary.setdefault("provenance", provenance.record())  # libraries and devices too
        name = f"autoattack_eps{e}.json"
        path = os.path.join(output_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths


