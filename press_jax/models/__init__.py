"""PRESS-Net models."""

from press_jax.models.press_net import PressNet, create, init_params, load, save

__all__ = ["PressNet", "create", "init_params", "load", "save"]
