"""Prepares a dataset from the command line.

  python -m data_pipelines.build --dataset press_synth --config clean_8k
  python -m data_pipelines.build --dataset wham --config 8k_min_both \
      --manual_dir /corpora/wham --data_dir /data/tfds [--skip_bad_files]
"""

import argparse
import json
import logging
import time

from data_pipelines import registry


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line arguments."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='press_synth',
                      help='press_synth, wsj0_2mix, wham, whamr, libri2mix or '
                      'dns_challenge.')
  parser.add_argument('--config', default=None,
                      help="Builder config, e.g. 'clean_8k' or '8k_min'.")
  parser.add_argument('--data_dir', default=None,
                      help='Output directory (default $PRESS_DATA_DIR or '
                      './data/tfds).')
  parser.add_argument('--manual_dir', default=None,
                      help='Your corpus directory (not for press_synth).')
  parser.add_argument('--skip_bad_files', action='store_true',
                      help='Skip (and count) bad examples instead of failing.')
  parser.add_argument('--num_workers', type=int, default=None,
                      help='press_synth synthesis processes (default: auto).')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  """Builds the dataset and prints a JSON summary."""
  logging.basicConfig(level=logging.INFO)
  args = parse_args(argv)
  kwargs = {}
  if args.dataset == 'press_synth':
    if args.num_workers is not None:
      kwargs['num_workers'] = args.num_workers
  elif args.skip_bad_files:
    kwargs['skip_bad_files'] = True
  start = time.perf_counter()
  builder = registry.build_dataset(args.dataset, args.data_dir,
                                   args.manual_dir, args.config, **kwargs)
  summary = {
      'dataset': args.dataset,
      'config': builder.builder_config.name,
      'data_dir': builder.data_dir,
      'splits': {name: split.num_examples
                 for name, split in builder.info.splits.items()},
      'seconds': round(time.perf_counter() - start, 1),
  }
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  main()
