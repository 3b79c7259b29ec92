"""press_jax.models.dense.Dense against flax.linen.Dense: parameters, forward and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax.models.dense import Dense


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,features,use_bias", [
    ((8, 203, 160), 256, False),  # Narrow input: the input is transposed for the kernel gradient.
    ((2, 2, 50, 256), 160, True),  # Wide input: the cotangent is transposed, as autodiff does.
    ((7, 32), 32, True),
    ((3, 1, 5), 4, True)])
def test_dense_equals_flax_dense_forward_and_gradients(shape, features, use_bias, dtype):
  key_x, key_p, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, shape)
  ours, reference = (cls(features, use_bias=use_bias, dtype=dtype) for cls in (Dense, nn.Dense))
  params = reference.init(key_p, x)
  assert (jax.tree_util.tree_structure(ours.init(key_p, x))
          == jax.tree_util.tree_structure(params))
  cotangent = jax.random.normal(key_g, (*shape[:-1], features)).astype(dtype)

  def pullback(module):
    value, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return value, vjp(cotangent)

  (value, grads), (expected, expected_grads) = pullback(ours), pullback(reference)
  assert value.dtype == expected.dtype
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
    assert got.dtype == want.dtype and got.shape == want.shape
  if dtype == jnp.bfloat16:  # Both round the matmuls to 8 bits of mantissa.
    for got, want in zip(jax.tree_util.tree_leaves((value, grads)),
                         jax.tree_util.tree_leaves((expected, expected_grads))):
      np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=5e-2)
    return
  # float32: both against float64 numpy, within a bound on float32 rounding of each sum
  # (1e-6 of the sum of the terms' magnitudes: ~16 ulp of it; the two sum in other orders).
  x64, g64 = np.float64(x), np.float64(cotangent)
  kernel = np.float64(params["params"]["kernel"])
  x_rows, g_rows = x64.reshape(-1, shape[-1]), g64.reshape(-1, features)
  reference_grads = {"kernel": (x_rows.T @ g_rows, np.abs(x_rows).T @ np.abs(g_rows)),
                     "input": (g64 @ kernel.T, np.abs(g64) @ np.abs(kernel).T)}
  for name, got in (("kernel", grads[0]["params"]["kernel"]), ("input", grads[1])):
    for candidate in (got, {"kernel": expected_grads[0]["params"]["kernel"],
                            "input": expected_grads[1]}[name]):
      exact, magnitude = reference_grads[name]
      assert np.all(np.abs(np.float64(candidate) - exact) <= 1e-6 * magnitude + 1e-7), name
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
  if use_bias:
    np.testing.assert_allclose(grads[0]["params"]["bias"], g_rows.sum(0), rtol=1e-5, atol=1e-4)


def test_dense_kernel_gradient_against_numpy():
  """The kernel gradient of sum(w * (x @ kernel)) is x^T w, summed over every leading axis."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 6, 3)).astype(np.float32)
  weights = rng.standard_normal((4, 6, 5)).astype(np.float32)
  module = Dense(5, use_bias=False)
  params = module.init(jax.random.key(0), x)
  grads = jax.grad(lambda p: jnp.sum(weights * module.apply(p, x)))(params)
  np.testing.assert_allclose(grads["params"]["kernel"],
                             np.einsum("bti,bto->io", x.astype(np.float64), weights), rtol=1e-5,
                             atol=1e-5)
