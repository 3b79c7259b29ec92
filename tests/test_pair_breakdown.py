"""experiments.pair_breakdown against an independent per-utterance computation."""

import itertools

import fast_bss_eval.numpy as fbe
import jax
import numpy as np
import pytest

from data_pipelines import registry
from experiments import configs, pair_breakdown
from tests import model_util

CONFIG = 'clean_8k_n12-4-6'  # 12 train, 4 validation, 6 test mixtures


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  registry.build_dataset('press_synth', path, config=CONFIG)
  return configs.DataConfig(builder_config=CONFIG, data_dir=str(path),
                            bucket_seconds=(6.0,), eval_batch_size_per_device=4)



def reference_si_snri(means, sources, mixture):
  """Per-exit SI-SNRi (speaker mean at the best permutation), numpy + fast_bss_eval."""
  mixture_score = fbe.si_sdr(sources, np.broadcast_to(mixture, sources.shape), zero_mean=True)
  values = []
  for mean in means:  # (speakers, samples)
    best = max(np.mean(fbe.si_sdr(sources, mean[list(order)], zero_mean=True))
               for order in itertools.permutations(range(len(sources))))
    values.append(best - np.mean(mixture_score))
  return np.array(values)


def test_groups_match_a_per_utterance_reference(data):
  model, params = model_util.randomised_model(model_util.SMALL)
  result = pair_breakdown.breakdown(model, params, data, 'test')
  builder = registry.load_builder('press_synth', data.data_dir, CONFIG)
  genders = {s['speaker_id']: s['gender'] for s in builder.info.metadata['speakers']}
  records = list(builder.as_data_source('test'))
  # One jitted call on the padded batch with its mask (outputs on valid samples do not depend
  # on the padding: tests/test_model.py); the reference itself is numpy + fast_bss_eval.
  lengths = [len(record['mixture']) for record in records]
  padded = np.zeros((len(records), max(lengths)), np.float32)
  mask = np.zeros_like(padded)
  for row, (record, length) in enumerate(zip(records, lengths)):
    padded[row, :length] = record['mixture']
    mask[row, :length] = 1.0
  all_means = np.asarray(jax.jit(model.apply)({'params': params}, padded, mask).mean)
  expected = {}
  for row, (record, length) in enumerate(zip(records, lengths)):
    mixture = np.asarray(record['mixture'], np.float32)
    sources = np.asarray(record['sources'], np.float32)
    means = all_means[:, row, :, :length]  # (exits, speakers, samples)
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in record['speakers']]
    group = '-'.join(sorted((genders[i] for i in ids), reverse=True))
    value = reference_si_snri(means, sources.astype(np.float64), mixture.astype(np.float64))
    expected.setdefault(group, []).append(value)
    expected.setdefault('all', []).append(value)
  assert set(result['groups']) == set(expected)
  for group, values in expected.items():
    assert result['groups'][group]['count'] == len(values)
    np.testing.assert_allclose(result['groups'][group]['si_snri_db'], np.mean(values, axis=0),
                               atol=2e-3)
  assert result['groups']['all']['count'] == 6
