"""A PyTorch port of PRESS-Net that runs the library's safetensors export (docs/export.md).

    from press_jax import torch_port
    model = torch_port.load("export/demo_params")          # press-export ... --format safetensors
    outputs = model(mixture, mask)                         # ExitOutputs, as the JAX model's
    loss, aux = torch_port.press_loss(outputs, sources, mask,
                                      block_length=model.config.block_length)

This package imports torch; nothing else in press_jax imports it (`import press_jax` never
needs torch). Install it with the `torch` extra (`pip install press_jax[torch]`).

- `press_net`: the modules (`PressNet(config)`), parameters named as the export's flat names;
- `recurrence`: the bidirectional linear recurrence (chunked or sequential loop);
- `loader.load(export_dir)`: the model of an export directory, checked, in eval mode;
- `likelihoods`: the Student-t training loss with the joint permutation (`press_loss`).
"""

from press_jax.torch_port.likelihoods import pairwise_loss, press_loss, student_t_nll
from press_jax.torch_port.loader import load
from press_jax.torch_port.press_net import ExitOutputs, PressNet

__all__ = ["ExitOutputs", "PressNet", "load", "pairwise_loss", "press_loss", "student_t_nll"]
