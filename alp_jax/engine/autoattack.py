"""AutoAttack's standard version as a preset (``--attacks=autoattack``).

Croce & Hein (ICML 2020), reference ``fra31/auto-attack``, ``AutoAttack(version='standard')``
for L-inf: four attacks in this order, each run only on the examples every earlier one
left correctly classified (clean-misclassified examples are never attacked), so the cost
falls as attacks succeed; the robust accuracy is what survives all four.

| AutoAttack | parameters there | spec here |
|---|---|---|
| ``apgd-ce`` | 100 iterations, 1 restart, rho 0.75 | ``apgdce_EPS_100`` |
| ``apgd-t`` | targeted DLR, 9 targets, 100 iterations, 1 restart | ``apgddlr_EPS_100_t9`` |
| ``fab-t`` | 9 targets, 100 iterations, 1 restart | ``fabt_EPS_100_t9`` |
| ``square`` | 5,000 queries, 1 restart, p_init 0.8 | ``square_EPS_5000`` |

Targets are capped at ``classes - 1``. Each stage gathers the survivors' indices and
evaluates them as a sub-split through ``core.evaluate_specs`` (sharded, padded, attack
keys per example and spec), so an example's result under attack k is the one it would get
if attack k ran on every example: the cascade equals the AND of the four attacks run on
the whole split, at a fraction of the cost (tested).

The result is a ``SuiteResult`` whose column for attack k is cumulative: an example is
correct there only if it is correct clean and under attacks 1..k (AutoAttack's "robust
accuracy after" each attack); the worst case is the last column. The masking checks,
tables and per-example files read it as any suite's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from alp_jax import sharding
from alp_jax.attacks import grammar
from alp_jax.attacks.grammar import Bounds
from alp_jax.engine import core
from alp_jax.engine.suite import Progress, SuiteResult, suite_grid

PRESETS = ("autoattack",)
# AutoAttack's names for the four stages, in order.
STAGE_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")
STANDARD = {"apgd_iterations": 100, "fab_iterations": 100, "square_queries": 5000,
            "targets": 9}


def is_preset(attacks: str | Sequence[str]) -> bool:
    """True when ``robustness_attacks`` names a preset (``autoattack``) instead of specs."""
    text = attacks if isinstance(attacks, str) else ",".join(attacks)
    return text.strip() in PRESETS


def standard_specs(eps: int, num_classes: int, *, apgd_iterations: int = 100,
                   fab_iterations: int = 100, square_queries: int = 5000,
                   targets: int = 9) -> tuple[str, ...]:
    """The four specs of AutoAttack's standard version at ``eps`` (0..255 scale), targets
    capped at ``num_classes - 1``. The keyword counts are AutoAttack's; tests lower them."""
    if num_classes < 4:
        raise ValueError(f"AutoAttack's APGD-T (targeted DLR) needs at least 4 classes; the "
                         f"model has {num_classes}.")
    k = min(targets, num_classes - 1)
    specs = (f"apgdce_{eps}_{apgd_iterations}", f"apgddlr_{eps}_{apgd_iterations}_t{k}",
             f"fabt_{eps}_{fab_iterations}_t{k}", f"square_{eps}_{square_queries}")
    return tuple(grammar.canonical(s) for s in specs)


@dataclasses.dataclass
class Stage:
    """One attack of the cascade at one eps."""

    name: str  # AutoAttack's name (``STAGE_NAMES``)
    spec: str  # the concrete spec that ran
    attacked: int  # examples it ran on (those still robust before it)
    robust_after: int  # examples still robust after it
    seconds: float  # attack time, compilation excluded

    @property
    def fooled(self) -> int:
        return self.attacked - self.robust_after


@dataclasses.dataclass
class AutoAttackResult:
    """The cascade per eps (``stages[eps]``, in order) beside the ``SuiteResult``."""

    suite: SuiteResult
    stages: dict[int, list[Stage]]
    wall_seconds: float

    def robust_accuracy(self, eps: int) -> float:
        return self.suite.worst_accuracy(eps)


def _local_rows(batches: Iterable[core.Batch]) -> tuple[list[core.Batch], dict[str, np.ndarray]]:
    """The batches kept in memory, and this process's real rows of them concatenated."""
    kept = list(batches)
    rows = {k: np.concatenate([b[k][b["mask"]] for b in kept]) for k in ("images", "labels",
                                                                        "index")}
    return kept, rows


def _sub_batches(rows: dict[str, np.ndarray], keep: np.ndarray, size: int) -> list[core.Batch]:
    """This process's rows where ``keep``, in padded local batches of ``size`` rows, as many
    batches as the process with the most survivors needs (every process steps together)."""
    pick = np.flatnonzero(keep)
    n_local = len(pick)
    counts = np.asarray([n_local])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1)
    num = -(-int(counts.max()) // size)
    out = []
    for j in range(num):
        sel = pick[j * size:(j + 1) * size]
        out.append(core.pad_batch(rows["images"][sel], rows["labels"][sel],
                                  rows["index"][sel], size))
    return out


def evaluate_autoattack(logits_fn: Callable, batches: Iterable[core.Batch],
                        eps_list: Sequence[int], *, variables: Any, num_classes: int,
                        seed: int = 0, bounds: Bounds = (-1.0, 1.0), mesh: Any = None,
                        extra_specs: Sequence[str] = (), total: int | None = None,
                        progress: Callable[[Progress], None] | None = None,
                        log: Callable[[str], None] | None = None,
                        **counts: int) -> AutoAttackResult:
    """AutoAttack's standard cascade at each eps of ``eps_list`` (each eps on its own,
    starting from the clean-correct examples).

    ``batches`` are local padded batches (``core.split_batches``) or plain
    ``{'images', 'labels'}`` batches; they are held in memory to gather survivors.
    ``extra_specs`` (the masking probes) run on every example with the clean pass.
    ``counts`` override ``STANDARD`` (``apgd_iterations``, ``fab_iterations``,
    ``square_queries``, ``targets``): for tests; the program uses the standard values.
    """
    unknown = set(counts) - set(STANDARD)
    if unknown:
        raise ValueError(f"evaluate_autoattack: unknown counts {sorted(unknown)}; valid: "
                         f"{sorted(STANDARD)}.")
    params = {**STANDARD, **counts}
    mesh = mesh or sharding.make_mesh()
    eps_list = tuple(int(e) for e in eps_list)
    t0 = time.time()
    kept, rows = _local_rows(core.with_index(batches, mesh.shape[sharding.DATA]))
    size = kept[0]["images"].shape[0]
    # A hashable logits_fn (core.ModelLogits) shares the engine's compiled programs; any
    # other keeps one cache across the stages, so each family compiles once.
    cache = None if core.is_hashable(logits_fn) else core.Compiled()
    common = dict(num_classes=num_classes, seed=seed, bounds=bounds, mesh=mesh, cache=cache)

    def on_clean(p: core.Progress) -> None:
        progress(Progress(p.done, p.total, p.correct["clean"], {}, p.elapsed))

    first = core.evaluate_specs(logits_fn, variables, kept, list(extra_specs), total=total,
                                progress=on_clean if progress else None, **common)
    index, clean = first.index, first.correct["clean"]
    # This process's rows in the order of the (global, sorted) index.
    pos = np.searchsorted(index, rows["index"])
    correct = {s: v for s, v in first.correct.items() if s != "clean"}
    seconds = {s: v for s, v in first.attack_seconds.items() if s != "clean"}
    compile_s = dict(first.compile_seconds)
    stages: dict[int, list[Stage]] = {}
    ref_eps = max(eps_list)
    attacks = standard_specs(ref_eps, num_classes, **params)
    grid = suite_grid(attacks, eps_list)
    for e in eps_list:
        robust = clean.copy()
        stages[e] = []
        for name, a in zip(STAGE_NAMES, attacks, strict=True):
            spec = grid[(a, e)]
            attacked = int(robust.sum())
            sec = 0.0
            if attacked:
                sub = _sub_batches(rows, robust[pos], size)
                r = core.evaluate_specs(logits_fn, variables, sub, [spec], **common)
                where = np.searchsorted(index, r.index)
                if not np.array_equal(index[where], r.index) or not robust[where].all():
                    raise RuntimeError(f"AutoAttack stage {spec}: the sub-split's examples "
                                       "are not the survivors of the previous stage.")
                robust[where] &= r.correct[spec]
                sec = r.attack_seconds[spec]
                for k, v in r.compile_seconds.items():
                    compile_s[k] = compile_s.get(k, 0.0) + v
            correct[spec] = robust.copy()
            seconds[spec] = sec
            st = Stage(name, spec, attacked, int(robust.sum()), round(sec, 3))
            stages[e].append(st)
            if log is not None:
                log(f"AutoAttack eps {e}: {name} ({spec}) ran on {attacked} examples, fooled "
                    f"{st.fooled}; robust {st.robust_after}/{len(index)} "
                    f"({100 * st.robust_after / len(index):.1f}%), {sec:.1f}s.")
    suite = SuiteResult(
        attacks=attacks, eps_list=eps_list, labels=first.labels, clean_correct=clean,
        correct=correct, grid=grid, seconds={s: round(v, 3) for s, v in seconds.items()},
        zero_grad_fraction=first.zero_grad_fraction,
        zero_grad_examples=first.zero_grad_examples,
        # The cascade attacks survivors, not the first examples: no image grid.
        clean_images=np.zeros((0,)), adv_images={}, index=index,
        compile_seconds={s: round(v, 3) for s, v in compile_s.items()})
    return AutoAttackResult(suite, stages, time.time() - t0)


# ---- the RobustBench-style summary --------------------------------------------------------

def robustbench_summary(result: AutoAttackResult, eps: int, *, model: str, dataset: str,
                        code_version: str, architecture: str = "", split: str = "",
                        seed: int = 0) -> dict[str, Any]:
    """One eps of the cascade in RobustBench's spirit (its ``clean_acc``/``autoattack_acc``
    are percentages; eps on the [0, 1] scale as ``"16/255"`` and as a float)."""
    s = result.suite
    n = s.num_examples
    pct = lambda k: round(100.0 * k / n, 2)
    return {
        "model": model, "architecture": architecture, "dataset": dataset, "split": split,
        "threat_model": "Linf", "eps": f"{eps}/255", "eps_float": eps / 255.0,
        "n_examples": n, "clean_acc": pct(int(s.clean_correct.sum())),
        "autoattack_acc": pct(int(s.worst_correct(eps).sum())),
        "version": "standard", "attack_seed": seed,
        "attacks": [{"attack": st.name, "spec": st.spec, "n_attacked": st.attacked,
                     "n_fooled": st.fooled, "robust_acc_after": pct(st.robust_after),
                     "seconds": st.seconds} for st in result.stages[eps]],
        "seconds_per_example": round(sum(st.seconds for st in result.stages[eps]) / n, 4),
        "code_version": code_version,
    }
