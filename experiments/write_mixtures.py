"""Write a few mixtures of the embedded corpus as WAV files, to try press-separate on.

Run (after `make demo`, which builds the corpus):
  python -m experiments.write_mixtures --out-dir examples --count 3
Writes examples/test_000.wav, ... (the mixture, 8 kHz, float) from the test split (unseen
speakers); with --references DIR also DIR/test_000_ref1.wav, ... (its sources).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import soundfile

from experiments import bench_dynamic


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out-dir", default="examples")
  parser.add_argument("--count", type=int, default=3)
  parser.add_argument("--split", default="test")
  parser.add_argument("--references", metavar="DIR",
                      help="also write each mixture's sources here (keep it outside --out-dir "
                           "if you separate that directory)")
  args = parser.parse_args(argv)
  if args.count < 1:
    parser.error("--count must be >= 1")
  os.makedirs(args.out_dir, exist_ok=True)
  with contextlib.redirect_stdout(sys.stderr):
    utterances = bench_dynamic.test_utterances(args.count, args.split)
  for index, (mixture, sources) in enumerate(utterances):
    name = os.path.join(args.out_dir, f"{args.split}_{index:03d}")
    soundfile.write(name + ".wav", np.asarray(mixture, np.float32), 8000, subtype="FLOAT")
    if args.references:
      os.makedirs(args.references, exist_ok=True)
      for speaker, source in enumerate(sources):
        soundfile.write(os.path.join(args.references, f"{args.split}_{index:03d}_ref"
                                     f"{speaker + 1}.wav"),
                        np.asarray(source, np.float32), 8000, subtype="FLOAT")
    print(name + ".wav")
  return 0


if __name__ == "__main__":
  sys.exit(main())
