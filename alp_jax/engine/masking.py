"""Gradient-masking checks: signs, in words, that a robust accuracy should not be trusted."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alp_jax.attacks import grammar
from alp_jax.engine.suite import SuiteResult


@dataclasses.dataclass(frozen=True)
class MaskingProbes:
    """The extra specs the masking checks run (concrete, eps included)."""

    large_eps: str  # should fool (almost) everything
    base: str  # a 1-run PGD ...
    more_iterations: str  # ... the same with more iterations ...
    more_restarts: str  # ... and with more restarts (same key: can only fool more)

    @property
    def specs(self) -> tuple[str, ...]:
        return (self.large_eps, self.base, self.more_iterations, self.more_restarts)


def default_probes(attacks: Sequence[str], *, large_eps_attack: str = "apgdce_128_50",
                   iteration_factor: int = 4, restarts: int = 5) -> MaskingProbes:
    """Probes built from the suite's first multi-run PGD (else ``pgdtrue_16_2_10_rK``).

    A PGD here is any white-box family with a STEP and NITER field, registered ones too
    (``grammar.register_family``): its NITER and restarts are what the probes vary.

    ``pgdtrue_16_2_20_r5`` in the suite gives base ``pgdtrue_16_2_20`` (one run), more
    iterations ``pgdtrue_16_2_80`` and more restarts ``pgdtrue_16_2_20_r5`` (already
    computed; the same randomness as the base, so it can only fool more).
    """
    ref = next((s for s in map(grammar.parse_attack, attacks)
                if not s.is_clean and s.family.fields[1:] == ("STEP", "NITER")
                and not s.family.black_box and s.restarts > 1), None)
    if ref is None:
        ref = grammar.parse_attack(f"pgdtrue_16_2_10_r{restarts}")
    base = dataclasses.replace(ref, restarts=1)
    more_iter = dataclasses.replace(base, niter=ref.niter * iteration_factor)
    return MaskingProbes(large_eps=grammar.canonical(large_eps_attack),
                         base=grammar.format_spec(base),
                         more_iterations=grammar.format_spec(more_iter),
                         more_restarts=ref.spec)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a masking check fails (accuracies as fractions)."""

    large_eps_max_accuracy: float = 0.02
    # A rise smaller than this (or than one example) is put down to chance.
    rise_tolerance: float = 0.005
    # Black box clearly better than every white-box attack: by more than this (and 2 examples).
    black_box_margin: float = 0.03
    max_zero_gradient_fraction: float = 0.5
    max_zero_gradient_examples: float = 0.05


def masking_checks(result: SuiteResult, probes: MaskingProbes | None,
                   thresholds: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """Signs of gradient masking, each ``{'name', 'passed', 'detail'}``; ``passed`` is None
    when the check could not run (e.g. no black-box attack in the suite)."""
    th = thresholds
    n = result.num_examples
    pct = lambda a: f"{100 * a:.1f}%"
    slack = max(th.rise_tolerance, 1.0 / n)
    checks = []

    def add(name, passed, detail):
        checks.append({"name": name, "passed": passed, "detail": detail})

    if probes is not None:
        acc = result.spec_accuracy(probes.large_eps)
        eps = grammar.parse_attack(probes.large_eps).eps
        ok = acc <= th.large_eps_max_accuracy
        add("large_eps", ok,
            f"{probes.large_eps} (eps {eps}/255 of the pixel range) leaves {pct(acc)} "
            f"accuracy (limit {pct(th.large_eps_max_accuracy)}). " + (
                "An attack this large fools practically everything, as it should." if ok else
                "FAILED: an attack this large should fool practically every example; the "
                "gradients may be masked (or the attack is broken), so the robust accuracies "
                "below may be overstated."))
        for name, other, what in (("more_iterations", probes.more_iterations, "iterations"),
                                  ("more_restarts", probes.more_restarts, "restarts")):
            a0, a1 = result.spec_accuracy(probes.base), result.spec_accuracy(other)
            ok = a1 <= a0 + slack
            add(name, ok,
                f"{probes.base}: {pct(a0)}; {other}: {pct(a1)}. " + (
                    f"More {what} did not raise accuracy." if ok else
                    f"FAILED: more {what} raised accuracy by {pct(a1 - a0)}; a stronger "
                    "attack doing worse points to noisy or masked gradients."))
    rises = []
    for a in (*result.attacks, None):
        accs = [result.worst_accuracy(e) if a is None else result.accuracy(a, e)
                for e in result.eps_list]
        order = np.argsort(result.eps_list)
        for j in range(1, len(order)):
            lo_e, hi_e = result.eps_list[order[j - 1]], result.eps_list[order[j]]
            if accs[order[j]] > accs[order[j - 1]] + slack:
                rises.append(f"{a or 'worst case'}: {pct(accs[order[j - 1]])} at eps {lo_e} "
                             f"-> {pct(accs[order[j]])} at eps {hi_e}")
    if len(result.eps_list) > 1:
        add("monotone_in_eps", not rises,
            "Accuracy never rises with eps." if not rises else
            "FAILED: accuracy rises with a larger eps (" + "; ".join(rises) + "), which a "
            "working attack cannot allow; gradients may be masked.")
    black = [a for a in result.attacks if grammar.is_black_box(a)]
    white = [a for a in result.attacks if not grammar.is_black_box(a)
             and not grammar.parse_attack(a).is_clean]
    if not black or not white:
        add("black_box", None, "Not run: the suite needs a black-box attack (square_...) "
            "and a white-box one.")
    else:
        bad, notes = [], []
        margin = max(th.black_box_margin, 2.0 / n)
        for e in result.eps_list:
            bb = min(result.accuracy(a, e) for a in black)
            wb = min(result.accuracy(a, e) for a in white)
            white_fooled = np.zeros(n, bool)
            for a in white:
                white_fooled |= ~result.correct[result.grid[(a, e)]]
            only_black = np.zeros(n, bool)
            for a in black:
                only_black |= ~result.correct[result.grid[(a, e)]] & ~white_fooled
            only_black &= result.clean_correct
            notes.append(f"eps {e}: black box {pct(bb)}, best white box {pct(wb)}, "
                         f"{int(only_black.sum())} examples fooled only by the black box")
            if bb < wb - margin:
                bad.append(e)
        add("black_box", not bad,
            "; ".join(notes) + ". " + (
                "The black-box attack does not beat the white-box ones." if not bad else
                f"FAILED at eps {', '.join(map(str, bad))}: the gradient-free attack beats "
                "every gradient-based one by more than "
                f"{pct(margin)}, so the gradients mislead the white-box attacks "
                "(gradient masking); trust the worst case, not the white-box numbers."))
    if probes is not None:
        # A probe at an eps of the suite must not find examples the worst case calls robust.
        missed = []
        for spec in dict.fromkeys(probes.specs):
            e = grammar.parse_attack(spec).eps
            if e in result.eps_list:
                k = int(np.sum(result.worst_correct(e) & ~result.correct[grammar.canonical(spec)]))
                if k:
                    missed.append(f"{spec} fools {k} examples the worst case at eps {e} "
                                  "counts as robust")
        add("suite_covers_probes", not missed,
            "The masking probes found no example the suite's worst case missed." if not missed
            else "FAILED: " + "; ".join(missed) + ". The suite is too weak: its worst case "
            "overstates robustness; add stronger attacks (more iterations or restarts).")
    zf, ze = result.zero_grad_fraction, result.zero_grad_examples
    ok = zf <= th.max_zero_gradient_fraction and ze <= th.max_zero_gradient_examples
    add("zero_gradients", ok,
        f"{pct(zf)} of the input-gradient entries (cross-entropy, clean inputs) are exactly "
        f"zero; {pct(ze)} of the examples have an all-zero gradient. " + (
            "Gradients carry signal." if ok else
            "FAILED: the gradients are (mostly) exactly zero, as behind a non-differentiable "
            "or saturated layer; gradient-based attacks cannot work here and their numbers "
            "overstate robustness."))
    return checks


def format_checks(checks: list[dict[str, Any]]) -> str:
    status = {True: "PASS", False: "FAIL", None: "SKIP"}
    lines = [f"[{status[c['passed']]}] {c['name']}: {c['detail']}" for c in checks]
    failed = [c["name"] for c in checks if c["passed"] is False]
    lines.append("Masking checks: " + (
        f"{len(failed)} FAILED ({', '.join(failed)}); the robust accuracies may be overstated."
        if failed else "all passed."))
    return "\n".join(lines)
