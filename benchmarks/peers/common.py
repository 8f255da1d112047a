"""Flags, timing and output shared by the peer benchmarks (no JAX, TF or torch imports).

The peers take the same flags as ``benchmarks/train_step.py`` (those that apply) and print
one JSON line per configuration with the same core fields (``impl``, ``part``, ``batch``,
``attack``, ``images_per_s``, ``step_time_s_median``, ``load_average``, ...), so that
``benchmarks/compare.py`` can put them side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PARTS = ("clean", "attack", "alp")

# The original's defaults (model_lib.py), as alp_jax.config.HPARAMS has them.
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-4
LEARNING_RATE = 0.045
RMSPROP_DECAY = 0.9
MOMENTUM = 0.9
RMSPROP_EPSILON = 1.0
BN_DECAY = 0.997
BN_EPSILON = 1.001e-5
MOVING_AVERAGE_DECAY = 0.9999


def parse_attack(spec: str) -> tuple[str, float, float, int]:
    """``pgdll_16_2_10`` -> ``('pgdll', 16.0, 2.0, 10)`` (EPS and STEP on the 0..255 scale)."""
    method, eps, step, niter = spec.split("_")
    if method not in ("pgd", "pgdll", "pgdrnd"):
        raise ValueError(f"peers support pgd/pgdll/pgdrnd specs, got {spec!r}")
    return method, float(eps), float(step), int(niter)


def csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="resnet_v2_50", help="resnet_v2_50 (peers build only it)")
    p.add_argument("--num_classes", type=int, default=200)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch", default="32", help="comma-separated batch sizes")
    p.add_argument("--attack", default="pgdll_16_2_10", help="comma-separated pgd* specs")
    p.add_argument("--lp_weight", type=float, default=0.5)
    p.add_argument("--parts", default="clean,attack,alp")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--units", default="3,4,6,3",
                   help="bottleneck units per block (3,4,6,3: ResNet-v2-50; fewer for tests)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--label", default="")
    p.add_argument("--json", default="", help="also append the JSON lines to this file")
    return p


def units(args: argparse.Namespace) -> tuple[int, ...]:
    """Units per block; ``--model resnet_v2_50`` is the only model name the peers build."""
    if args.model != "resnet_v2_50":
        raise SystemExit(f"the peers build resnet_v2_50 only, got --model {args.model}")
    value = tuple(csv(args.units, int))
    if len(value) != 4:
        raise SystemExit(f"--units needs 4 values, got {args.units!r}")
    return value


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def time_steps(step: Callable[[], Any], warmup: int, steps: int
               ) -> tuple[list[float], float, list[float]]:
    """(timed step durations, duration of the first call (warm-up/compile), process CPU
    seconds of each timed step)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, first, cpu


def record(args: argparse.Namespace, impl: str, part: str, batch: int, attack: str,
           times: Sequence[float], first_s: float, cpu: Sequence[float],
           **extra: Any) -> dict[str, Any]:
    med = statistics.median(times)
    rec = {
        "impl": impl, "part": part, "model": args.model, "num_classes": args.num_classes,
        "image_size": args.image_size, "batch": batch,
        "attack": "clean" if part == "clean" else attack,
        "lp_weight": args.lp_weight if part == "alp" else 0.0, "compute_dtype": "float32",
        "label": args.label, "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(), "steps": len(times),
        "step_time_s_median": med, "step_time_s_min": min(times),
        "images_per_s": batch / med, "images_per_s_best": batch / min(times),
        "cpu_s_per_step_median": statistics.median(cpu),
        "first_step_s": first_s, "process_peak_rss_bytes": peak_rss_bytes(),
    }
    rec.update(extra)
    return rec


def emit(rec: dict[str, Any], path: str) -> None:
    line = json.dumps(rec, sort_keys=True)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def table(records: Sequence[dict[str, Any]]) -> str:
    head = ("impl", "part", "batch", "attack", "img/s", "step ms", "first step s", "rss MiB")
    rows = [head] + [(
        r["impl"], r["part"], str(r["batch"]), r["attack"], f"{r['images_per_s']:.2f}",
        f"{1e3 * r['step_time_s_median']:.0f}", f"{r['first_step_s']:.1f}",
        f"{r['process_peak_rss_bytes'] / 2**20:.0f}") for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
