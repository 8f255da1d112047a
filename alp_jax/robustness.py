"""Honest robustness evaluation program: a suite of attacks over a list of eps, the worst
case per example, robustness curves and gradient-masking checks.

    python -m alp_jax.robustness --checkpoint_path=/tmp/digits_alp --output_dir=/tmp/rob \\
      --attacks=pgdll_16_2_10,pgdtrue_16_2_20_r5,apgdce_16_100,apgddlr_16_100,square_16_1000 \\
      --eps=2,4,8,16 --num_examples=-1

Each attack runs at each eps (``grammar.with_eps``). An example counts as robust at an eps
only if it is classified correctly clean AND under every attack of the suite at that eps
(the worst case per example); each attack's own accuracy is plain top-1 on its
adversarial inputs. Every example of the split (or of its first ``--num_examples``)
counts: the last partial batch is padded and masked. Writes ``results.json``,
``results.csv``, ``per_example.npz``, ``robustness_curve.png`` and
``adversarial_examples.png`` to ``--output_dir`` and prints a table and the masking checks.

``--attacks=autoattack`` runs AutoAttack's standard version instead
(``alp_jax.engine.autoattack``: APGD-CE, APGD-T, FAB-T, Square, each on the examples still
robust) at each eps, with the same masking probes, and also writes
``autoattack_eps{E}.json`` (RobustBench-style: eps on the [0, 1] scale, clean and robust
accuracy, the per-attack accuracies in order, the code version); no image grid.

The settings are config fields (``robustness_*``, ``attack_seed``, ``eval_batch_size``,
``num_examples``, ``split_name``; ``alp_jax.config``), built as ``alp_jax.eval`` builds its
config: the checkpoint's recorded config, then the shared flags. The engine
(``alp_jax.engine``) shards the batch over every device of every process
(``--coordinator_address``/``--num_processes``/``--process_id`` or ``--multihost``);
process 0 writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from alp_jax import engine
from alp_jax.engine import autoattack
from alp_jax.engine import suite as suite_lib

# Program flags -> config fields (layered over the checkpoint's recorded config).
FLAG_FIELDS = {
    "attacks": "robustness_attacks", "eps": "robustness_eps",
    "large_eps_attack": "robustness_large_eps_attack", "num_images": "robustness_num_images",
    "num_examples": "num_examples", "split_name": "split_name", "attack_seed": "attack_seed",
    "eval_batch_size": "eval_batch_size",
}
_REQUIRED_WITHOUT_CONFIG = ("dataset", "dataset_image_size", "moving_average_decay")


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and proves it writable, before hours of attacks."""
    probe = os.path.join(output_dir, f".write_test.{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--output_dir={output_dir!r} is not writable ({e.strerror}); "
                              "give a directory this process can write.") from None


def run_robustness(cfg: ml_collections.ConfigDict, checkpoint_path: str, output_dir: str, *,
                   log: Callable[[str], None] = print,
                   progress: Callable[[engine.Progress], None] | None = None,
                   mesh: Any = None) -> dict[str, Any]:
    """Loads the checkpoint, runs the suite and the masking probes, writes the outputs.

    ``cfg`` is a full config (``config_from_flags``, or ``default_config()`` with fields
    set). Returns ``{'result', 'checks', 'paths', 'probes', 'num_examples'}``.
    """
    from alp_jax import checkpoints, cli
    from alp_jax.model import create_model

    cli.validate_config(cfg, training=False)
    if not output_dir:
        raise ValueError("--output_dir is required.")
    preset = autoattack.is_preset(cfg.robustness_attacks)
    eps = suite_lib.parse_eps_list(cfg.robustness_eps, "robustness_eps")
    attacks = (autoattack.standard_specs(max(eps), cfg.num_classes) if preset else
               suite_lib.parse_attack_list(cfg.robustness_attacks, "robustness_attacks"))
    if jax.process_index() == 0:
        check_writable(output_dir)
    step_dir = checkpoints.resolve(checkpoint_path)
    use_ema = cfg.moving_average_decay > 0
    if use_ema:
        raw, _, _ = checkpoints.load_raw(step_dir)
        if raw.get("ema_params") is None:
            raise ValueError(
                f"moving_average_decay={cfg.moving_average_decay} asks for moving "
                f"averages, but {step_dir!r} has none; pass --moving_average_decay=-1.")
        del raw
    variables = checkpoints.load_variables(step_dir, use_ema=use_ema)
    model = create_model(cfg.model_name, cfg.num_classes, dtype=cfg.compute_dtype,
                         conv_impl=cfg.get("conv_impl", "auto"))
    from alp_jax import sharding

    mesh = mesh or sharding.make_mesh()
    batches, total = engine.split_batches(
        cfg, cli.data_dir(cfg), cfg.eval_batch_size, split=cfg.split_name,
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
    import json

    from alp_jax import provenance

    paths = {}
    for e in cascade.suite.eps_list:
        summary = autoattack.robustbench_summary(
            cascade, e, model=checkpoint, dataset=cfg.dataset, code_version=code_version(),
            architecture=cfg.model_name, split=cfg.split_name, seed=cfg.attack_seed)
        summary.setdefault("provenance", provenance.record())  # libraries and devices too
        name = f"autoattack_eps{e}.json"
        path = os.path.join(output_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths


def code_version() -> str:
    """``alp_jax VERSION`` plus the git commit (``+dirty`` when tracked files differ), from
    ``alp_jax.provenance``."""
    from alp_jax import __version__, provenance

    rev = provenance.code_revision() or {}
    commit = rev.get("commit")
    if not commit:
        return __version__
    return f"{__version__}+{commit[:12]}{'.dirty' if rev.get('dirty') else ''}"


# ---- flags ------------------------------------------------------------------------------

def define_flags(fv=None) -> None:
    """The shared flags (``cli.define_common_flags``) and this program's."""
    from absl import flags

    from alp_jax import cli

    fv = flags.FLAGS if fv is None else fv
    cli.define_common_flags(fv)
    flags.DEFINE_string("checkpoint_path", None, "Checkpoint: output dir, checkpoints dir or "
                        "step dir.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where to write results.{json,csv}, "
                        "per_example.npz and the PNGs.", flag_values=fv)
    flags.DEFINE_string("attacks", None, "Comma-separated attack specs, each run at every "
                        f"--eps (default {','.join(engine.DEFAULT_ATTACKS)}), or "
                        "'autoattack': AutoAttack's standard version, each attack on the "
                        "examples still robust.", flag_values=fv)
    flags.DEFINE_string("eps", None, "Comma-separated eps, integers on the 0..255 scale "
                        "(default 2,4,8,16).", flag_values=fv)
    flags.DEFINE_integer("num_examples", None, "Examples to attack; -1: the whole split "
                         "(every example counts).", flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", None, "Global batch (default: the checkpoint's "
                         "eval_batch_size).", flag_values=fv)
    flags.DEFINE_string("split_name", None, "train or validation.", flag_values=fv)
    flags.DEFINE_integer("attack_seed", None, "Seed of the attacks' per-example randomness.",
                         flag_values=fv)
    flags.DEFINE_string("large_eps_attack", None, "Masking check: this attack must bring "
                        "accuracy to ~0 (default apgdce_128_50).", flag_values=fv)
    flags.DEFINE_integer("num_images", None, "Examples shown in adversarial_examples.png.",
                         flag_values=fv)


def config_from_flags(fv=None) -> ml_collections.ConfigDict:
    """The config of a run: the checkpoint's recorded config, then the flags; ValueError
    naming a malformed value (checked before the checkpoint is read)."""
    from absl import flags

    from alp_jax import checkpoints, cli
    from alp_jax import eval as eval_lib
    from alp_jax.config import default_config

    fv = flags.FLAGS if fv is None else fv
    if not fv.checkpoint_path:
        raise ValueError("--checkpoint_path is required.")
    if not fv.output_dir:
        raise ValueError("--output_dir is required.")
    given = default_config()
    cli.layer_flags(given, FLAG_FIELDS, fv)
    cli.validate_evaluation_fields(given)
    step_dir = checkpoints.resolve(fv.checkpoint_path)
    meta = checkpoints.read_meta(step_dir)
    if "config" not in meta and fv.config is None:
        missing = [n for n in _REQUIRED_WITHOUT_CONFIG if getattr(fv, n) is None]
        if missing:
            raise ValueError(
                f"Checkpoint {step_dir!r} records no training config; pass "
                f"{' '.join(f'--{m}=...' for m in missing)}.")
    return eval_lib.eval_config(meta, fv, FLAG_FIELDS)


def main(argv: list[str]) -> None:
    from absl import app, flags

    from alp_jax import cli

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    fv = flags.FLAGS
    cli.maybe_initialize_distributed(fv)
    try:
        cfg = config_from_flags(fv)
        cli.validate_config(cfg, training=False)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_robustness(cfg, fv.checkpoint_path, fv.output_dir, progress=engine.ProgressBar())


def run() -> None:
    """Console entry point ``alp-robustness``."""
    from alp_jax import cli

    cli.run_program(main, define_flags, fields=FLAG_FIELDS,
                    defaults_from="the checkpoint's recorded config")


if __name__ == "__main__":
    run()
