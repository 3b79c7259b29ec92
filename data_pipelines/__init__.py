"""Data pipelines of press_jax: corpus builders, the embedded corpus, loaders.

Independent of the model code. Typical use:

  from data_pipelines import build_dataset, make_train_iterator

  build_dataset('wsj0_2mix', manual_dir='/corpora/wsj0-mix/2speakers',
                config='8k_min')
  batches = make_train_iterator('wsj0_2mix', split='train', config='8k_min',
                                batch_size_per_device=4)

With no corpus at hand, 'press_synth' is synthesised locally on first use.
"""

import importlib

# Public name -> module. Imported lazily, so that light submodules (e.g. the
# synthesis code run in worker processes) do not pull in TFDS and grain.
_EXPORTS = {
    'BadAudioError': 'data_pipelines.errors',
    'DataError': 'data_pipelines.errors',
    'LengthMismatchError': 'data_pipelines.errors',
    'MissingDataError': 'data_pipelines.errors',
    'DataIterator': 'data_pipelines.loaders',
    'make_eval_iterator': 'data_pipelines.loaders',
    'make_full_length_iterator': 'data_pipelines.loaders',
    'make_train_iterator': 'data_pipelines.loaders',
    'open_split': 'data_pipelines.loaders',
    'build_dataset': 'data_pipelines.registry',
    'load_builder': 'data_pipelines.registry',
    'resolve_data_dir': 'data_pipelines.registry',
}

DATASETS = ('press_synth', 'wsj0_2mix', 'wham', 'whamr', 'libri2mix',
            'dns_challenge')

__all__ = ['DATASETS', *sorted(_EXPORTS)]


def __getattr__(name: str):
  """Imports a public name on first use."""
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
