"""A suite of attacks at a list of eps, the worst case per example, per-example files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from alp_jax.attacks import grammar
from alp_jax.attacks.grammar import Bounds
from alp_jax.engine import core

DEFAULT_ATTACKS = ("pgdll_16_2_10", "pgdtrue_16_2_20_r5", "apgdce_16_100", "apgddlr_16_100",
                   "square_16_1000")
DEFAULT_EPS = (2, 4, 8, 16)


@dataclasses.dataclass
class SuiteResult:
    """Per-example correctness of every (attack, eps) of a suite, plus the extra specs.

    ``correct`` maps each concrete spec (e.g. ``pgdll_8_1_10``) to a bool [N] array;
    ``grid[(attack, eps)]`` is the concrete spec of a suite attack at an eps. ``seconds``
    is attack time per spec, ``compile_seconds`` compile time per compiled function.
    """

    attacks: tuple[str, ...]
    eps_list: tuple[int, ...]
    labels: np.ndarray
    clean_correct: np.ndarray
    correct: dict[str, np.ndarray]
    grid: dict[tuple[str, int], str]
    seconds: dict[str, float]
    zero_grad_fraction: float  # of all input-gradient entries, clean inputs, true labels
    zero_grad_examples: float  # fraction of examples whose input gradient is all zero
    clean_images: np.ndarray  # the first few examples, for the image grid
    adv_images: dict[str, np.ndarray]
    index: np.ndarray | None = None  # each example's index in the split
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    clean_predictions: np.ndarray | None = None  # top-1 of clean_images
    adv_predictions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.clean_correct))

    def spec_accuracy(self, spec: str) -> float:
        return float(np.mean(self.correct[grammar.canonical(spec)]))

    def accuracy(self, attack: str, eps: int) -> float:
        return self.spec_accuracy(self.grid[(attack, eps)])

    def worst_correct(self, eps: int) -> np.ndarray:
        """Robust per example: correct clean and under every attack of the suite at eps."""
        out = self.clean_correct.copy()
        for a in self.attacks:
            out &= self.correct[self.grid[(a, eps)]]
        return out

    def worst_accuracy(self, eps: int) -> float:
        return float(np.mean(self.worst_correct(eps)))


@dataclasses.dataclass
class Progress:
    """What a progress callback sees after each batch."""

    done: int
    total: int | None
    clean_correct: int
    worst_correct: dict[int, int]
    elapsed: float


def suite_grid(attacks: Sequence[str], eps_list: Sequence[int]) -> dict[tuple[str, int], str]:
    """``{(attack, eps): concrete spec}`` (``grammar.with_eps``), attacks canonical."""
    return {(grammar.canonical(a), int(e)): grammar.with_eps(a, int(e)).spec
            for a in attacks for e in eps_list}


def evaluate_suite(logits_fn: Callable, batches: Iterable[core.Batch], attacks: Sequence[str],
                   eps_list: Sequence[int], *, variables: Any, num_classes: int,
                   seed: int = 0, bounds: Bounds = (-1.0, 1.0), mesh: Any = None,
                   extra_specs: Sequence[str] = (), num_images: int = 8,
                   total: int | None = None,
                   progress: Callable[[Progress], None] | None = None) -> SuiteResult:
    """Runs every attack of ``attacks`` at every eps of ``eps_list`` on every example.

    ``logits_fn(variables, x)`` gives inference-mode logits (``core.ModelLogits``).
    ``extra_specs`` are concrete specs run alongside (the masking probes); a spec that
    occurs twice runs once. Randomness is per example and spec (``core``), so a spec's
    result depends on nothing else that runs, nor on batch size or devices.
    """
    attacks = tuple(dict.fromkeys(grammar.canonical(a) for a in attacks))
    eps_list = tuple(int(e) for e in eps_list)
    grid = suite_grid(attacks, eps_list)
    specs = list(dict.fromkeys([*grid.values(), *(grammar.canonical(s) for s in extra_specs)]))

    worst_running = dict.fromkeys(eps_list, 0)

    def on_batch(p: core.Progress) -> None:
        for e in eps_list:
            w = p.batch["clean"].copy()
            for a in attacks:
                w &= p.batch[grid[(a, e)]]
            worst_running[e] += int(np.sum(w))
        progress(Progress(p.done, p.total, p.correct["clean"], dict(worst_running),
                          p.elapsed))

    r = core.evaluate_specs(logits_fn, variables, batches, specs, num_classes=num_classes,
                            seed=seed, bounds=bounds, mesh=mesh, num_images=num_images,
                            total=total, progress=on_batch if progress else None)
    return SuiteResult(
        attacks=attacks, eps_list=eps_list, labels=r.labels, clean_correct=r.correct["clean"],
        correct={s: v for s, v in r.correct.items() if s != "clean"}, grid=grid,
        seconds={s: round(v, 3) for s, v in r.attack_seconds.items()},
        zero_grad_fraction=r.zero_grad_fraction, zero_grad_examples=r.zero_grad_examples,
        clean_images=r.clean_images, adv_images=r.adv_images, index=r.index,
        compile_seconds={s: round(v, 3) for s, v in r.compile_seconds.items()},
        clean_predictions=r.clean_predictions, adv_predictions=r.adv_predictions)


# ---- per-example files -------------------------------------------------------------------

def per_example_arrays(result: SuiteResult) -> dict[str, np.ndarray]:
    """``index``, ``label``, ``clean`` and one bool column per concrete spec."""
    index = result.index if result.index is not None else np.arange(result.num_examples)
    out = {"index": np.asarray(index, np.int64), "label": np.asarray(result.labels, np.int64),
           "clean": np.asarray(result.clean_correct, bool)}
    out.update({s: np.asarray(v, bool) for s, v in result.correct.items()})
    return out


def save_per_example(path: str, result: SuiteResult) -> None:
    """``per_example.npz`` (written atomically)."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **per_example_arrays(result))
    import os

    os.replace(tmp, path)


def load_per_example(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def combine_worst(*runs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The worst case of several per-example results of the same examples: for each
    column they share, an example is correct only if correct in every run (their AND)."""
    if not runs:
        raise ValueError("combine_worst needs at least one run.")
    first = runs[0]
    for r in runs[1:]:
        if not np.array_equal(r["index"], first["index"]) or not np.array_equal(
                r["label"], first["label"]):
            raise ValueError("combine_worst: the runs cover different examples (index or "
                             "label columns differ); evaluate the same split and examples.")
    shared = [k for k in first if k not in ("index", "label") and all(k in r for r in runs)]
    out = {"index": first["index"], "label": first["label"]}
    for k in shared:
        out[k] = np.logical_and.reduce([r[k] for r in runs])
    return out


# ---- suite settings (the config's comma-separated fields) ---------------------------------

def parse_attack_list(text: str | Sequence[str], what: str = "attacks") -> tuple[str, ...]:
    """``'pgdll_16_2_10,square_16_1000'`` -> canonical specs; errors name the bad one."""
    items = [a.strip() for a in (text.split(",") if isinstance(text, str) else text)]
    items = [a for a in items if a]
    if not items:
        raise ValueError(f"{what} is empty; give at least one attack spec, e.g. "
                         f"{','.join(DEFAULT_ATTACKS)}.")
    specs = [grammar.canonical(a) for a in items]
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise ValueError(f"{what} has repeated specs: {', '.join(repeated)} (as written: "
                         f"{items}).")
    return tuple(specs)


def parse_eps_list(text: str | Sequence[int], what: str = "eps") -> tuple[int, ...]:
    """``'2,4,8,16'`` -> ``(2, 4, 8, 16)``: integers in 1..255, each once."""
    items = [str(e).strip() for e in (text.split(",") if isinstance(text, str) else text)]
    items = [e for e in items if e]
    if not items:
        raise ValueError(f"{what} is empty; give integers on the 0..255 scale, e.g. 2,4,8,16.")
    out = []
    for e in items:
        if not (e.isascii() and e.isdigit()):
            raise ValueError(f"{what} values must be integers on the 0..255 scale, got {e!r}.")
        if not 1 <= int(e) <= 255:
            raise ValueError(f"{what} values must be integers in 1..255, got {int(e)}.")
        out.append(int(e))
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has repeated values: {out}.")
    return tuple(out)
