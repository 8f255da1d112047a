"""Guards that keep a run from reporting a wrong number or failing late (issue 15).

Each test reproduces one finding: out-of-range labels scored as correct, config values
outside their valid range accepted, unknown / mistyped ``--config.*`` fields ending in a
long traceback, ``--num_examples`` larger than the split, a killed converter leaving files.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import losses


def test_topk_correct_never_counts_out_of_range_labels():
    # All-equal logits: top-5 of 10 classes holds classes 0..4, and the old lookup of label
    # 15 gave NaN, which nothing is greater than, so it counted as correct.
    logits = jnp.zeros((5, 10)).at[:, 9].set(1.0)
    labels = jnp.array([9, 15, -1, 10, 0])
    for k in (1, 5, 10):
        got = np.asarray(losses.topk_correct(logits, labels, k))
        assert got.tolist() == [True, False, False, False, k >= 2], k


def test_check_labels_names_label_index_and_class_count():
    losses.check_labels(np.array([0, 9, 3]), 10)
    losses.check_labels(np.zeros((0,), np.int32), 10)
    with pytest.raises(ValueError, match=r"^labels: label 15 at index 3 is outside \[0, 10\): "
                       r"the model has 10 classes \(does --config.num_classes match"):
        losses.check_labels(np.array([1, 2, 3, 15, 17]), 10)
    with pytest.raises(ValueError, match=r"^eval labels: label -1 at index 0 is outside"):
        losses.check_labels(np.array([-1, 2]), 10, what="eval labels")
