"""The attack-spec grammar and the table of attack families: the one owner of both.

A spec is ``clean`` or ``NAME_F1_F2[_F3][_SUFFIX...]``: the family name, its integer fields
(EPS and STEP on the 0..255 pixel scale, rescaled by ``(hi - lo) / 255`` for bounds
``(lo, hi)``; NITER / NQUERIES counts), then optional suffixes in any order, each once:
``_rK`` (K runs, the worst case per example) and, where the family takes it, ``_tK``
(targeted runs at the top K other classes). ``_r1`` and ``_t0`` are the defaults:
``pgd_16_2_20_r1`` IS ``pgd_16_2_20`` (it parses to the same spec and formats without the
suffix); a suffix never changes what an attack targets.

| spec | attack | attacks |
|---|---|---|
| ``pgd_EPS_STEP_NITER[_rK]`` | the original untargeted PGD | the model's prediction |
| ``pgdll_EPS_STEP_NITER[_rK]`` | the original PGD towards the least likely class | prediction |
| ``pgdrnd_EPS_STEP_NITER[_rK]`` | the original PGD towards a random class | prediction |
| ``pgdtrue_EPS_STEP_NITER[_rK]`` | untargeted PGD on the true label's cross-entropy | true label |
| ``pgdcw_EPS_STEP_NITER[_rK]`` | PGD ascending the Carlini-Wagner margin | true label |
| ``apgdce_EPS_NITER[_tK][_rK]`` | APGD on cross-entropy (``_tK``: targeted) | true label |
| ``apgddlr_EPS_NITER[_tK][_rK]`` | APGD on the DLR loss (``_tK``: APGD-T) | true label |
| ``square_EPS_NQUERIES[_rK]`` | Square Attack, score-based black box | true label |
| ``fabt_EPS_NITER[_tK][_rK]`` | FAB-T, minimal perturbation (``_t0``: 9 targets) | true label |

The original's three specs keep their meaning exactly: ``pgd`` uses the model's own
prediction as the label, ``pgdll``/``pgdrnd`` target the least likely / a random class;
EPS, STEP and NITER may be 0 for them (EPS 0 runs the clean images through the attack,
NITER 0 is the random start alone). ``pgdtrue`` is ``pgd`` with the true label.

**The family interface** (the one place it is written down). A family is one line of the
table ``FAMILIES``: the built-in ones below, a researcher's own added by
``register_family`` (an explicit call, never an import's side effect). Its ``run`` is a
callable or a ``"module:function"`` string (imported on first use, so no import order
decides anything) naming a pure function::

    run(logits_fn, images, key, spec, *, bounds, random_start, labels) -> adversarial images

- ``logits_fn(x)`` gives inference-mode logits of a batch ``x``; no gradient of the result
  may reach what it closes over (the model's variables).
- ``images`` [N, ...] in ``bounds = (lo, hi)``; ``key`` one PRNG key for the batch;
  ``labels`` [N] the true labels or None (the engine always passes them; a family that
  attacks the prediction ignores them).
- ``spec`` is the parsed ``AttackSpec``: ``spec.eps``/``spec.step`` on the 0..255 scale
  (multiply by ``(hi - lo) / 255``), and **they may be traced** (the engine compiles a
  family once for every eps), so use them only in arithmetic, never in Python control
  flow or shapes; ``spec.niter``, ``spec.restarts``, ``spec.targets``, ``spec.label`` and
  ``spec.loss`` are Python values. A family that takes ``_rK`` runs ``spec.restarts`` runs
  and keeps the worst case per example, run 0 with ``key`` itself (as
  ``alp_jax.attacks.common.worst_case_runs`` does), so that ``_rK`` can only fool more;
  one that takes ``_tK`` attacks ``spec.targets`` target classes.
- ``random_start`` False starts at the clean images (exact comparisons).
- The result has the shape and dtype of ``images``, lies inside the L-inf eps-ball around
  them and inside ``bounds`` (``alp_jax.attacks.pgd.project`` does both), and is
  ``jax.lax.stop_gradient``-ed.
- It works under ``jit`` and ``vmap``: pure JAX, no Python side effects, no host
  round-trips. The engine (``alp_jax.engine``) runs it under ``vmap`` on one-example
  batches with one key per example (``generate_per_example``), jitted and sharded over
  every device; training runs it on the whole batch with one key
  (``generate_adversarial_examples``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
import types
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax

LogitsFn = Callable[[jax.Array], jax.Array]
Bounds = tuple[float, float]

# What an attack moves away from / towards (``AttackSpec.label``).
LABELS = ("prediction", "least_likely", "random", "true")
_FIELD_ATTR = {"EPS": "eps", "STEP": "step", "NITER": "niter", "NQUERIES": "niter"}
SUFFIXES = {"t": ("targets", "target classes K", 0), "r": ("restarts", "restarts K", 1)}
MAX_SUFFIX = 10_000


@dataclasses.dataclass(frozen=True)
class Family:
    """One attack method (the first ``_``-field of a spec): its layout and its function."""

    fields: tuple[str, ...]  # the integer fields after the name, e.g. ("EPS", "STEP", "NITER")
    suffixes: str  # the suffix letters it takes, in canonical order ("r", "tr")
    run: str | Callable[..., jax.Array]  # the family interface (module docstring), or
    # "module:function" naming it
    label: str = "true"  # one of LABELS
    loss: str = "xent"  # objective: xent, cw (margin), dlr, margin (Square)
    black_box: bool = False  # only queries the model's outputs (no gradients)
    zero_ok: bool = False  # EPS, STEP and NITER may be 0 (the original's PGD)


_PGD = ("EPS", "STEP", "NITER")
_KRUN = "alp_jax.attacks.restarts:run"

# The attack families, one line each (built in; ``register_family`` adds more).
_FAMILIES: dict[str, Family] = {
    "pgd": Family(_PGD, "r", _KRUN, label="prediction", zero_ok=True),
    "pgdll": Family(_PGD, "r", _KRUN, label="least_likely", zero_ok=True),
    "pgdrnd": Family(_PGD, "r", _KRUN, label="random", zero_ok=True),
    "pgdtrue": Family(_PGD, "r", _KRUN, label="true", zero_ok=True),
    "pgdcw": Family(_PGD, "r", _KRUN, label="true", loss="cw"),
    "apgdce": Family(("EPS", "NITER"), "tr", "alp_jax.attacks.apgd:run", loss="xent"),
    "apgddlr": Family(("EPS", "NITER"), "tr", "alp_jax.attacks.apgd:run", loss="dlr"),
    "square": Family(("EPS", "NQUERIES"), "r", "alp_jax.attacks.square:run", loss="margin",
                     black_box=True),
    "fabt": Family(("EPS", "NITER"), "tr", "alp_jax.attacks.fab:run", loss="margin"),
}
# The table, read-only: ``register_family`` is the one way to add to it.
FAMILIES: Mapping[str, Family] = types.MappingProxyType(_FAMILIES)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A parsed attack spec. ``eps`` and ``step`` are on the 0..255 scale; ``spec`` is the
    canonical string (``format_spec``), or a template name such as ``pgd_EPS_STEP_20``."""

    method: str
    eps: float = 0.0
    step: float = 0.0
    niter: int = 0
    restarts: int = 1
    targets: int = 0  # > 0: targeted runs at each of the top-``targets`` other classes
    label: str = "prediction"
    loss: str = "xent"
    spec: str = "clean"

    @property
    def is_clean(self) -> bool:
        return self.method == "clean"

    @property
    def true_label(self) -> bool:
        """Attacks the true label (not the model's prediction or a target class)."""
        return self.label == "true"

    @property
    def family(self) -> Family:
        return FAMILIES[self.method]

    def __str__(self) -> str:
        return self.spec


class AttackFn(Protocol):
    def __call__(self, logits_fn: LogitsFn, images: jax.Array, key: jax.Array,
                 spec: AttackSpec, *, bounds: Bounds, random_start: bool,
                 labels: jax.Array | None) -> jax.Array: ...


def form(method: str) -> str:
    """The family's form, e.g. ``apgdce_EPS_NITER[_tK][_rK]``."""
    fam = FAMILIES[method]
    return "_".join((method, *fam.fields)) + "".join(f"[_{s}K]" for s in fam.suffixes)


def valid_forms() -> list[str]:
    return ["clean"] + [form(m) for m in FAMILIES]


def spec_error(spec: str, why: str) -> ValueError:
    """The error every malformed spec raises: the spec, what is wrong, the valid forms."""
    return ValueError(f"Invalid attack spec {spec!r}: {why}. Valid forms: "
                      f"{', '.join(valid_forms())} (EPS and STEP integers on the 0..255 "
                      "scale, NITER a positive integer).")


def parse_int(spec: str, field: str, what: str, minimum: int = 1,
              maximum: int | None = None) -> int:
    """One integer field of a spec, with an error that names the spec."""
    if not (field.isascii() and field.isdigit()):  # str.isdigit also accepts e.g. '²'
        raise spec_error(spec, f"{what} must be an integer, got {field!r}")
    value = int(field)
    if value < minimum or (maximum is not None and value > maximum):
        rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise spec_error(spec, f"{what} must be in {rng}, got {value}")
    return value


def parse_attack(spec: str | AttackSpec) -> AttackSpec:
    """Parses ``clean`` or ``NAME_...`` (any form of ``FAMILIES``) into an AttackSpec."""
    if isinstance(spec, AttackSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"attack spec must be a string or AttackSpec, got {type(spec).__name__}")
    s = spec.strip()
    if s == "clean":
        return AttackSpec("clean")
    method, *fields = s.split("_")
    if method not in FAMILIES:
        raise spec_error(spec, f"unknown method {method!r}")
    fam = FAMILIES[method]
    n = len(fam.fields)
    if len(fields) < n or len(fields) > n + len(fam.suffixes):
        raise spec_error(spec, f"expected {form(method)}")
    values: dict[str, Any] = {}
    for name, field in zip(fam.fields, fields[:n], strict=True):
        lo = 0 if fam.zero_ok else 1
        values[_FIELD_ATTR[name]] = parse_int(spec, field, name, lo,
                                              255 if name in ("EPS", "STEP") else None)
    for field in fields[n:]:
        kind = field[:1]
        if kind not in fam.suffixes or len(field) < 2:
            raise spec_error(spec, f"unexpected field {field!r}; expected {form(method)}")
        attr, what, _ = SUFFIXES[kind]
        if attr in values:
            raise spec_error(spec, f"suffix _{kind}K given twice")
        values[attr] = parse_int(spec, field[1:], what, 1, MAX_SUFFIX)
    parsed = AttackSpec(method, label=fam.label, loss=fam.loss, **values)
    return dataclasses.replace(parsed, spec=format_spec(parsed))


def format_spec(spec: AttackSpec) -> str:
    """The canonical string of a spec: fields, then the non-default suffixes (``_tK``
    before ``_rK``). ``format_spec(parse_attack(s)) == s`` for every canonical ``s``."""
    if spec.is_clean:
        return "clean"
    fam = FAMILIES[spec.method]
    parts = [spec.method, *(str(int(getattr(spec, _FIELD_ATTR[f]))) for f in fam.fields)]
    for kind in fam.suffixes:
        attr, _, default = SUFFIXES[kind]
        if getattr(spec, attr) != default:
            parts.append(f"{kind}{int(getattr(spec, attr))}")
    return "_".join(parts)


def canonical(spec: str | AttackSpec) -> str:
    """``format_spec(parse_attack(spec))``: e.g. ``pgd_16_2_20_r1`` -> ``pgd_16_2_20``."""
    return parse_attack(spec).spec


def with_eps(spec: str | AttackSpec, eps: int) -> AttackSpec:
    """``spec`` at another EPS (an integer on the 0..255 scale).

    For specs with a STEP, STEP keeps its ratio to EPS (rounded half up, at least 1), so
    that NITER steps still cross the ball at every eps: ``with_eps('pgdll_16_2_10', 8)`` is
    ``pgdll_8_1_10``. Every other field and suffix stays. ``clean`` stays ``clean``; the
    spec at its own EPS is unchanged.
    """
    spec = parse_attack(spec)
    if spec.is_clean:
        return spec
    if isinstance(eps, bool) or not isinstance(eps, numbers.Integral) or not 1 <= eps <= 255:
        raise ValueError(f"eps must be an integer in 1..255 (the 0..255 scale), got {eps!r}.")
    eps = int(eps)
    if eps == spec.eps:
        return spec
    if spec.eps == 0:
        raise ValueError(f"Attack {spec.spec!r} has EPS 0: it gives no STEP/EPS ratio to "
                         f"rescale to eps {eps}; give the template at a positive EPS.")
    out = dataclasses.replace(spec, eps=eps)
    if "STEP" in spec.family.fields:
        out = dataclasses.replace(out, step=min(255, max(1, math.floor(
            spec.step * eps / spec.eps + 0.5))))
    return dataclasses.replace(out, spec=format_spec(out))


def is_black_box(spec: str | AttackSpec) -> bool:
    """True for attacks that only query the model's outputs (no gradients)."""
    s = parse_attack(spec)
    return not s.is_clean and s.family.black_box


def template(spec: str | AttackSpec) -> AttackSpec:
    """The spec with EPS and STEP left open (0, named ``EPS``/``STEP``): one compiled
    attack serves every eps; ``dataclasses.replace(template, eps=e, step=s)`` fills it."""
    spec = parse_attack(spec)
    if spec.is_clean:
        return spec
    name = format_spec(spec).split("_")
    name[1] = "EPS"
    if "STEP" in spec.family.fields:
        name[2] = "STEP"
    return dataclasses.replace(spec, eps=0.0, step=0.0, spec="_".join(name))


def seed_name(spec: str | AttackSpec) -> str:
    """The spec without its ``_rK``: all restart counts share their randomness, so that
    ``..._rK`` starts with exactly the run of ``..._r1`` and more runs can only fool more."""
    return format_spec(dataclasses.replace(parse_attack(spec), restarts=1))


def seed_index(spec: str | AttackSpec) -> int:
    """A 31-bit integer naming a spec's randomness (``crc32`` of ``seed_name``)."""
    return zlib.crc32(seed_name(spec).encode()) & 0x7FFFFFFF


# ---- registration ---------------------------------------------------------------------------

# The field layouts the grammar can parse, format, rescale (``with_eps``) and template: EPS
# first, then STEP, then one count (NITER or NQUERIES), each optional after EPS.
LAYOUTS = tuple((("EPS",) + step + count) for step in ((), ("STEP",))
                for count in ((), ("NITER",), ("NQUERIES",)))
_SUFFIX_SETS = ("", "r", "t", "tr")  # canonical order: _tK before _rK
_NAME = re.compile(r"[a-z][a-z0-9]*\Z")
_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def register_family(name: str, *, fields: Iterable[str], run: str | Callable[..., jax.Array],
                    suffixes: str = "", label: str = "true", loss: str = "xent",
                    black_box: bool = False, zero_ok: bool = False) -> Family:
    """Adds the attack family ``name``: from this call on, ``NAME_F1[_F2...][_SUFFIX...]``
    is a spec everywhere one is accepted (training, ``alp-eval``, the robustness suite,
    the masking probes, ``generate_adversarial_examples``), with per-example keys,
    ``with_eps`` and templates as for the built-in families.

    ``fields``: one of ``LAYOUTS``, e.g. ``("EPS", "STEP", "NITER")``; ``run``: a callable
    with the family interface (this module's docstring) or a ``"module:function"`` string
    naming one (imported when a spec of it first runs); ``suffixes``: which of ``_tK``
    and ``_rK`` it takes (``""``, ``"r"``, ``"t"``, ``"tr"``; ``run`` then honours
    ``spec.targets`` / ``spec.restarts``); ``label``: what it attacks, one of ``LABELS``
    (``"true"``: the true labels, ``"prediction"``: the model's clean prediction; it sets
    ``spec.label``); ``loss``: its objective's name, recorded as ``spec.loss``;
    ``black_box``: it only queries the logits (the masking checks compare such attacks
    with the white-box ones); ``zero_ok``: EPS, STEP and NITER may be 0.

    Nothing registers on import: call this once (e.g. from your module's ``register()``,
    which ``alp-robustness --attack_modules`` calls). A taken name is refused, naming it.
    Returns the family's table line.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name == "clean":
        raise ValueError(f"register_family: name must be lowercase letters and digits, "
                         f"starting with a letter, not 'clean' (no '_': it separates the "
                         f"spec's fields), got {name!r}.")
    if name in _FAMILIES:
        raise ValueError(f"register_family: the attack family {name!r} is already taken "
                         f"({form(name)}); choose another name.")
    fields = tuple(fields) if not isinstance(fields, str) else (fields,)
    if fields not in LAYOUTS:
        raise ValueError(f"register_family({name!r}): fields {fields} is not a layout the "
                         f"grammar takes; valid: {', '.join('_'.join(f) for f in LAYOUTS)}.")
    if suffixes not in _SUFFIX_SETS:
        raise ValueError(f"register_family({name!r}): suffixes {suffixes!r} is not one of "
                         f"{', '.join(map(repr, _SUFFIX_SETS))} (t: _tK, r: _rK).")
    if label not in LABELS:
        raise ValueError(f"register_family({name!r}): label {label!r} is not one of "
                         f"{', '.join(LABELS)}.")
    if not isinstance(loss, str) or not loss:
        raise ValueError(f"register_family({name!r}): loss must be a non-empty name, "
                         f"got {loss!r}.")
    if not callable(run) and not (isinstance(run, str) and _REF.match(run)):
        raise ValueError(f"register_family({name!r}): run must be a callable or a "
                         f"'module:function' string, got {run!r}.")
    family = Family(fields, suffixes, run, label=label, loss=loss, black_box=bool(black_box),
                    zero_ok=bool(zero_ok))
    _FAMILIES[name] = family
    return family


def resolve(ref: str | Callable[..., Any], what: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names (a callable is returned as it
    is); ``what`` names its owner in the error."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}: cannot load {ref!r} ({type(e).__name__}: {e}).") from None
    if not callable(fn):
        raise ValueError(f"{what}: {ref!r} is not a function.")
    return fn


def register_modules(modules: Iterable[str]) -> list[str]:
    """Imports each module named and calls its ``register()`` (which calls
    ``register_family`` and, if it likes, ``objectives.register_objective``); a name given
    twice is loaded once. Returns the modules loaded. This is what ``--attack_modules``
    does (``alp-train``, ``alp-eval``, ``alp-robustness``, once per run): importing a
    module registers nothing, calling its ``register()`` does."""
    loaded = []
    for module in dict.fromkeys(m.strip() for m in modules if m.strip()):
        if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
            raise ValueError(f"--attack_modules: {module!r} is not a module name.")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"--attack_modules: cannot import {module!r} "
                             f"({type(e).__name__}: {e}).") from None
        if not callable(getattr(mod, "register", None)):
            raise ValueError(f"--attack_modules: module {module!r} has no register() "
                             "function; define one that calls "
                             "alp_jax.attacks.register_family(...).")
        mod.register()
        loaded.append(module)
    return loaded

# ---- running ------------------------------------------------------------------------------

def attack_function(spec: str | AttackSpec) -> AttackFn:
    """The family function that runs ``spec`` (imported on first use)."""
    spec = parse_attack(spec)
    return resolve(spec.family.run, f"attack family {spec.method!r}")


def generate_adversarial_examples(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    attack: str | AttackSpec,
    bounds: Bounds = (-1.0, 1.0),
    random_start: bool = True,
    labels: jax.Array | None = None,
) -> jax.Array:
    """Adversarial versions of ``images`` for ``attack``, one key for the batch (training).

    ``logits_fn`` maps images to logits and should run the model in inference mode; no
    gradient flows from the result into anything ``logits_fn`` closes over.
    ``random_start=False`` starts at the clean images (for exact comparisons).
    ``labels`` (true labels) are used only by specs that attack the true label; the
    original methods use the model's own predictions.
    """
    spec = parse_attack(attack)
    if spec.is_clean:
        return images
    return attack_function(spec)(logits_fn, images, key, spec, bounds=tuple(bounds),
                                 random_start=random_start, labels=labels)


def generate_per_example(logits_fn: LogitsFn, images: jax.Array, keys: jax.Array,
                         attack: str | AttackSpec, bounds: Bounds = (-1.0, 1.0),
                         labels: jax.Array | None = None,
                         random_start: bool = True) -> jax.Array:
    """As ``generate_adversarial_examples``, but example i is attacked alone with
    ``keys[i]``: its result does not depend on the batch it sits in (size, order, device).

    The family function runs under ``vmap`` on one-example batches (the model still sees
    the whole batch at once); loops that stop when the batch is fooled stop per example.
    """
    spec = parse_attack(attack)
    if spec.is_clean:
        return images
    fn = attack_function(spec)

    def one(x, k, y):
        y1 = None if y is None else y[None]
        return fn(lambda z: logits_fn(z), x[None], k, spec, bounds=tuple(bounds),
                  random_start=random_start, labels=y1)[0]

    if labels is None:
        return jax.vmap(lambda x, k: one(x, k, None))(images, keys)
    return jax.vmap(one)(images, keys, labels)
