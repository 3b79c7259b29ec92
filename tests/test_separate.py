"""press-separate, the chunked separator and the model-directory loader."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import soundfile

from press_jax import dynamic, model_dir, separation
from press_jax.cli import separate as cli
from press_jax.models import press_net
from tests import model_util

SMALL = model_util.SMALL


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  return model_util.save_small_model(str(tmp_path_factory.mktemp("model")))


def write_wav(path, signal, rate, subtype="FLOAT"):
  soundfile.write(str(path), np.asarray(signal, np.float32), rate, subtype=subtype)
  return str(path)


def speech_like(seconds, rate, seed=0, channels=None):
  rng = np.random.default_rng(seed)
  time = np.arange(int(seconds * rate)) / rate
  signal = 0.3 * np.sin(2 * np.pi * 180 * time) * (1 + np.sin(2 * np.pi * 3 * time))
  signal = signal + 0.05 * rng.standard_normal(time.size)
  if channels:
    signal = np.stack([signal * (1 + 0.1 * c) for c in range(channels)], axis=1)
  return signal.astype(np.float32)


def run_cli(capsys, *argv):
  status = cli.main([*map(str, argv), "--no-progress"])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


# --- stitching, checked with a stand-in separation whose answer is known --------------------
class KnownSeparation:
  """Speaker 1 = the window, speaker 2 = -0.5 x the window, in a random order per window."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)

  def __call__(self, window, valid):
    sources = np.stack([window, -0.5 * window])
    if self.rng.random() < 0.5:
      sources = sources[::-1]
    blocks = -(-window.size // 400)
    return dynamic.DynamicSelection(
        waveform=sources[None], exit_index=np.zeros((1, blocks), np.int32),
        probability=np.ones((1, blocks), np.float32),
        block_valid=np.ones((1, blocks), bool), exits_run=np.int32(1),
        waveform_heads_run=np.int32(1), variance_heads_run=np.int32(1))


@pytest.mark.parametrize("samples", [300, 4000, 16000, 16001, 40000 + 123])
@pytest.mark.parametrize("piece", [1000, 7919])
def test_stitching_reconstructs_a_known_separation(samples, piece):
  model = press_net.create("tiny", **SMALL)
  settings = separation.SeparationSettings(chunk_seconds=0.5, context_seconds=0.1)
  separator = separation.ChunkedSeparator(model, None, settings)
  separator._select = KnownSeparation()
  signal = np.random.default_rng(1).standard_normal(samples).astype(np.float32)
  outputs, largest_buffer = [], 0
  for start in range(0, samples, piece):
    outputs += list(separator.feed(signal[start:start + piece]))
    largest_buffer = max(largest_buffer, separator._buffer.size)
  outputs += list(separator.finish())
  output = np.concatenate(outputs, axis=1)
  assert output.shape == (2, samples)
  first = 0 if np.dot(output[0], signal) > 0 else 1
  np.testing.assert_allclose(output[first], signal, atol=1e-6)
  np.testing.assert_allclose(output[1 - first], -0.5 * signal, atol=1e-6)
  # Bounded memory: the input buffer never holds more than a window and one piece.
  assert largest_buffer <= separator.geometry.window + piece


def test_wav_api_with_the_model_matches_the_whole_utterance_for_one_window(saved_model):
  loaded = model_dir.load(saved_model)
  wav = speech_like(0.9, 8000)
  settings = separation.SeparationSettings(chunk_seconds=1.0, context_seconds=0.1,
                                           static_exit=2)
  sources, report = separation.separate(loaded.model, loaded.params, wav, settings)
  assert sources.shape == (2, wav.size)
  whole = loaded.model.apply({"params": loaded.params}, wav[None])
  np.testing.assert_allclose(sources, np.asarray(whole.mean[-1, 0]), atol=1e-5)
  assert report["mean_exit"] == 2.0 and report["windows"] == 1


# --- the command line -------------------------------------------------------------------------
def test_separates_a_file_at_its_own_rate(saved_model, tmp_path, capsys):
  inputs = [write_wav(tmp_path / "a16k.wav", speech_like(1.3, 16000), 16000),
            write_wav(tmp_path / "b44k.flac", speech_like(0.7, 44100), 44100, "PCM_16"),
            write_wav(tmp_path / "c8k.wav", speech_like(2.1, 8000), 8000)]
  out = tmp_path / "out"
  status, stdout, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", out, *inputs)
  assert status == 0, stderr
  for path, rate in zip(inputs, (16000, 44100, 8000)):
    name = os.path.splitext(os.path.basename(path))[0]
    frames = soundfile.info(path).frames
    for speaker in (1, 2):
      data, out_rate = soundfile.read(str(out / f"{name}_s{speaker}.wav"))
      assert out_rate == rate and data.shape == (frames,)
      assert np.isfinite(data).all()
    report = json.loads((out / f"{name}_exits.json").read_text())
    assert report["blocks"] and all(b["exit"] in (1, 2) for b in report["blocks"])
    assert report["gmac_per_s"] > 0 and report["real_time_factor"] > 0
  assert not list(out.glob("*.tmp"))
  assert "3 of 3 files separated" in stdout


def test_keep_model_rate_and_multichannel(saved_model, tmp_path, capsys):
  stereo = write_wav(tmp_path / "stereo.wav", speech_like(1.0, 16000, channels=2), 16000)
  out = tmp_path / "out"
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", out,
                              "--keep-model-rate", stereo)
  assert status == 0 and "2 channels downmixed by the mean" in stderr
  data, rate = soundfile.read(str(out / "stereo_s1.wav"))
  assert rate == 8000 and data.shape == (8000,)
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", out,
                              "--channel", "5", stereo)
  assert status == 1 and "--channel 5 asked for, the file has 2 channel(s)" in stderr


def test_dynamic_and_masked_paths_write_the_same_audio(saved_model, tmp_path, capsys):
  path = write_wav(tmp_path / "m.wav", speech_like(3.0, 8000), 8000)
  for flag, out in ((), "dyn"), (("--masked",), "masked"):
    status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path / out,
                                "--chunk-seconds", "1", "--target-db", "0", *flag, path)
    assert status == 0, stderr
  for speaker in (1, 2):
    a, _ = soundfile.read(str(tmp_path / "dyn" / f"m_s{speaker}.wav"))
    b, _ = soundfile.read(str(tmp_path / "masked" / f"m_s{speaker}.wav"))
    np.testing.assert_allclose(a, b, atol=1e-5)
  dyn = json.loads((tmp_path / "dyn" / "m_exits.json").read_text())
  masked = json.loads((tmp_path / "masked" / "m_exits.json").read_text())
  assert [b["exit"] for b in dyn["blocks"]] == [b["exit"] for b in masked["blocks"]]


@pytest.mark.parametrize("signal", ["silence", "clipped", "dc"])
def test_valid_edge_signals_give_finite_output(saved_model, tmp_path, capsys, signal):
  wav = {"silence": np.zeros(8000), "clipped": np.clip(5 * speech_like(1.0, 8000), -1, 1),
         "dc": speech_like(1.0, 8000) + 0.5}[signal]
  path = write_wav(tmp_path / f"{signal}.wav", wav, 8000)
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path, path)
  assert status == 0, stderr
  for speaker in (1, 2):
    data, _ = soundfile.read(str(tmp_path / f"{signal}_s{speaker}.wav"))
    assert np.isfinite(data).all() and data.shape == (8000,)


def bad_inputs(tmp_path):
  """(name, path) of inputs that must fail with a message containing the name's text."""
  empty = tmp_path / "empty.wav"
  empty.write_bytes(b"")
  corrupt = tmp_path / "corrupt.wav"
  body = b"WAVEfmt garbage garbage garbage"
  corrupt.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
  good = write_wav(tmp_path / "whole.wav", speech_like(1.0, 8000), 8000, "PCM_16")
  truncated = tmp_path / "truncated.wav"
  truncated.write_bytes(open(good, "rb").read()[:3000])
  zero = tmp_path / "zero.wav"
  soundfile.write(str(zero), np.zeros((0,), np.float32), 8000)
  short = write_wav(tmp_path / "short.wav", np.zeros(10), 8000)
  nan = write_wav(tmp_path / "nan.wav", np.r_[np.zeros(2000), np.nan, np.zeros(2000)], 8000)
  inf = write_wav(tmp_path / "inf.wav", np.r_[np.zeros(2000), np.inf, np.zeros(2000)], 8000)
  (tmp_path / "a_directory.wav").mkdir()
  return {
      "no such file": str(tmp_path / "missing.wav"),
      "a_directory.wav: is a directory with no audio files": str(tmp_path / "a_directory.wav"),
      "empty.wav: not a readable audio file": str(empty),
      "corrupt.wav: not a readable audio file": str(corrupt),
      "truncated": str(truncated),
      "zero.wav: holds no samples": str(zero),
      "shorter than one encoder frame": short,
      "nan.wav: expected finite samples, found NaN/inf (first at sample 2000)": nan,
      "inf.wav: expected finite samples": inf,
  }


def test_bad_inputs_fail_one_by_one_and_the_rest_is_separated(saved_model, tmp_path, capsys):
  cases = bad_inputs(tmp_path)
  good = write_wav(tmp_path / "good.wav", speech_like(1.0, 8000), 8000)
  out = tmp_path / "out"
  status, stdout, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", out,
                                   *cases.values(), good)
  assert status == 1
  lines = [line for line in stderr.splitlines() if "error:" in line]
  assert len(lines) == len(cases), stderr
  for message, path in cases.items():
    assert any(message in line and os.path.basename(path) in line for line in lines), (
        message, stderr)
  assert "Traceback" not in stderr
  assert (out / "good_s1.wav").exists() and (out / "good_s2.wav").exists()
  assert f"1 of {len(cases) + 1} files separated" in stdout
  # Nothing half-written is left for the failed files.
  assert sorted(p.name for p in out.iterdir()) == ["good_exits.json", "good_s1.wav",
                                                    "good_s2.wav"]


def test_debug_shows_tracebacks(saved_model, tmp_path, capsys):
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path, "--debug",
                              str(tmp_path / "missing.wav"))
  assert status == 1 and "Traceback" in stderr


def corrupt_model(tmp_path, saved_model, what):
  directory = tmp_path / what
  directory.mkdir()
  config = json.loads(open(os.path.join(saved_model, "config.json")).read())
  params = open(os.path.join(saved_model, "params.msgpack"), "rb").read()
  if what == "corrupt":
    params = params[:100]
  if what == "incompatible":
    config["width"] = 24
  (directory / "config.json").write_text(json.dumps(config))
  (directory / "params.msgpack").write_bytes(params)
  return str(directory)


@pytest.mark.parametrize("arguments,message", [
    (["--target-db", "500"], "--target-db: expected a level in [-100, 100] dB"),
    (["--target-db", "nan"], "--target-db"),
    (["--confidence", "1.5"], "--confidence: expected a probability in (0, 1)"),
    (["--confidence", "0"], "--confidence"),
    (["--exit", "3"], "--exit: the model has exits 1..2, got 3"),
    (["--max-exit", "0"], "--max-exit: the model has exits 1..2"),
    (["--conditions", "snr,loud"], "--conditions"),
    (["--chunk-seconds", "0.01"], "--chunk-seconds"),
])
def test_bad_arguments(saved_model, tmp_path, capsys, arguments, message):
  path = write_wav(tmp_path / "x.wav", speech_like(0.5, 8000), 8000)
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path / "o",
                              *arguments, path)
  assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("what,message", [
    ("missing", "no such model directory"),
    ("file", "got a file"),
    ("empty", "holds no model"),
    ("corrupt", "cannot load the model"),
    ("incompatible", "cannot load the model"),
])
def test_bad_models(saved_model, tmp_path, capsys, what, message):
  if what == "missing":
    model = str(tmp_path / "nowhere")
  elif what == "file":
    model = write_wav(tmp_path / "model.wav", np.zeros(100), 8000)
  elif what == "empty":
    model = str(tmp_path / "empty_dir")
    os.makedirs(model)
  else:
    model = corrupt_model(tmp_path, saved_model, what)
  path = write_wav(tmp_path / "x.wav", speech_like(0.5, 8000), 8000)
  status, _, stderr = run_cli(capsys, "--model", model, "--out-dir", tmp_path / "o", path)
  assert status == 2 and message in stderr and "--model" in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1


def test_bad_output_directories(saved_model, tmp_path, capsys):
  path = write_wav(tmp_path / "x.wav", speech_like(0.5, 8000), 8000)
  a_file = tmp_path / "taken"
  a_file.write_text("")
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", a_file, path)
  assert status == 2 and "exists and is not a directory" in stderr
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir",
                              "/proc/press-separate-test", path)
  assert status == 2 and "not writable" in stderr


def test_a_directory_of_inputs_and_the_plot(saved_model, tmp_path, capsys):
  folder = tmp_path / "in"
  (folder / "sub").mkdir(parents=True)
  write_wav(folder / "one.wav", speech_like(1.0, 8000), 8000)
  write_wav(folder / "sub" / "two.wav", speech_like(1.0, 8000, seed=2), 8000)
  (folder / "notes.txt").write_text("not audio")
  status, stdout, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path / "o",
                                   "--plot", folder)
  assert status == 0, stderr
  assert "2 of 2 files separated" in stdout
  assert (tmp_path / "o" / "one_exits.png").stat().st_size > 1000
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path / "o",
                              tmp_path / "o" / "sub_missing")
  assert status == 1


def test_model_dir_resolves_run_directories(saved_model, tmp_path):
  run = tmp_path / "run"
  os.makedirs(run)
  os.symlink(saved_model, run / "model")
  loaded = model_dir.load(str(run))
  assert loaded.kind == "saved" and loaded.directory.endswith("model")
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    press_net.load(str(tmp_path))


def long_file_case(tmp_path, saved_model, capsys, seconds):
  rate = 16000
  path = str(tmp_path / "long.wav")
  with soundfile.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as handle:
    for second in range(int(seconds)):
      handle.write(speech_like(1.0, rate, seed=second))
  status, _, stderr = run_cli(capsys, "--model", saved_model, "--out-dir", tmp_path / "o", path)
  assert status == 0, stderr
  info = soundfile.info(str(tmp_path / "o" / "long_s1.wav"))
  assert info.frames == int(seconds) * rate and info.samplerate == rate


def test_long_input_reduced(saved_model, tmp_path, capsys):
  long_file_case(tmp_path, saved_model, capsys, 30)


@pytest.mark.slow
def test_long_input_ten_minutes(saved_model, tmp_path, capsys):
  long_file_case(tmp_path, saved_model, capsys, 600)
