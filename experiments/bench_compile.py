"""Compile time of the forward+backward pass against decoder depth at equal width.

Run:
  python -m experiments.bench_compile            # S width, N_dec = 12 and 24
  python -m experiments.bench_compile --json

Expected: the stages run under nn.scan with stacked parameters, so doubling N_dec costs well
under 1.3x the compile time (measured 2026-11-22 on 2 CPU cores: 10.9 s and 9.7 s, 0.89x).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from press_jax import config as config_lib
from press_jax import likelihoods
from press_jax.models import press_net


def compile_seconds(config: config_lib.PressConfig, seconds_of_audio: float) -> float:
  """Wall time to lower and compile jit(value_and_grad(Student-t loss)) for one batch shape."""
  model = press_net.PressNet(config)
  samples = int(seconds_of_audio * config.sample_rate)
  loss_config = likelihoods.LossConfig(block_length=config.block_length)
  params = press_net.parameter_shapes(model)
  mixture = jax.ShapeDtypeStruct((1, samples), jnp.float32)
  sources = jax.ShapeDtypeStruct((1, config.speakers, samples), jnp.float32)

  def loss(params, mixture, sources):
    outputs = model.apply({"params": params}, mixture)
    return likelihoods.press_loss(outputs, sources, jnp.ones_like(mixture), loss_config)[0]

  start = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(params, mixture, sources).compile()
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="S")
  parser.add_argument("--depths", type=int, nargs="+", default=[12, 24])
  parser.add_argument("--seconds", type=float, default=1.0, help="audio length of the batch")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  base = config_lib.preset(args.preset)
  results = []
  for depth in args.depths:
    exits = depth // base.blocks_per_stage
    config = base.replace(decoder_blocks=depth, exits=exits)
    seconds = compile_seconds(config, args.seconds)
    results.append({"preset": args.preset, "decoder_blocks": depth, "exits": exits,
                    "width": config.width, "compile_s": round(seconds, 2)})
  ratio = results[-1]["compile_s"] / results[0]["compile_s"]
  if args.json:
    for row in results:
      print(json.dumps(row))
    print(json.dumps({"ratio": round(ratio, 3)}))
    return
  for row in results:
    print(f"N_dec={row['decoder_blocks']:>3} exits={row['exits']:>3} width={row['width']}: "
          f"forward+backward compile {row['compile_s']:.2f} s")
  print(f"compile time ratio N_dec={args.depths[-1]} / N_dec={args.depths[0]}: {ratio:.2f}x "
        f"(target < 1.3x)")


if __name__ == "__main__":
  main()
