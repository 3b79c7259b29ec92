"""Typed structures passed between the model, the losses and the exit rule."""

from __future__ import annotations

import flax.struct
import jax
from jaxtyping import Array, Float


@flax.struct.dataclass
class ExitOutputs:
  """Every exit's reconstruction and predicted error distribution, stacked on a leading exit axis.

  The error of exit e, speaker j, block b is modelled as white Gaussian with variance
  sigma^2 ~ InvGamma(alpha, beta); `log_var = log(beta / alpha)` and `log_alpha = log(alpha)`.
  """

  # None only inside the dynamic path, for an exit whose waveform head was not run (a rule
  # without the SNR / SNRi conditions decides on the variance alone; press_jax.dynamic).
  mean: Float[Array, "exits batch speakers samples"]
  log_var: Float[Array, "exits batch speakers blocks"]
  log_alpha: Float[Array, "exits batch speakers blocks"]

  @property
  def num_exits(self) -> int:
    return self.log_alpha.shape[0]

  @property
  def alpha(self) -> jax.Array:
    """Shape of the inverse-gamma prior, (exits, batch, speakers, blocks)."""
    return jax.numpy.exp(self.log_alpha)

  @property
  def beta(self) -> jax.Array:
    """Scale of the inverse-gamma prior, (exits, batch, speakers, blocks)."""
    return jax.numpy.exp(self.log_alpha + self.log_var)

  def exit(self, index: int) -> "ExitOutputs":
    """One exit, keeping a leading exit axis of length 1."""
    return jax.tree_util.tree_map(lambda x: x[index:index + 1], self)
