"""Loader throughput: examples per second of 4 s crops from press_synth.

  python -m data_pipelines.bench [--size default|small|tiny] [--cache_gib G] [--json]

With --cache_gib G > 0 the iterator keeps up to G GiB of decoded records in
memory (waveform_cache.WaveformCache, what the main job trains with): one
untimed epoch fills the cache, then the same batches are timed with it and,
as the reference of the same run, without it (`uncached_examples_per_s`).
Builds the press_synth corpus into the data directory first if needed (the
build time is reported separately and not counted in the throughput).
"""

import argparse
import json
import time

from data_pipelines import loaders
from data_pipelines import registry

SIZE_CONFIGS = {'default': 'clean_8k', 'small': 'clean_8k_small',
                'tiny': 'clean_8k_tiny'}


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line arguments."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=sorted(SIZE_CONFIGS), default='default',
                      help='press_synth size: default (2000/200/200 '
                      'mixtures), small (200/50/50) or tiny (24/8/8).')
  parser.add_argument('--config', default=None,
                      help='A press_synth config overriding --size.')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--batch_size', type=int, default=8,
                      help='Examples per batch (one device).')
  parser.add_argument('--num_batches', type=int, default=100)
  parser.add_argument('--crop_seconds', type=float, default=4.0)
  parser.add_argument('--dynamic_mixing', action='store_true')
  parser.add_argument('--worker_count', type=int, default=0)
  parser.add_argument('--cache_gib', type=float, default=0.0,
                      help='GiB of decoded records kept in memory (0: none).')
  parser.add_argument('--json', action='store_true',
                      help='Print one JSON object (key examples_per_s).')
  args = parser.parse_args(argv)
  if args.cache_gib < 0:
    parser.error(f'--cache_gib must be >= 0, got {args.cache_gib}')
  return args


def run(args: argparse.Namespace) -> dict[str, float]:
  """Builds if needed, then times the train iterator."""
  config = args.config or SIZE_CONFIGS[args.size]
  start = time.perf_counter()
  builder = registry.load_builder('press_synth', args.data_dir, config)
  build_seconds = time.perf_counter() - start

  def timed(cache_bytes: int) -> tuple[float, int]:
    """Seconds for --num_batches batches (after one untimed epoch when caching)."""
    iterator = loaders.make_train_iterator(
        'press_synth', args.data_dir, 'train', config=config,
        batch_size_per_device=args.batch_size, num_devices=1,
        crop_seconds=args.crop_seconds, seed=0, process_index=0,
        process_count=1, dynamic_mixing=args.dynamic_mixing,
        worker_count=args.worker_count, cache_bytes=cache_bytes)
    with iterator:
      next(iterator)  # Warm-up: opens files, starts threads.
      if cache_bytes:
        records = builder.info.splits['train'].num_examples
        for _ in range(-(-records // args.batch_size)):
          next(iterator)
      start = time.perf_counter()
      for _ in range(args.num_batches):
        next(iterator)
      return time.perf_counter() - start, iterator.sample_rate

  cache_bytes = int(args.cache_gib * 2**30)
  seconds, sample_rate = timed(cache_bytes)
  reference = timed(0)[0] if cache_bytes else None
  examples = args.num_batches * args.batch_size
  return {
      'examples_per_s': examples / seconds,
      'batches_per_s': args.num_batches / seconds,
      'examples': examples,
      'batch_size': args.batch_size,
      'crop_seconds': args.crop_seconds,
      'sample_rate': sample_rate,
      'cache_gib': args.cache_gib,
      'uncached_examples_per_s': (None if reference is None
                                  else examples / reference),
      'config': builder.builder_config.name,
      'dynamic_mixing': args.dynamic_mixing,
      'open_or_build_seconds': build_seconds,
  }


def main(argv=None) -> None:
  """Prints the throughput (JSON with --json)."""
  args = parse_args(argv)
  result = run(args)
  if args.json:
    print(json.dumps(result))
  else:
    print(f'press_synth/{result["config"]}: {result["examples_per_s"]:.0f} '
          f'examples/s ({result["crop_seconds"]} s crops at '
          f'{result["sample_rate"]} Hz, batch {result["batch_size"]}, '
          f'{result["examples"]} examples'
          + (f', {result["cache_gib"]} GiB cache; without it '
             f'{result["uncached_examples_per_s"]:.0f} examples/s'
             if result['cache_gib'] else '')
          + '); open/build '
          f'{result["open_or_build_seconds"]:.1f} s.')


if __name__ == '__main__':
  main()
