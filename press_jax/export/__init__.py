"""Export of a trained PRESS-Net for other runtimes (docs/export.md).

- `params`: safetensors with flat, stable parameter names; `load_safetensors` rebuilds the tree.
- `stablehlo`: jax.export graphs (every exit, or one exit), symbolic batch and length.
- `onnx_graphs`: the same graphs as ONNX (jax2onnx; the optional extra `onnx`), symbolic batch
  and length, run with onnxruntime.
- `forward.forward_through_exit`: one exit's forward pass, computing only what it needs.
- `exit_rule_numpy`: the exit rule in numpy + scipy, copied into every export directory.
- `directory.write_export`: an export directory, as `press-export` writes it.

`press_jax.torch_port` is the PyTorch port that runs the safetensors export.
"""

from press_jax.export.forward import forward_through_exit
from press_jax.export.params import (
    flatten_params, load_safetensors, save_safetensors, unflatten_params)

__all__ = ["flatten_params", "forward_through_exit", "load_safetensors", "save_safetensors",
           "unflatten_params"]
