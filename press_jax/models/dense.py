"""`Dense`: Flax's `nn.Dense` (same parameters, same forward) with its kernel gradient written out.

Autodiff's transpose of `x @ kernel` computes the kernel's gradient as `cotangent^T @ x` and
transposes the result, so XLA:CPU first writes the cotangent, (rows, out), in transposed layout.
That cotangent is usually the output of an element-wise fusion (a GELU's or a sigmoid's
derivative), and the transposing write of that fusion was one of the slowest passes of the
demo's backward step (4.2 ms for the encoder's (1624, 256) GELU derivative, about a millisecond
for each mask head's (3248, 256) one; README, "Speed"). Here the gradient is
`x^T @ cotangent` when `x` is the narrower of the two, so the transpose falls on the narrower
operand (often a plain input), and `cotangent^T @ x` otherwise, as before.

The input's gradient and the forward are the plain `lax.dot_general`; values are equal to
`nn.Dense`'s (tests/test_dense.py compares forward and both gradients).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax


def _rows(x):
  return x.reshape(-1, x.shape[-1])


def _kernel_gradient(inputs, cotangent, precision):
  """(in, out) = sum over rows of inputs^T cotangent, transposing the narrower operand."""
  x, g = _rows(inputs), _rows(cotangent)
  rows = (((0,), (0,)), ((), ()))
  if x.shape[1] <= g.shape[1]:
    return lax.dot_general(x, g, rows, precision=precision)
  return lax.dot_general(g, x, rows, precision=precision).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(inputs, kernel, precision):
  return lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


def _matmul_forward(inputs, kernel, precision):
  return _matmul(inputs, kernel, precision), (inputs, kernel)


def _matmul_backward(precision, residuals, cotangent):
  inputs, kernel = residuals
  inputs_gradient = lax.dot_general(cotangent, kernel,
                                    (((cotangent.ndim - 1,), (1,)), ((), ())),
                                    precision=precision)
  kernel_gradient = _kernel_gradient(inputs, cotangent, precision)
  return inputs_gradient.astype(inputs.dtype), kernel_gradient.astype(kernel.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """`lax.dot_general` for nn.Dense's contraction (last axis of lhs with a 2-D rhs's first),
  with the written-out kernel gradient; any other contraction goes to `lax.dot_general`."""
  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (rhs.ndim != 2 or preferred_element_type is not None
      or tuple(map(tuple, dimension_numbers[0])) != dense[0] or any(dimension_numbers[1])):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return _matmul(lhs, rhs, precision)


Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
Dense.__doc__ = "nn.Dense with the kernel gradient of `dense_dot_general` (module docstring)."
