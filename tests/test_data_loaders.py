"""Train and full-length iterators on a small press_synth build."""

import concurrent.futures
import json
import pickle

import numpy as np
import pytest

from data_pipelines import bench
from data_pipelines import loaders
from data_pipelines import registry
from data_pipelines import waveform_cache

CONFIG = 'clean_8k_n12-4-6'  # 12 train, 4 validation, 6 test mixtures
RATE = 8000


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A small press_synth build shared by the tests of this module."""
  path = tmp_path_factory.mktemp('tfds')
  registry.build_dataset('press_synth', path, config=CONFIG)
  return path


def train_iterator(data_dir, **kwargs):
  """A train iterator with test-friendly defaults."""
  arguments = dict(split='train', config=CONFIG, batch_size_per_device=2,
                   num_devices=2, crop_seconds=1.0, seed=0, process_index=0,
                   process_count=1)
  arguments.update(kwargs)
  return loaders.make_train_iterator('press_synth', data_dir, **arguments)


def eval_iterator(data_dir, **kwargs):
  """An eval iterator over the test split."""
  arguments = dict(config=CONFIG, batch_size_per_device=2, num_devices=1,
                   process_index=0, process_count=1)
  arguments.update(kwargs)
  return loaders.make_eval_iterator('press_synth', data_dir, 'test',
                                    **arguments)


def assert_batches_equal(first, second):
  """Batch lists with equal keys and arrays."""
  assert len(first) == len(second)
  for one, other in zip(first, second):
    assert one.keys() == other.keys()
    for key in one:
      np.testing.assert_array_equal(one[key], other[key])


def test_train_batch_format(data_dir):
  batch = next(train_iterator(data_dir))
  assert set(batch) == {'mixture', 'sources', 'mask'}
  assert batch['mixture'].shape == (2, 2, RATE)
  assert batch['sources'].shape == (2, 2, 2, RATE)
  assert batch['mask'].shape == (2, 2, RATE)
  for value in batch.values():
    assert value.dtype == np.float32
  np.testing.assert_allclose(batch['sources'].sum(2), batch['mixture'],
                             atol=1e-6)
  np.testing.assert_array_equal(batch['mask'], 1.0)  # Crops shorter than all.


def test_short_utterances_are_padded_with_mask(data_dir):
  batch = next(train_iterator(data_dir, crop_seconds=7.0))  # All < 6 s.
  mask = batch['mask'].reshape(4, -1)
  mixture = batch['mixture'].reshape(4, -1)
  for row_mask, row in zip(mask, mixture):
    valid = int(row_mask.sum())
    assert 2 * RATE - 1 <= valid <= 6 * RATE + 1
    np.testing.assert_array_equal(row_mask[:valid], 1.0)
    np.testing.assert_array_equal(row_mask[valid:], 0.0)
    np.testing.assert_array_equal(row[valid:], 0.0)


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  first = [next(it) for it in [train_iterator(data_dir)] for _ in range(3)]
  iterator = train_iterator(data_dir)
  again = [next(iterator) for _ in range(3)]
  assert_batches_equal(first, again)
  other = next(train_iterator(data_dir, seed=1))
  assert not np.array_equal(other['mixture'], first[0]['mixture'])


@pytest.mark.parametrize('dynamic_mixing', [False, True])
def test_state_restores_mid_epoch(data_dir, dynamic_mixing):
  iterator = train_iterator(data_dir, dynamic_mixing=dynamic_mixing)
  for _ in range(4):  # 4 batches of 4: past the 12-example epoch.
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  restored = train_iterator(data_dir, dynamic_mixing=dynamic_mixing)
  restored.set_state(state)
  assert_batches_equal(expected, [next(restored) for _ in range(3)])
  from_bytes = train_iterator(data_dir, dynamic_mixing=dynamic_mixing)
  from_bytes.set_state(json.dumps(state).encode())
  assert_batches_equal(expected[:1], [next(from_bytes)])


def test_dynamic_mixing_remixes_sources(data_dir):
  plain = next(train_iterator(data_dir))
  remixed = next(train_iterator(data_dir, dynamic_mixing=True))
  assert remixed['sources'].shape == plain['sources'].shape
  np.testing.assert_allclose(remixed['sources'].sum(2), remixed['mixture'],
                             atol=1e-6)
  assert not np.array_equal(remixed['mixture'], plain['mixture'])


@pytest.mark.parametrize('dynamic_mixing', [False, True])
def test_speed_perturbation_keeps_the_mixture_the_sum(data_dir, dynamic_mixing):
  plain = next(train_iterator(data_dir, dynamic_mixing=dynamic_mixing))
  perturbed = next(train_iterator(data_dir, dynamic_mixing=dynamic_mixing,
                                  speed_perturbation=0.15))
  assert perturbed['sources'].shape == plain['sources'].shape
  np.testing.assert_allclose(perturbed['sources'].sum(2),
                             perturbed['mixture'], atol=1e-5)
  assert not np.allclose(perturbed['mixture'], plain['mixture'])
  # Padding (mask 0) stays silent.
  silent = np.broadcast_to(perturbed['mask'][:, :, None] == 0,
                           perturbed['sources'].shape)
  assert np.all(perturbed['sources'][silent] == 0)


def test_speed_perturbation_out_of_range_is_refused(data_dir):
  with pytest.raises(ValueError, match='speed_perturbation must be in'):
    train_iterator(data_dir, speed_perturbation=0.7)


def test_one_epoch_visits_every_example_once(data_dir):
  iterator = train_iterator(data_dir, batch_size_per_device=1, num_devices=1,
                            num_epochs=1, crop_seconds=7.0)
  assert len(iterator) == 12
  lengths = sorted(int(batch['mask'].sum()) for batch in iterator)
  source = registry.load_builder('press_synth', data_dir,
                                 CONFIG).as_data_source('train')
  assert lengths == sorted(len(source[i]['mixture']) for i in range(12))


def test_hosts_get_disjoint_examples(data_dir):
  seen = []
  for process_index in range(2):
    iterator = train_iterator(data_dir, batch_size_per_device=1,
                              num_devices=1, num_epochs=1, crop_seconds=7.0,
                              process_index=process_index, process_count=2)
    seen.append({int(batch['mask'].sum()) for batch in iterator})
    assert len(seen[-1]) == 6
  assert not seen[0] & seen[1]


def test_eval_covers_every_utterance_untruncated(data_dir):
  iterator = eval_iterator(data_dir, bucket_seconds=(3.0, 4.5, 6.0))
  source = registry.load_builder('press_synth', data_dir,
                                 CONFIG).as_data_source('test')
  expected = {source[i]['id'].decode(): source[i] for i in range(len(source))}
  seen = {}
  shapes = set()
  batches = list(iterator)
  assert len(batches) == len(iterator)
  for batch in batches:
    assert batch['mixture'].shape[:2] == (1, 2)
    shapes.add(batch['mixture'].shape[-1])
    for slot in range(2):
      if not batch['example_mask'][0, slot]:
        assert batch['id'][0, slot] == ''
        np.testing.assert_array_equal(batch['mask'][0, slot], 0.0)
        continue
      example_id = str(batch['id'][0, slot])
      length = int(batch['length'][0, slot])
      record = expected[example_id]
      assert length == len(record['mixture']) == batch['mask'][0, slot].sum()
      np.testing.assert_array_equal(batch['mixture'][0, slot, :length],
                                    record['mixture'])
      np.testing.assert_array_equal(batch['sources'][0, slot, :, :length],
                                    record['sources'])
      np.testing.assert_array_equal(batch['mixture'][0, slot, length:], 0.0)
      seen[example_id] = seen.get(example_id, 0) + 1
  assert seen == {example_id: 1 for example_id in expected}
  assert shapes <= {int(3.0 * RATE), int(4.5 * RATE), int(6.0 * RATE)}
  assert set(iterator.bucket_lengths) == shapes


def test_long_utterances_get_a_new_bucket_or_an_error(data_dir):
  iterator = eval_iterator(data_dir, bucket_seconds=(2.5,),
                           overflow_multiple_seconds=2.0)
  assert iterator.bucket_lengths[0] == int(2.5 * RATE)
  assert all(length % (2 * RATE) == 0 for length in iterator.bucket_lengths[1:])
  assert len(list(iterator)) == len(iterator)
  with pytest.raises(ValueError, match='longer than the largest bucket'):
    eval_iterator(data_dir, bucket_seconds=(2.5,), long_utterances='error')


def test_eval_hosts_split_each_global_batch(data_dir):
  per_host = [list(eval_iterator(data_dir, batch_size_per_device=1,
                                 process_index=index, process_count=2))
              for index in range(2)]
  assert len(per_host[0]) == len(per_host[1])
  ids = []
  for first, second in zip(*per_host):
    assert first['mixture'].shape == second['mixture'].shape
    ids += [str(first['id'][0, 0]), str(second['id'][0, 0])]
  ids = [example_id for example_id in ids if example_id]
  assert len(ids) == len(set(ids)) == 6


def test_full_length_fine_tuning_state(data_dir):
  def make():
    return loaders.make_full_length_iterator(
        'press_synth', data_dir, 'train', config=CONFIG,
        batch_size_per_device=2, num_devices=1, shuffle=True, seed=3,
        num_epochs=None, process_index=0, process_count=1)
  iterator = make()
  for _ in range(len(iterator) + 1):  # Into the second epoch.
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = make()
  restored.set_state(state)
  assert_batches_equal(expected, [next(restored) for _ in range(2)])


def test_unknown_split_lists_available(data_dir):
  with pytest.raises(ValueError, match="available: .*'train'"):
    train_iterator(data_dir, split='dev')


def test_unprepared_corpus_needs_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared'):
    loaders.make_train_iterator('wsj0_2mix', tmp_path, 'train',
                                batch_size_per_device=1, num_devices=1,
                                process_index=0, process_count=1)


def test_bench_prints_json(data_dir, capsys):
  bench.main(['--config', CONFIG, '--data_dir', str(data_dir), '--json',
              '--num_batches', '5', '--batch_size', '4'])
  result = json.loads(capsys.readouterr().out)
  assert result['examples_per_s'] > 0
  assert result['examples'] == 20
  assert result['uncached_examples_per_s'] is None


def test_bench_with_cache_times_the_reference_too(data_dir, capsys):
  bench.main(['--config', CONFIG, '--data_dir', str(data_dir), '--json',
              '--num_batches', '5', '--batch_size', '4', '--cache_gib', '0.5'])
  result = json.loads(capsys.readouterr().out)
  assert result['cache_gib'] == 0.5
  assert result['examples_per_s'] > 0 and result['uncached_examples_per_s'] > 0
  with pytest.raises(SystemExit):
    bench.main(['--config', CONFIG, '--data_dir', str(data_dir), '--cache_gib', '-1'])
  assert '--cache_gib must be >= 0' in capsys.readouterr().err


def test_enhancement_dynamic_mixing_draws_snr_in_range(tmp_path):
  config = 'single_8k_n4-2-2'
  registry.build_dataset('press_synth', tmp_path, config=config)
  iterator = loaders.make_train_iterator(
      'press_synth', tmp_path, 'train', config=config,
      batch_size_per_device=4, num_devices=1, crop_seconds=1.0,
      dynamic_mixing=True, process_index=0, process_count=1)
  for _ in range(3):
    batch = next(iterator)
    speech, noise = np.moveaxis(batch['sources'][0].astype(np.float64), 1, 0)
    np.testing.assert_allclose(speech + noise, batch['mixture'][0], atol=1e-6)
    snr = 10 * np.log10(np.mean(speech ** 2, -1) / np.mean(noise ** 2, -1))
    assert np.all((snr > -5.0 - 1e-3) & (snr < 10.0 + 1e-3))


def test_worker_processes_give_the_same_batches(data_dir):
  with train_iterator(data_dir, worker_count=1) as iterator:
    with_workers = [next(iterator) for _ in range(2)]
  in_process = train_iterator(data_dir)
  assert_batches_equal([next(in_process) for _ in range(2)], with_workers)


# --- The waveform cache (data_pipelines/waveform_cache.py) ------------------------------------

@pytest.mark.parametrize('dynamic_mixing,speed', [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_cached_batches_equal_uncached_ones(data_dir, dynamic_mixing, speed):
  # 7 batches of 4 from 12 records: past two epochs, so later batches come from the cache.
  kwargs = dict(dynamic_mixing=dynamic_mixing, speed_perturbation=speed)
  uncached = train_iterator(data_dir, **kwargs)
  expected = [next(uncached) for _ in range(7)]
  cached = train_iterator(data_dir, cache_bytes=2**30, **kwargs)
  assert_batches_equal(expected, [next(cached) for _ in range(7)])
  resumed = train_iterator(data_dir, cache_bytes=2**30, **kwargs)
  resumed.set_state(uncached.get_state())
  assert_batches_equal([next(uncached) for _ in range(2)],
                       [next(resumed) for _ in range(2)])


def test_cache_keeps_records_up_to_its_bound_and_reads_the_rest(data_dir):
  source, _, _ = loaders.open_split('press_synth', data_dir, 'train', config=CONFIG)
  sizes = [source[i]['mixture'].nbytes + source[i]['sources'].nbytes
           for i in range(len(source))]
  bound = sizes[0] + sizes[1] + sizes[2] // 2  # Two records and half of a third.
  cache = waveform_cache.WaveformCache(source, bound)
  for index in [0, 1, 2, 3, 0, 11, -1]:
    example = cache[index]
    record = source[index % len(source)]
    np.testing.assert_array_equal(example['mixture'], record['mixture'])
    np.testing.assert_array_equal(example['sources'], record['sources'])
    assert example['mixture'].dtype == np.float32
  assert cache.cached_records == 2
  assert cache.cached_bytes == sizes[0] + sizes[1] <= bound
  assert cache[0] is cache[0]  # Held, not decoded again.
  assert cache[3] is not cache[3]  # Past the bound: decoded each time.
  nothing = waveform_cache.WaveformCache(source, 0)
  nothing[0]
  assert nothing.cached_records == 0
  with pytest.raises(IndexError, match='out of range for 12 records'):
    cache[12]


def test_cached_waveforms_are_read_only(data_dir):
  source, _, _ = loaders.open_split('press_synth', data_dir, 'train', config=CONFIG)
  cache = waveform_cache.WaveformCache(source, 2**30)
  with pytest.raises(ValueError, match='read-only'):
    cache[0]['sources'][0, 0] = 1.0


def test_cache_pickles_empty_and_reads_the_same(data_dir):
  source, _, _ = loaders.open_split('press_synth', data_dir, 'train', config=CONFIG)
  cache = waveform_cache.WaveformCache(source, 2**30)
  cache[0], cache[1]
  copy = pickle.loads(pickle.dumps(cache))
  assert copy.cached_records == 0 and copy.max_bytes == 2**30
  np.testing.assert_array_equal(copy[1]['mixture'], cache[1]['mixture'])


def test_cache_from_threads_holds_each_record_once(data_dir):
  source, _, _ = loaders.open_split('press_synth', data_dir, 'train', config=CONFIG)
  cache = waveform_cache.WaveformCache(source, 2**30)
  indices = [i % 12 for i in range(96)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(cache.__getitem__, indices))
  assert cache.cached_records == 12
  assert cache.cached_bytes == sum(
      source[i]['mixture'].nbytes + source[i]['sources'].nbytes for i in range(12))
  for index, example in zip(indices, results):
    np.testing.assert_array_equal(example['mixture'], source[index]['mixture'])


def test_negative_cache_size_is_refused(data_dir):
  with pytest.raises(ValueError, match='cache_bytes must be >= 0'):
    train_iterator(data_dir, cache_bytes=-1)
