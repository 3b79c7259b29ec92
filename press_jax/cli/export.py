"""press-export: write a trained PRESS-Net in formats other runtimes can convert.

  press-export runs/demo --format safetensors --out exported/
  press-export runs/demo --format stablehlo --out exported/ [--exits 1,3] [--platforms cpu,cuda]
  press-export runs/demo --format onnx --out exported/ [--exits 1,3] [--opset 17]

Every format writes press_params.safetensors (every parameter under a flat name),
press_exit_rule.py (the exit rule in numpy + scipy) and press_config.json (configuration,
post-calibration, versions, the files). --format stablehlo adds press_all_exits.stablehlo and
press_exit<k>.stablehlo (jax.export), --format onnx press_all_exits.onnx and press_exit<k>.onnx
(jax2onnx; the optional extra 'onnx'), all with symbolic batch and length, each checked once
against the JAX model unless --no-verify. The output is written under a temporary name and
renamed when complete; an existing non-empty OUT_DIR is replaced only with --overwrite. See
docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

PROGRAM = "press-export"


def parse_arguments(argv):
  parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("model", metavar="MODEL_DIR",
                      help="a saved model, a training work directory or a main-job work "
                           "directory (e.g. runs/demo)")
  parser.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                      help="safetensors, stablehlo or onnx")
  parser.add_argument("--out", required=True, metavar="OUT_DIR",
                      help="the export directory to create")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT_DIR if it exists and is not empty")
  parser.add_argument("--exits", metavar="K[,K...]",
                      help="stablehlo, onnx: the per-exit graphs to write (1-based; default all)")
  parser.add_argument("--platforms", metavar="P[,P...]",
                      help="stablehlo: platforms to lower for, of cpu, cuda, rocm, tpu "
                           "(default: this machine's)")
  parser.add_argument("--opset", metavar="N",
                      help="onnx: the ONNX opset (17..23; default 17)")
  parser.add_argument("--no-verify", action="store_true",
                      help="stablehlo, onnx: do not run each graph once against the JAX model")
  parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
  return parser.parse_args(argv)


def parse_list(option: str, text: str | None, convert=str):
  """A comma-separated option value as a list (None if absent); ValueError naming the option."""
  if text is None:
    return None
  items = [item.strip() for item in text.split(",") if item.strip()]
  try:
    values = [convert(item) for item in items]
  except ValueError:
    values = []
  if not values:
    raise ValueError(f"{option} {text}: expected a comma-separated list, e.g. "
                     f"{'1,3' if convert is int else 'cpu,cuda'}")
  return values


def main(argv=None) -> int:
  arguments = parse_arguments(argv)

  def fail(message: str, status: int = 2) -> int:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    return status

  # Checks that need no model first (importing the export imports JAX, it starts no backend).
  from press_jax.export import directory as export_dir

  fmt = arguments.fmt.strip().lower()
  if fmt not in export_dir.FORMATS:
    return fail(f"--format {arguments.fmt}: expected one of {', '.join(export_dir.FORMATS)}")
  try:
    exits = parse_list("--exits", arguments.exits, int)
    platforms = parse_list("--platforms", arguments.platforms)
  except ValueError as error:
    return fail(str(error))
  if fmt not in export_dir.GRAPH_FORMATS and (exits or arguments.no_verify):
    return fail("--exits and --no-verify apply to --format stablehlo or onnx only")
  if fmt != "stablehlo" and platforms:
    return fail("--platforms applies to --format stablehlo only")
  if fmt != "onnx" and arguments.opset is not None:
    return fail("--opset applies to --format onnx only")
  if platforms:
    from press_jax.export import stablehlo
    unknown = [p for p in platforms if p not in stablehlo.PLATFORMS]
    if unknown:
      return fail(f"--platforms {arguments.platforms}: unknown {', '.join(unknown)}; expected "
                  f"some of {', '.join(stablehlo.PLATFORMS)}")
  from press_jax.export import onnx_graphs
  opset = onnx_graphs.OPSET
  if arguments.opset is not None:
    try:
      opset = onnx_graphs.check_opset(int(arguments.opset))
    except ValueError:
      return fail(f"--opset {arguments.opset}: expected an integer in "
                  f"{onnx_graphs.MIN_OPSET}..{onnx_graphs.MAX_OPSET}")
  unavailable = export_dir.unavailable(fmt)
  if unavailable:
    return fail(unavailable)
  problem = export_dir.output_dir_problem(arguments.out, arguments.overwrite)
  if problem:
    return fail(f"--out {problem}")

  from press_jax import allocator, compilation_cache, model_dir
  compilation_cache.enable()
  allocator.configure()
  try:
    loaded = model_dir.load(arguments.model)
  except model_dir.ModelDirError as error:
    return fail(f"MODEL_DIR {error}")
  try:
    manifest = export_dir.write_export(
        loaded, arguments.out, fmt=fmt, exits=exits, overwrite=arguments.overwrite,
        platforms=platforms, opset=opset, verify=not arguments.no_verify,
        log=lambda message: print(f"{PROGRAM}: {message}", file=sys.stderr))
  except export_dir.ExportError as error:
    if arguments.debug:
      traceback.print_exc()
    return fail(str(error), status=error.status)
  except KeyboardInterrupt:
    raise
  except Exception as error:  # Lowering or writing failed; nothing was left under --out.
    if arguments.debug:
      traceback.print_exc()
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return fail(f"exporting {arguments.model} to {arguments.out} failed ({type(error).__name__}: "
                f"{message[:300]}); nothing was written (--debug for a traceback)", status=1)
  names = ", ".join(entry["name"] for entry in manifest["files"])
  print(f"{PROGRAM}: wrote {os.path.abspath(arguments.out)}: {names}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
