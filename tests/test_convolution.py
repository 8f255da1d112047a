"""``alp_jax.convolution``: im2col convolutions against ``lax.conv_general_dilated``.

The model-level check (the same logits and gradients with every ``conv_impl``) is in
``tests/test_model.py``; here the single convolution, over the strides, paddings and
kernel-larger-than-input shapes that ResNet-v2 at small inputs produces.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from alp_jax.convolution import conv2d, im2col_conv, kernel_exceeds_input

# (input size, kernel size, stride, padding): a 3x3 kernel on a 2x2 map (block4 of
# ResNet-v2-50 at 64x64), stride 2 with explicit and SAME padding, the 7x7 root
# convolution's conv2d_same padding, and a strided 1x1 shortcut.
CASES = [(2, 3, 1, "SAME"), (2, 3, 2, ((1, 1), (1, 1))), (5, 3, 2, "SAME"),
         (8, 7, 2, ((3, 3), (3, 3))), (4, 1, 2, "SAME")]


def _lax(x, w, s, pad):
    return jax.lax.conv_general_dilated(x, w, (s, s), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_im2col_conv_matches_lax_including_strides_and_padding():
    key = jax.random.PRNGKey(2)
    for h, k, s, pad in CASES:
        x = jax.random.normal(key, (2, h, h, 5))
        w = jax.random.normal(jax.random.fold_in(key, h * k), (k, k, 5, 6))

        @jax.jit
        def both(x, w, s=s, pad=pad):
            return _lax(x, w, s, pad), im2col_conv(x, w, s, pad)

        ref, got = both(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5,
                                   err_msg=f"h={h} k={k} stride={s} padding={pad}")


@pytest.mark.parametrize("impl", ["auto", "xla", "im2col"])
def test_conv2d_every_impl_matches_lax(impl):
    key = jax.random.PRNGKey(3)
    for h, k, s, pad in CASES:
        x = jax.random.normal(key, (2, h, h, 4))
        w = jax.random.normal(jax.random.fold_in(key, h * k), (k, k, 4, 3))
        got = jax.jit(lambda x, w, s=s, pad=pad: conv2d(x, w, s, pad, impl))(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(_lax(x, w, s, pad)),
                                   rtol=1e-5, atol=1e-5, err_msg=f"{impl}: h={h} k={k}")


def test_kernel_exceeds_input_and_unknown_impl():
    assert kernel_exceeds_input((1, 2, 2, 8), (3, 3, 8, 4))
    assert not kernel_exceeds_input((1, 3, 3, 8), (3, 3, 8, 4))
    x, w = np.zeros((1, 4, 4, 2), np.float32), np.zeros((3, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="'cudnn'.*auto, xla, im2col"):
        conv2d(x, w, impl="cudnn")
