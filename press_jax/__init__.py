"""press_jax: PRESS (probabilistic early exits for speech separation) in JAX/Flax."""

__version__ = "0.1.0"
