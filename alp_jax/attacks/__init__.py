"""Attack families for training and honest robustness evaluation.

``alp_jax.attacks.grammar`` owns the spec grammar (parse, format, ``with_eps``, templates,
seeds) and the table of families (``FAMILIES``), and documents **the family interface**
(the ``run`` signature, ``stop_gradient``, the eps-ball and bounds, ``jit``/``vmap``) in
its docstring: the one place it is written down. The modules here hold the attacks:

- ``pgd``: the original PGD (``pgd``, ``pgdll``, ``pgdrnd``), ``pgdtrue``, and the parts
  of every signed-gradient attack (``alp_jax.pgd`` is its public face);
- ``restarts``: K runs of any PGD family (``_rK``) and PGD on the CW margin (``pgdcw``);
- ``apgd``: APGD-CE / APGD-DLR, targeted with ``_tK``;
- ``square``: the Square Attack (black box);
- ``fab``: FAB-T;
- ``common``: reference labels, margins, random starts, the worst case over runs.

A family of your own is one call, ``register_family(name, fields=..., run=...)``; after
it, its specs work everywhere a spec is accepted. ``register_modules`` imports modules
and calls their ``register()`` (``alp-robustness --attack_modules``). Nothing registers
itself on import: a family's function is imported when a spec of it first runs, so no
import order changes what a spec means.
"""

from alp_jax.attacks.grammar import (
    FAMILIES,
    LABELS,
    LAYOUTS,
    AttackSpec,
    Family,
    register_family,
    register_modules,
)

__all__ = ["FAMILIES", "LABELS", "LAYOUTS", "AttackSpec", "Family", "register_family",
           "register_modules"]
