"""The evaluation engine ``alp_jax.eval``, ``alp_jax.robustness`` and the demo all call.

- ``core``: per-example top-1 / top-5 correctness under any attack specs, jitted once per
  attack family for all eps, sharded over the mesh's data axis (``alp_jax.sharding``),
  multi-host (each process feeds its share, every process gets the whole answer); the
  last partial batch padded and masked; attack keys per example and spec.
- ``suite``: a suite of attacks at several eps, the worst case per example, and the
  per-example files (``per_example.npz``) that let runs be compared and combined.
- ``masking``: the gradient-masking checks, in words.
- ``report``: tables, curves, the adversarial-example grid, the output files.

The attack grammar is ``alp_jax.attacks.grammar``'s.
"""

from alp_jax.engine.core import (
    ModelLogits,
    PerExample,
    array_batches,
    evaluate_specs,
    pad_batch,
    split_batches,
)
from alp_jax.engine.masking import (
    MaskingProbes,
    Thresholds,
    default_probes,
    format_checks,
    masking_checks,
)
from alp_jax.engine.report import (
    ProgressBar,
    format_table,
    plot_curves,
    plot_examples,
    table_rows,
    write_outputs,
)
from alp_jax.engine.suite import (
    DEFAULT_ATTACKS,
    DEFAULT_EPS,
    Progress,
    SuiteResult,
    combine_worst,
    evaluate_suite,
    load_per_example,
    per_example_arrays,
    save_per_example,
    suite_grid,
)

__all__ = [
    "DEFAULT_ATTACKS", "DEFAULT_EPS", "MaskingProbes", "ModelLogits", "PerExample", "Progress",
    "ProgressBar", "SuiteResult", "Thresholds", "array_batches", "combine_worst",
    "default_probes", "evaluate_specs", "evaluate_suite", "format_checks", "format_table",
    "load_per_example", "masking_checks", "pad_batch", "per_example_arrays", "plot_curves",
    "plot_examples", "save_per_example", "split_batches", "suite_grid", "table_rows",
    "write_outputs",
]
