"""Parameters and GMAC per second of audio for every exit of the presets (the paper's Table 2 shape).

Run:
  python -m experiments.model_table            # readable table for S and M
  python -m experiments.model_table --json     # [{"preset", "exit", "params", "gmac_per_s"}, ...]
  python -m experiments.model_table --xla      # adds XLA's cost analysis of the compiled forward

Expected (8 kHz): S exit 4: 3.45 M params, 11.0 GMAC/s (paper: 3.4-3.55 M, 11.3);
M exit 8: 15.4 M, 54.8 GMAC/s (paper: 15.6 M, 54.4); M exit 12: 21.9 M, 79.6 (paper: 22.4 M, 79.7).
"""

from __future__ import annotations

import argparse
import json

from press_jax import compute
from press_jax import config as config_lib

# The paper's numbers (SPEC §6): (preset, exit) -> (params, GMAC/s); None where not published.
PAPER = {("S", 4): (3.47e6, 11.3), ("M", 8): (15.6e6, 54.4), ("M", 12): (22.4e6, 79.7)}


def rows(presets, sample_rate=8000, with_xla=False):
  """One dict per (preset, exit)."""
  table = []
  for name in presets:
    config = config_lib.preset(name, sample_rate=sample_rate)
    for cost in compute.exit_costs(config):
      row = {"preset": name, "exit": cost.exit, "params": cost.params,
             "gmac_per_s": round(cost.gmac_per_s, 4)}
      if with_xla and cost.exit % config.stages_per_group == 0:
        row["gmac_per_s_all_heads"] = round(cost.gmac_per_s_all_heads, 4)
        row["xla_gmac_per_s"] = round(compute.xla_gmac_per_second(config, cost.exit), 4)
      table.append(row)
  return table


def format_table(table):
  """A readable table with the paper's targets beside ours."""
  lines = [f"{'preset':<7}{'exit':>5}{'params (M)':>12}{'GMAC/s':>9}{'paper params':>14}"
           f"{'paper GMAC/s':>14}" + (f"{'XLA GMAC/s*':>13}" if "xla_gmac_per_s" in table[0]
                                      else "")]
  for row in table:
    paper = PAPER.get((row["preset"], row["exit"]))
    paper_text = (f"{paper[0] / 1e6:>14.2f}{paper[1]:>14.1f}" if paper else f"{'':>14}{'':>14}")
    xla = f"{row['xla_gmac_per_s']:>13.2f}" if "xla_gmac_per_s" in row else ""
    lines.append(f"{row['preset']:<7}{row['exit']:>5}{row['params'] / 1e6:>12.3f}"
                 f"{row['gmac_per_s']:>9.2f}{paper_text}{xla}")
  if "xla_gmac_per_s" in table[0]:
    lines.append("* XLA: half the flops of the compiled forward truncated after that exit (all "
                 "heads up to it, elementwise ops included).")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print a JSON list instead")
  parser.add_argument("--presets", nargs="+", default=["S", "M"])
  parser.add_argument("--sample-rate", type=int, default=8000)
  parser.add_argument("--xla", action="store_true", help="cross-check with XLA cost analysis")
  args = parser.parse_args(argv)
  table = rows(args.presets, args.sample_rate, args.xla)
  print(json.dumps(table, indent=1) if args.json else format_table(table))


if __name__ == "__main__":
  main()
