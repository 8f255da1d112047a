"""Evaluation program: ``python -m alp_jax.eval`` (or ``alp-eval``).

Once (``--eval_once`` or ``--checkpoint_path``) or continuously (each new checkpoint in
``--train_dir``, polling every ``--eval_interval_secs`` until training has finished).
Top-1 accuracy and top-5 recall on clean or attacked (``--adv_method``) inputs, with the
moving averages when ``--moving_average_decay`` > 0. Summaries go to
``train_dir/eval_name``; ``--output_file`` appends ``eval_name,top1,top5``.

When the checkpoint was written by ``alp_jax.train`` its recorded config supplies the
model, dataset and image size; flags given on the command line override it. The numbers
come from the evaluation engine (``alp_jax.engine``): sharded over all devices and
processes, attack randomness per example (``attack_seed``); the last partial batch is
dropped as in the original (``eval_drop_remainder=False`` counts every example).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging

from alp_jax import checkpoints, cli, data, engine, provenance, sharding, summaries
from alp_jax.attacks import grammar
from alp_jax.model import create_model

FLAGS = flags.FLAGS
DONE_FILE = "TRAINING_DONE.json"


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
    batch = cfg.eval_batch_size
    if batch % jax.process_count():
        raise ValueError(f"eval_batch_size {batch} does not divide by the "
                         f"{jax.process_count()} processes.")
    drop = cfg.get("eval_drop_remainder", True) if drop_remainder is None else drop_remainder
    seed = cfg.get("attack_seed", 0) if seed is None else seed
    batches, total = engine.split_batches(cfg, cli.data_dir(cfg), batch, split=split,
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


_EVAL_FIELDS = ("adv_method", "eval_name", "split_name", "num_examples", "eval_interval_secs")


def eval_config(meta: dict[str, Any], fv: flags.FlagValues = FLAGS,
                fields: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """The eval config: the checkpoint's recorded config (unless --config is given), then
    the command-line flags (``fields``: program flag -> config field, default the eval
    program's); model name and classes come from the checkpoint. ``alp_jax.robustness``
    builds its config here too."""
    if fv.config is None and "config" in meta:
        from alp_jax.config import default_config

        recorded = default_config()
        with recorded.ignore_type():
            for k, v in meta["config"].items():
                if k in recorded:
                    recorded[k] = tuple(v) if k == "bounds" else v
        cfg = recorded
    else:
        cfg = cli.base_config(fv)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cli.layer_flags(cfg, {n: n for n in cli.COMMON_FLAGS}, fv)
    if fv.hparams:
        from alp_jax.config import apply_hparams

        apply_hparams(cfg, fv.hparams)
    cli.layer_flags(cfg, {n: n for n in _EVAL_FIELDS} if fields is None else fields, fv)
    with cfg.ignore_type():
        for key in ("model_name", "num_classes"):
            if key in meta and getattr(fv, key, None) is None:
                cfg[key] = meta[key]
    if cfg.num_classes <= 0:
        cfg.num_classes = data.num_classes(cfg.dataset)
    return cfg


def evaluate_checkpoint(step_dir: str, cfg: Any, summary_dir: str | None,
                        output_file: str | None = None) -> dict[str, float]:
    """Evaluates one checkpoint directory; writes summaries and the CSV row."""
    meta = checkpoints.read_meta(step_dir)
    use_ema = cfg.moving_average_decay > 0
    raw, _, _ = checkpoints.load_raw(step_dir)
    if use_ema and raw.get("ema_params") is None:
        raise ValueError(
            f"--moving_average_decay={cfg.moving_average_decay} asks for moving averages, "
            f"but {step_dir!r} has none (e.g. an imported release checkpoint); pass "
            "--moving_average_decay=-1.")
    variables = checkpoints.load_variables(step_dir, use_ema=use_ema)
    model = create_model(cfg.model_name, cfg.num_classes, dtype=cfg.compute_dtype,
                         bn_decay=cfg.bn_decay, conv_impl=cfg.get("conv_impl", "auto"))
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


def continuous_eval(train_dir: str, interval: float, once: bool,
                    output_file: str | None = None) -> None:
    """Evaluates the newest checkpoint whenever a new one appears, until training ends."""
    evaluated: set[int] = set()
    while True:
        step = checkpoints.latest_step(train_dir)
        if step is not None and step not in evaluated:
            step_dir = os.path.join(checkpoints.checkpoint_dir(train_dir), str(step))
            cfg = eval_config(checkpoints.read_meta(step_dir))
            cli.validate_config(cfg, training=False)
            evaluate_checkpoint(step_dir, cfg, os.path.join(train_dir, cfg.eval_name),
                                output_file)
            evaluated.add(step)
            if once:
                return
        elif once and step is None:
            raise FileNotFoundError(f"No checkpoint in {train_dir!r} to evaluate.")
        done = _done_step(train_dir)
        if done is not None and done in evaluated:
            logging.info("Training finished at step %d; evaluation done.", done)
            return
        time.sleep(interval)


_FLAGS = {
    "train_dir": (flags.DEFINE_string, "Training output directory to evaluate."),
    "checkpoint_path": (flags.DEFINE_string, "One checkpoint (output dir, checkpoints dir or "
                        "step dir) to evaluate once."),
    "output_file": (flags.DEFINE_string, "CSV file to append 'eval_name,top1,top5' to."),
    "eval_name": (flags.DEFINE_string, "Subdirectory of train_dir for eval summaries."),
    "adv_method": (flags.DEFINE_string, "clean or an attack spec, e.g. pgdll_16_2_10."),
    "split_name": (flags.DEFINE_string, "train or validation."),
    "eval_interval_secs": (flags.DEFINE_integer, "Polling interval (continuous mode)."),
    "num_examples": (flags.DEFINE_integer, "Examples to evaluate; -1: the whole split."),
    "trainable_scopes": (flags.DEFINE_string,
                         "Accepted for compatibility with the original; our checkpoints store "
                         "moving averages of every variable, so it is not needed."),
}


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_common_flags(fv)
    for name, (define, help_) in _FLAGS.items():
        define(name, None, help_, flag_values=fv)
    flags.DEFINE_bool("eval_once", False, "Evaluate the newest checkpoint once and exit.",
                      flag_values=fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if not FLAGS.checkpoint_path and not FLAGS.train_dir:
        raise app.UsageError("Pass --train_dir (continuous or --eval_once) or --checkpoint_path.")
    cli.maybe_initialize_distributed()
    if FLAGS.checkpoint_path:
        step_dir = checkpoints.resolve(FLAGS.checkpoint_path)
        cfg = eval_config(checkpoints.read_meta(step_dir))
        cli.validate_config(cfg, training=False)
        summary = os.path.join(FLAGS.train_dir, cfg.eval_name) if FLAGS.train_dir else None
        evaluate_checkpoint(step_dir, cfg, summary, FLAGS.output_file)
        return
    if not os.path.isdir(FLAGS.train_dir):
        raise FileNotFoundError(f"--train_dir={FLAGS.train_dir!r} is not a directory.")
    interval = FLAGS.eval_interval_secs if FLAGS.eval_interval_secs is not None \
        else cli.base_config().eval_interval_secs
    continuous_eval(FLAGS.train_dir, interval, FLAGS.eval_once, FLAGS.output_file)


def run() -> None:
    """Console entry point ``alp-eval``."""
    cli.run_program(main, define_flags, fields={n: n for n in _EVAL_FIELDS},
                    defaults_from="the checkpoint's recorded config")


if __name__ == "__main__":
    run()
