"""Finding, building and loading datasets by name.

`build_dataset` prepares a builder once into a data directory (TFDS skips the
work when the files are already there); `load_builder` opens a prepared one.
The data directory is, in order: the `data_dir` argument, the `PRESS_DATA_DIR`
environment variable, or `data/tfds` under the current working directory.
"""

import logging
import os
import pathlib
import time

import tensorflow_datasets as tfds

from data_pipelines import errors
from data_pipelines.builders import BUILDERS
from data_pipelines.builders.press_synth import PressSynth

_log = logging.getLogger(__name__)

DATA_DIR_ENV = 'PRESS_DATA_DIR'
DEFAULT_DATA_DIR = os.path.join('data', 'tfds')

# Datasets that need no corpus from the user.
SELF_CONTAINED = ('press_synth',)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """The data directory: argument, then $PRESS_DATA_DIR, then ./data/tfds."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or os.path.join(
        os.getcwd(), DEFAULT_DATA_DIR)
  return os.path.abspath(os.fspath(data_dir))


def builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  """The builder class registered under `name`."""
  if name not in BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; known: {sorted(BUILDERS)}.')
  return BUILDERS[name]


def resolve_config(name: str, config: str | tfds.core.BuilderConfig | None
                   ) -> str | tfds.core.BuilderConfig | None:
  """A predefined config's name, or a custom press_synth config object.

  Predefined configs are passed by name: TFDS checks them by identity, which
  a pickled copy (e.g. in a grain worker process) would fail.
  """
  if name == 'press_synth' and isinstance(config, str):
    config = PressSynth.config_from_name(config)
  if isinstance(config, tfds.core.BuilderConfig):
    predefined = builder_class(name).builder_configs.get(config.name)
    if predefined is config:
      return config.name
  return config


def make_builder(name: str, data_dir: str | os.PathLike | None = None,
                 config: str | tfds.core.BuilderConfig | None = None,
                 **builder_kwargs) -> tfds.core.GeneratorBasedBuilder:
  """A builder instance writing array_record files under the data directory."""
  cls = builder_class(name)
  return cls(data_dir=resolve_data_dir(data_dir),
             config=resolve_config(name, config), file_format='array_record',
             **builder_kwargs)


def build_dataset(name: str, data_dir: str | os.PathLike | None = None,
                  manual_dir: str | os.PathLike | None = None,
                  config: str | tfds.core.BuilderConfig | None = None,
                  **builder_kwargs) -> tfds.core.GeneratorBasedBuilder:
  """Prepares a dataset once (reused afterwards) and returns its builder.

  Args:
    name: 'wsj0_2mix', 'wham', 'whamr', 'libri2mix', 'dns_challenge' or
      'press_synth'.
    data_dir: where the prepared files go (see `resolve_data_dir`).
    manual_dir: the user's corpus directory (not needed for press_synth).
    config: a config name such as '8k_min' or a config object; None for the
      builder's default.
    **builder_kwargs: e.g. skip_bad_files=True for the corpus builders or
      num_workers for press_synth.

  Returns:
    The prepared builder (`builder.as_data_source(split)` reads it).
  """
  builder = make_builder(name, data_dir, config, **builder_kwargs)
  if builder.is_prepared():
    return builder
  if name not in SELF_CONTAINED:
    _check_manual_dir(name, manual_dir, builder)
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir else None)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=download_config)
  _log.info('Built %s/%s in %.1f s into %s', name, builder.builder_config.name,
            time.perf_counter() - start, builder.data_dir)
  return builder


def _check_manual_dir(name: str, manual_dir: str | os.PathLike | None,
                      builder: tfds.core.GeneratorBasedBuilder) -> None:
  """Raises MissingDataError unless manual_dir is an existing directory."""
  instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if manual_dir is None:
    raise errors.MissingDataError(
        f'{name}/{builder.builder_config.name} is not prepared in '
        f'{builder.data_dir_root!r} and no manual_dir was given. Pass '
        f'manual_dir=<your corpus directory>; it must hold:\n{instructions}')
  if not pathlib.Path(manual_dir).is_dir():
    raise errors.MissingDataError(
        f'Missing directory {os.fspath(manual_dir)!r} (manual_dir of {name}). '
        f'It must hold:\n{instructions}')


def load_builder(name: str, data_dir: str | os.PathLike | None = None,
                 config: str | tfds.core.BuilderConfig | None = None, *,
                 manual_dir: str | os.PathLike | None = None,
                 build_if_missing: bool | None = None
                 ) -> tfds.core.GeneratorBasedBuilder:
  """Opens a prepared dataset, building it first where that is possible.

  Args:
    name: the dataset name.
    data_dir: the data directory (see `resolve_data_dir`).
    config: config name or object; None for the default.
    manual_dir: the user's corpus directory, used if a build is needed.
    build_if_missing: build when not prepared. None: yes for press_synth or
      when manual_dir is given.

  Raises:
    MissingDataError: not prepared and not buildable.
  """
  builder = make_builder(name, data_dir, config)
  if builder.is_prepared():
    return builder
  if build_if_missing is None:
    build_if_missing = name in SELF_CONTAINED or manual_dir is not None
  if not build_if_missing:
    raise errors.MissingDataError(
        f'{name}/{builder.builder_config.name} is not prepared under '
        f'{builder.data_dir_root!r}. Build it with build_dataset({name!r}, '
        f'data_dir=..., manual_dir=<your corpus>, config=...).')
  return build_dataset(name, data_dir, manual_dir, config)
