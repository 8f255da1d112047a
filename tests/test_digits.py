"""The digits data set (``alp_jax.data.digits``) is scikit-learn's, read without importing
scikit-learn."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np

from alp_jax.data import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_are_exactly_load_digits_on_both_paths(monkeypatch):
    """The file read directly gives ``load_digits``'s images and labels, bit for bit, and
    so does the fallback (scikit-learn's own loader) when the file is not found."""
    from sklearn.datasets import load_digits

    want = load_digits()
    images, labels = digits._raw_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    np.testing.assert_array_equal(images, want.images)
    np.testing.assert_array_equal(labels, want.target)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    images, labels = digits._raw_digits()
    np.testing.assert_array_equal(images, want.images)
    np.testing.assert_array_equal(labels, want.target)


def test_loading_a_split_does_not_import_scikit_learn():
    script = ("import sys\n"
              "from alp_jax.data import digits\n"
              "x, y = digits.load_split('validation', 8)\n"
              "print(x.shape, len(y), 'sklearn' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(359,", "8,", "8,", "3)", "359", "False"], r.stdout
