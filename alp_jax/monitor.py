"""What a training run reports: the step history, the loss guard, progress logs (steps/s,
examples/s, ETA), scalar summaries and the clean/adversarial summary images."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from alp_jax import summaries

Metrics = dict[str, Any]


def format_eta(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def first_bad_loss(history: list[tuple[int, Metrics]], ceiling: float
                   ) -> tuple[int, Metrics] | None:
    """The first (step, metrics) whose ``total_loss`` is NaN, infinite or above ``ceiling``
    (0: no ceiling)."""
    for step, m in history:
        loss = float(m["total_loss"])
        if not np.isfinite(loss) or (ceiling > 0 and loss > ceiling):
            return step, m
    return None


def summary_images_fn(model: Any, objective: Any, attack: Any, bounds: tuple[float, float],
                      num_images: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``(state, images, labels) -> (clean, adversarial)`` of the first ``num_images``
    examples, crafted as the train step crafts them (clean again for clean training)."""
    from alp_jax.attacks.grammar import parse_attack

    spec = parse_attack(attack)

    @jax.jit
    def images_fn(state, images, labels):
        images, labels = images[:num_images], labels[:num_images]
        key = jax.random.fold_in(state.rng, state.step)
        adv = objective.craft(model, state.variables(), images, labels, key, spec, bounds)
        return images, (images if adv is None else adv)

    return images_fn


def fetch(tree: Any) -> Any:
    """NumPy copies of ``tree``'s arrays on every process.

    An array spread over several processes' devices (the summary images of a sharded
    batch) cannot be fetched by ``jax.device_get`` on a cluster; it is gathered from each
    process's own shards instead. Every process must call this for such arrays.
    """
    from jax.experimental import multihost_utils

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


class Monitor:
    """Keeps the metrics of the steps since the last check, and at the log and summary
    intervals fetches them, stops on a bad loss, logs progress and writes summaries.

    The loss guard raises FloatingPointError naming the step, the loss and
    ``last_good()`` (where the last checkpoint that really was saved is). Steps/s and the
    ETA count steady-state steps only: the first step's compile, and the summary images'
    own compile, are not training time.
    """

    def __init__(self, writer: summaries.SummaryWriter, *, max_steps: int, global_batch: int,
                 log_every: int, summary_every: int, max_loss: float = 0.0,
                 last_good: Callable[[], str] = lambda: "",
                 images_fn: Callable[..., Any] | None = None,
                 bounds: tuple[float, float] = (-1.0, 1.0), is_main: bool = True):
        self.writer, self.max_steps, self.global_batch = writer, max_steps, global_batch
        self.log_every, self.summary_every, self.max_loss = log_every, summary_every, max_loss
        self.last_good, self.images_fn, self.bounds = last_good, images_fn, bounds
        self.is_main = is_main
        self.history: list[tuple[int, Metrics]] = []
        self._t_last, self._s_last, self._first_rate = time.time(), 0, float("nan")
        self._images_compiled = False

    def first_step(self, train_step: Callable[..., Any], state: Any, batch: dict[str, Any]
                   ) -> tuple[Any, Metrics]:
        """Runs the first step, logging the compile (the call returns once XLA has compiled;
        execution is asynchronous) and the step's own time."""
        logging.info("Compiling the train step (the first step waits for it)...")
        t0 = time.time()
        state, metrics = train_step(state, batch["images"], batch["labels"])
        t1 = time.time()
        jax.block_until_ready(metrics)
        t2 = time.time()
        logging.info("Compiled the train step in %.1f s; the first step ran in %.2f s.",
                     t1 - t0, t2 - t1)
        self._first_rate = 1.0 / max(t2 - t1, 1e-9)
        self._t_last, self._s_last = time.time(), int(jax.device_get(state.step))
        return state, metrics

    def record(self, step: int, metrics: Metrics) -> None:
        self.history.append((step, metrics))

    def check_loss(self) -> list[tuple[int, Metrics]]:
        """Fetches the recorded metrics; FloatingPointError at the first bad loss."""
        fetched = [(s, jax.device_get(m)) for s, m in self.history]
        bad = first_bad_loss(fetched, self.max_loss)
        if bad is not None:
            loss = float(bad[1]["total_loss"])
            why = "" if not np.isfinite(loss) else f" (above max_loss {self.max_loss:g})"
            raise FloatingPointError(
                f"Loss is {loss} at step {bad[0]}{why} (loss_xent="
                f"{float(bad[1]['loss_xent'])}); stopping. {self.last_good()}")
        self.history = []
        return fetched

    def report(self, step: int, state: Any, batch: dict[str, Any]) -> None:
        """At the log or summary interval: the loss guard, the log line, the summaries."""
        log_now = step % self.log_every == 0 or step == self.max_steps
        summ_now = self.summary_every > 0 and step % self.summary_every == 0
        if not (log_now or summ_now):
            return
        m = self.check_loss()[-1][1]
        rate = self._rate(step)
        if log_now and self.is_main:
            self._log(step, m, rate)
        if summ_now:
            self.writer.scalars(step, {**m, "global_step/sec": rate})
            if self.images_fn is not None:
                self._images(step, state, batch)
            self.writer.flush()

    def _rate(self, step: int) -> float:
        now = time.time()
        rate = ((step - self._s_last) / max(now - self._t_last, 1e-9) if step > self._s_last
                else self._first_rate)  # no steady-state step timed yet
        self._t_last, self._s_last = now, step
        return rate

    def _log(self, step: int, m: Metrics, rate: float) -> None:
        eta = ((self.max_steps - step) / rate if self.max_steps > 0 and rate > 0
               else float("nan"))
        terms = ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in m.items()
                          if k.startswith("loss_"))
        lr = f" | lr {float(m['learning_rate']):.5g}" if "learning_rate" in m else ""
        adv = f" adv {float(m['adv_accuracy']):.3f}" if "adv_accuracy" in m else ""
        logging.info(
            "step %d%s | %.2f steps/s | %.1f examples/s | ETA %s | loss %.4f (%s)%s | "
            "acc clean %.3f%s", step, f"/{self.max_steps}" if self.max_steps > 0 else "",
            rate, rate * self.global_batch, format_eta(eta), m["total_loss"], terms, lr,
            m["clean_accuracy"], adv)

    def _images(self, step: int, state: Any, batch: dict[str, Any]) -> None:
        # Every process computes and fetches (the gather is a collective); only process
        # 0's writer writes.
        t0 = time.time()
        clean, adv = fetch(self.images_fn(state, batch["images"], batch["labels"]))
        if not self._images_compiled:  # its compile is no training time
            self._t_last += time.time() - t0
            self._images_compiled = True
        self.writer.images(step, "clean_images", clean, self.bounds)
        self.writer.images(step, "adversarial_images", adv, self.bounds)
