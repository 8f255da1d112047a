"""Attack families for training and honest robustness evaluation.

``alp_jax.attacks.grammar`` owns the spec grammar (parse, format, ``with_eps``, templates,
seeds) and the table of families (``FAMILIES``, one line each, with the family interface
documented there); the modules here hold the attacks themselves:

- ``alp_jax.pgd``: the original PGD (``pgd``, ``pgdll``, ``pgdrnd``) and ``pgdtrue``;
- ``restarts``: K runs of any PGD family (``_rK``) and PGD on the CW margin (``pgdcw``);
- ``apgd``: APGD-CE / APGD-DLR, targeted with ``_tK``;
- ``square``: the Square Attack (black box);
- ``common``: reference labels, margins, random starts, the worst case over runs.

Nothing registers itself on import: a family's function is imported when a spec of it
first runs, so no import order changes what a spec means.
"""
