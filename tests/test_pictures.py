"""The pictures people read: the adversarial-example grid shows true and predicted classes.

The engine keeps the top-1 predictions of the images it keeps for the grid; they must be the
predictions its per-example correctness was scored from.
"""

from __future__ import annotations

import os

import helpers
import numpy as np

from alp_jax import engine


def test_grid_predictions_agree_with_the_scored_correctness(tmp_path) -> None:
    images, labels = helpers.digits_split("validation")
    images, labels = images[:16], labels[:16]
    variables = helpers.init_small_variables()
    result = engine.evaluate_suite(
        engine.ModelLogits(helpers.small_model()), engine.array_batches(images, labels, 16),
        ("pgd_16_4_2",), (16,), variables=variables, num_classes=helpers.NUM_CLASSES,
        num_images=4, total=16)
    spec = result.grid[("pgd_16_4_2", 16)]
    assert result.clean_predictions.shape == (4,) and result.adv_predictions[spec].shape == (4,)
    np.testing.assert_array_equal(result.clean_predictions == labels[:4],
                                  result.clean_correct[:4])
    np.testing.assert_array_equal(result.adv_predictions[spec] == labels[:4],
                                  result.correct[spec][:4])
    path = str(tmp_path / "adversarial_examples.png")
    engine.plot_examples(result, path)
    assert os.path.getsize(path) > 10_000
