"""Throughput of the clean step, the PGD attack alone and the full ALP step (issue 11).

Needs only jax, flax and optax (no TensorFlow, no ml_collections). For every
configuration (model x batch x attack x part) prints one JSON line, then a table::

    python benchmarks/train_step.py --model resnet_v2_50 --num_classes 200 \
        --image_size 64 --batch 32 --attack pgdll_16_2_10 --lp_weight 0.5 --steps 10

What is timed is what the programs run: every function is built through the library's
public builders (``train_state.make_schedule`` / ``make_optimizer``,
``objectives.make_objective('alp', ...)``, ``steps.make_train_step``; the attack part is
the objective's ``craft``) with the programs' defaults: the original's hyperparameters
from ``alp_jax.config.HPARAMS`` (RMSProp, lr 0.045, exp_decay, weight decay 1e-4,
label smoothing 0.1), ``conv_impl=auto`` (im2col on CPU, ``lax`` on GPU/TPU), moving
average decay 0.9999, bounds (-1, 1), and ImageNet's 1,281,167 examples per epoch.

What each figure is:

- ``images_per_s``: ``batch / median step time``; for the ALP step a training example
  is one clean image (its adversarial twin is part of the same example).
- ``compile_s``: trace + lower + XLA compile of the jitted function.
- ``flops``: XLA's ``cost_analysis()`` of the function lowered for the CPU (HLO before
  backend passes: on GPU, compiled convolutions become cuDNN calls it does not count),
  always of the reference path (the model with ``lax`` convolutions), whatever
  ``--model_conv_impl`` says. XLA
  counts a loop body once, so for PGD attacks ``(NITER - 1) x`` the cost of one attack
  iteration lowered on its own is added.
  ``flops_analytic`` counts 2 x multiply-adds of every convolution and matmul in the
  jaxpr (loop bodies times their trip count): a cross-check, ~0.50 GFLOP per image
  forward for ResNet-v2-50 at 64x64 with 200 classes.
- ``share_of_peak``: achieved FLOP/s over a large matmul timed in the same process
  (float32 on CPU, bfloat16 on GPU/TPU).
- memory: ``device_peak_bytes`` from ``device.memory_stats()`` (null where the backend
  has none, e.g. CPU; it is the process-wide peak so far); ``xla_bytes`` is what XLA's
  buffer assignment gives the executable (arguments + outputs + temporaries - aliased),
  available everywhere; ``process_peak_rss_bytes`` is this process's peak resident
  memory so far (CPU: an upper bound that includes earlier configurations).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``alp_jax`` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("clean", "attack", "alp")
PGD_METHODS = ("pgd", "pgdll", "pgdrnd")


# The programs' defaults that are not hyperparameters (alp_jax.config.default_config()).
BOUNDS = (-1.0, 1.0)
EXAMPLES_PER_EPOCH = 1_281_167  # ImageNet's training split
# The original's hyperparameters the benchmark exposes as flags, defaults from
# alp_jax.config.HPARAMS (lr_list and lr_decay_epochs, the ``step`` schedule's, too).
HP_FLAGS = ("label_smoothing", "weight_decay", "optimizer", "momentum", "rmsprop_decay",
            "rmsprop_epsilon", "lr_schedule", "learning_rate", "lr_decay_factor",
            "lr_num_epochs_per_decay")


# ---- FLOP counting ------------------------------------------------------------------------

def _cost_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def cpu_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's FLOP count of ``fn`` lowered for the CPU from the shapes of ``args``.

    HLO cost analysis of the lowered module, before any backend optimisation: nothing is
    compiled or allocated, convolutions are still convolutions (on GPU they would become
    cuDNN custom calls that the analysis does not count), and a loop body counts once.
    """
    import jax

    cpu = jax.devices("cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(cpu)
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    return _cost_flops(jax.jit(fn).lower(*specs))


def _valid_taps(n: int, k: int, out: int, stride: int, pad_lo: int, lhs_dil: int,
                rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read a real input
    element, not padding or a hole of an input dilation."""
    last = (n - 1) * lhs_dil
    count = 0
    for o in range(out):
        for t in range(k):
            pos = o * stride + t * rhs_dil - pad_lo
            count += 0 <= pos <= last and pos % lhs_dil == 0
    return count


def _conv_macs(eqn: Any) -> float:
    """Multiply-adds of a convolution, padding and dilation holes excluded (as XLA counts)."""
    prm = eqn.params
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = prm["dimension_numbers"]
    macs = float(out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]])
    for i, (ld, rd) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], strict=True)):
        macs *= _valid_taps(lhs[ld], rhs[rd], out[dn.out_spec[2 + i]],
                            prm["window_strides"][i], prm["padding"][i][0],
                            prm["lhs_dilation"][i], prm["rhs_dilation"][i])
    return macs


def _dot_macs(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def jaxpr_flops(jaxpr: Any) -> float:
    """2 x multiply-adds of convolutions and matmuls, loop bodies times their trip count."""
    from jax.extend import core as jex_core

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += 2.0 * _conv_macs(eqn)
        elif name == "dot_general":
            total += 2.0 * _dot_macs(eqn)
        mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        subs = []
        for v in eqn.params.values():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(item, jex_core.ClosedJaxpr):
                    subs.append(item.jaxpr)
                elif isinstance(item, jex_core.Jaxpr):
                    subs.append(item)
        if name == "cond":
            total += max((jaxpr_flops(s) for s in subs), default=0.0)
        elif name == "while":  # trip count unknown here: count the body once, as XLA does
            total += sum(jaxpr_flops(s) for s in subs)
        else:
            total += mult * sum(jaxpr_flops(s) for s in subs)
    return total


def analytic_flops(fn: Callable[..., Any], *args: Any) -> float:
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ---- timing helpers -----------------------------------------------------------------------

def matmul_peak(n: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``n x n`` matmuls (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_peak_bytes(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return int(peak) if peak is not None else None


def xla_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased (donated) bytes of an executable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu: {cpu_name()}, {os.cpu_count()} cores"
    return f"{d.platform}: {d.device_kind} x{jax.device_count()}"


# ---- the benchmarked functions ------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """The flags, a model and its variables, shared by the parts of one configuration."""

    args: argparse.Namespace
    model: Any
    variables: dict[str, Any]
    flops_cache: dict[tuple[str, int, str], tuple[float, float]] = dataclasses.field(
        default_factory=dict)


def optimizer(args: argparse.Namespace, batch: int) -> tuple[Any, Any]:
    """``(tx, schedule)`` of the flags' optimizer at ``batch`` (one replica), as
    ``train_state.optimizer_from_config`` builds them for a run."""
    from alp_jax import train_state as ts
    from alp_jax.config import HPARAMS

    schedule = ts.make_schedule(
        args.lr_schedule, args.learning_rate, ts.steps_per_epoch(EXAMPLES_PER_EPOCH, batch),
        lr_decay_factor=args.lr_decay_factor,
        lr_num_epochs_per_decay=args.lr_num_epochs_per_decay,
        lr_list=tuple(HPARAMS["lr_list"]), lr_decay_epochs=tuple(HPARAMS["lr_decay_epochs"]))
    tx = ts.make_optimizer(args.optimizer, schedule, momentum=args.momentum,
                           rmsprop_decay=args.rmsprop_decay,
                           rmsprop_epsilon=args.rmsprop_epsilon)
    return tx, schedule


def objective(args: argparse.Namespace, attack: str) -> Any:
    """The original's ``alp`` objective (clean, mixed-minibatch PGD, or ALP) for ``attack``."""
    from alp_jax import objectives

    return objectives.make_objective("alp", attack, label_smoothing=args.label_smoothing,
                                     weight=args.lp_weight)


def train_step_fn(args: argparse.Namespace, model: Any, batch: int, attack: str
                  ) -> tuple[Callable[..., Any], Any]:
    """``(train step, its optax transformation)``: the programs' step for ``attack``
    (``clean`` for the clean step) at ``batch``."""
    from alp_jax import steps

    tx, schedule = optimizer(args, batch)
    step = steps.make_train_step(
        model, tx, schedule, objective(args, attack), attack, bounds=BOUNDS,
        weight_decay=args.weight_decay, ema_decay=args.moving_average_decay,
        examples_per_epoch=EXAMPLES_PER_EPOCH, global_batch=batch)
    return step, tx


def craft_fn(args: argparse.Namespace, model: Any, attack: str) -> Callable[..., Any]:
    """``(variables, images, labels, key) -> adversarial images``: the step's attack."""
    from alp_jax.pgd import parse_attack

    obj, spec = objective(args, attack), parse_attack(attack)

    def craft(variables, images, labels, key):
        return obj.craft(model, variables, images, labels, key, spec, BOUNDS)

    return craft


def iteration_fn(model: Any, attack: str) -> Callable[..., Any]:
    """One PGD iteration compiled on its own: ``(variables, x, x0, targets) -> x``."""
    from alp_jax import pgd, steps

    spec = pgd.parse_attack(attack)
    scale = pgd.pixel_scale(BOUNDS)
    direction = 1.0 if spec.method == "pgd" else -1.0

    def one(variables, x, x0, targets):
        logits_fn = steps.inference_logits_fn(model, variables)
        return pgd.signed_gradient_loop(
            pgd.summed_xent(logits_fn, targets), x, x0, spec.eps * scale, spec.step * scale,
            1, BOUNDS, direction)

    return one


def _inputs(args: argparse.Namespace, batch: int, seed: int = 1) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    images = jax.random.uniform(k1, (batch, args.image_size, args.image_size, 3), jnp.float32,
                                -1.0, 1.0)
    labels = jax.random.randint(k2, (batch,), 0, args.num_classes)
    return images, labels, k3


def _timed_compile(fn: Callable[..., Any], args: Sequence[Any], donate: tuple[int, ...]
                   ) -> tuple[Any, float]:
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def count_flops(setup: Setup, part: str, batch: int, attack: str,
                call_args: tuple[Any, ...], niter_extra: int) -> tuple[float, float, float]:
    """(XLA FLOPs of the function, of one attack iteration, analytic FLOPs of the function).

    Always counts the reference implementation (the model cloned with ``lax``
    convolutions), so that the figure is a property of the model and the attack, not of
    the code path (im2col convolutions compute the same logits with a different mix of
    operations; their matmuls also multiply the padding zeros).
    """
    from alp_jax import pgd

    ref = setup.model.clone(conv_impl="xla")
    key = (part, batch, attack)
    if key not in setup.flops_cache:
        fn = (craft_fn(setup.args, ref, attack) if part == "attack"
              else train_step_fn(setup.args, ref, batch, attack)[0])
        setup.flops_cache[key] = (cpu_flops(fn, *call_args), analytic_flops(fn, *call_args))
    flops, analytic = setup.flops_cache[key]
    iter_flops = 0.0
    if niter_extra:
        spec = pgd.parse_attack(attack)
        ikey = ("iteration", batch, f"{spec.method}_{spec.eps}_{spec.step}")
        if ikey not in setup.flops_cache:
            images, labels = call_args[1], call_args[2]
            setup.flops_cache[ikey] = (cpu_flops(iteration_fn(ref, attack), setup.variables,
                                                 images, images, labels), 0.0)
        iter_flops = setup.flops_cache[ikey][0]
    return flops, iter_flops, analytic


def run_part(setup: Setup, part: str, batch: int, attack: str) -> dict[str, Any]:
    """Compiles, counts and times one part at one batch; returns its JSON record."""
    import jax

    from alp_jax import pgd
    from alp_jax import train_state as ts

    args = setup.args
    spec = pgd.parse_attack(attack)
    used = "clean" if part == "clean" else attack  # the attack the function runs
    images, labels, key = _inputs(args, batch)
    niter_extra = spec.niter - 1 if (part != "clean" and spec.method in PGD_METHODS) else 0
    state = None
    if part == "attack":
        fn = craft_fn(args, setup.model, used)
        call_args: tuple[Any, ...] = (setup.variables, images, labels, key)
        donate: tuple[int, ...] = ()
    else:
        fn, tx = train_step_fn(args, setup.model, batch, used)
        state = ts.create_train_state(
            setup.model, tx, jax.random.PRNGKey(0), args.image_size,
            moving_average_decay=args.moving_average_decay,
            variables=jax.tree_util.tree_map(jax.numpy.copy, setup.variables))  # donated
        call_args = (state, images, labels, key)
        donate = (0,) if args.donate else ()

    compiled, compile_s = _timed_compile(fn, call_args, donate)
    flops, iter_flops, analytic = count_flops(setup, part, batch, used, call_args, niter_extra)
    flops_total = flops + niter_extra * iter_flops
    record: dict[str, Any] = {}
    if part == "alp" and args.memory_check:
        # The memory target: the ALP step at batch B against a clean step at batch 2B.
        clean2, _ = train_step_fn(args, setup.model, 2 * batch, "clean")
        im2, lb2, k2 = _inputs(args, 2 * batch)
        c2, _ = _timed_compile(clean2, (state, im2, lb2, k2), donate)
        mine, theirs = xla_bytes(compiled), xla_bytes(c2)
        record["xla_bytes_clean_step_2x_batch"] = theirs
        record["memory_ratio_vs_clean_2x_batch"] = (
            mine / theirs if mine is not None and theirs else None)

    times, cpu_times = [], []
    out = None
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if part == "attack":
            out = jax.block_until_ready(compiled(*call_args))
        else:
            state, metrics = compiled(state, images, labels, key)
            out = jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    del out
    med = statistics.median(times)
    achieved = flops_total / med
    device = jax.devices()[0]
    record.update({
        "part": part,
        "model": args.model,
        "num_classes": args.num_classes,
        "image_size": args.image_size,
        "batch": batch,
        "attack": attack if part != "clean" else "clean",
        "niter": spec.niter if part != "clean" else 0,
        "lp_weight": args.lp_weight if part == "alp" else 0.0,
        "compute_dtype": args.compute_dtype,
        "model_conv_impl": args.model_conv_impl,
        "donate": bool(args.donate) and part != "attack",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "label": args.label,
        "device": device_description(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
        "steps": args.steps,
        "step_time_s_median": med,
        "step_time_s_min": min(times),
        "images_per_s": batch / med,
        "cpu_s_per_step_median": statistics.median(cpu_times),
        "images_per_s_best": batch / min(times),
        "compile_s": compile_s,
        "flops_per_step": flops_total,
        "flops_per_image": flops_total / batch,
        "flops_method": ("xla_cost_analysis(cpu lowering) + (niter-1) x one_iteration"
                         if niter_extra else "xla_cost_analysis(cpu lowering)"),
        "flops_compiled": flops,
        "flops_one_iteration": iter_flops,
        "flops_analytic_per_image": analytic / batch,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": args.peak,
        "matmul_peak_dtype": args.peak_dtype,
        "share_of_peak": achieved / args.peak if args.peak else None,
        "device_peak_bytes": device_peak_bytes(device),
        "xla_bytes": xla_bytes(compiled),
        "process_peak_rss_bytes": peak_rss_bytes(),
    })
    return record


# ---- the program --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def init_model(name: str, num_classes: int, image_size: int, dtype: str,
               conv_impl: str = "auto") -> tuple[Any, dict[str, Any]]:
    """(model, fresh variables), initialised once per process (XLA compiles the init)."""
    import jax
    import jax.numpy as jnp

    from alp_jax import train_state as ts
    from alp_jax.model import create_model

    model = create_model(name, num_classes, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
    return model, ts.init_variables(model, jax.random.PRNGKey(0), image_size)


def _csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from alp_jax import train_state as ts  # imports jax, but starts no backend
    from alp_jax.config import HPARAMS  # a plain dict: no ml_collections
    from alp_jax.convolution import CONV_IMPLS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_v2_50")
    p.add_argument("--num_classes", type=int, default=200)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch", default="32", help="comma-separated batch sizes")
    p.add_argument("--attack", default="pgdll_16_2_10", help="comma-separated attack specs")
    p.add_argument("--lp_weight", type=float, default=0.5)
    p.add_argument("--parts", default="clean,attack,alp", help=f"subset of {','.join(PARTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--compute_dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--model_conv_impl", default="auto", choices=CONV_IMPLS,
                   help="the model's convolutions (training pass and attack), as the "
                        "config's conv_impl: auto (the programs' default: im2col on CPU, "
                        "lax on GPU/TPU), xla (lax everywhere) or im2col")
    p.add_argument("--donate", action=argparse.BooleanOptionalAction, default=True,
                   help="donate the train state to the jitted step")
    p.add_argument("--memory_check", action=argparse.BooleanOptionalAction, default=False,
                   help="also compile the clean step at 2x batch and report the ALP step's "
                        "XLA memory over it (the issue's <= 1.25 target)")
    p.add_argument("--moving_average_decay", type=float, default=0.9999,
                   help="as the config's (<= 0: no moving averages)")
    for name in HP_FLAGS:  # the original's hyperparameters, with its defaults
        default = HPARAMS[name]
        kind = {"optimizer": {"choices": ts.OPTIMIZERS},
                "lr_schedule": {"choices": ts.LR_SCHEDULES}}.get(name, {})
        p.add_argument(f"--{name}", type=type(default), default=default,
                       help=f"the hparam {name} (default: %(default)s)", **kind)
    p.add_argument("--xla_flags", default="",
                   help="appended to XLA_FLAGS (effective only before JAX starts its backend)")
    p.add_argument("--peak_size", type=int, default=0,
                   help="matmul size for the peak (default 2048 on CPU, 8192 otherwise)")
    p.add_argument("--label", default="", help="free text copied into every record")
    p.add_argument("--json", default="", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    for part in _csv(args.parts):
        if part not in PARTS:
            p.error(f"--parts: unknown part {part!r}; valid: {', '.join(PARTS)}")
    return args


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A human-readable table of the records."""
    head = ("part", "batch", "attack", "dtype", "convs", "img/s", "step ms", "compile s",
            "GFLOP/img", "GFLOP/s", "% peak", "xla MiB", "rss MiB")
    rows = [head]
    for r in records:
        share = r["share_of_peak"]
        rows.append((
            r["part"], str(r["batch"]), r["attack"], r["compute_dtype"],
            r.get("model_conv_impl", "xla"),
            f"{r['images_per_s']:.2f}", f"{1e3 * r['step_time_s_median']:.0f}",
            f"{r['compile_s']:.1f}", f"{r['flops_per_image'] / 1e9:.2f}",
            f"{r['achieved_flops_per_s'] / 1e9:.1f}",
            "-" if share is None else f"{100 * share:.1f}",
            "-" if r["xla_bytes"] is None else f"{r['xla_bytes'] / 2**20:.0f}",
            f"{r['process_peak_rss_bytes'] / 2**20:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax

    from alp_jax import provenance

    prov = provenance.record()  # in every record: which code, libraries and devices

    on_cpu = jax.default_backend() == "cpu"
    args.peak_dtype = "float32" if on_cpu else "bfloat16"
    args.peak_size = args.peak_size or (2048 if on_cpu else 8192)
    args.peak = matmul_peak(args.peak_size, args.peak_dtype)
    model, variables = init_model(args.model, args.num_classes, args.image_size,
                                  args.compute_dtype, args.model_conv_impl)
    setup = Setup(args, model, variables)
    records = []
    out = open(args.json, "a") if args.json else None  # noqa: SIM115
    try:
        for batch in _csv(args.batch, int):
            for attack in _csv(args.attack):
                for part in _csv(args.parts):
                    if part == "clean" and attack != _csv(args.attack)[0]:
                        continue  # the clean step does not depend on the attack
                    rec = run_part(setup, part, batch, attack)
                    rec["provenance"] = prov
                    records.append(rec)
                    line = json.dumps(rec, sort_keys=True)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
    finally:
        if out:
            out.close()
    print(f"\n{device_description()}, jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"load {load_average()}, matmul peak {args.peak / 1e9:.1f} GFLOP/s "
          f"({args.peak_dtype}, n={args.peak_size}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(format_table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
