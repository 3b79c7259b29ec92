"""TFDS builders for the supported corpora (importing registers them)."""

from data_pipelines.builders.dns_challenge import DnsChallenge
from data_pipelines.builders.libri2mix import Libri2mix
from data_pipelines.builders.press_synth import PressSynth
from data_pipelines.builders.wham import Wham
from data_pipelines.builders.whamr import Whamr
from data_pipelines.builders.wsj0_2mix import Wsj02mix

BUILDERS = {
    builder.name: builder
    for builder in (Wsj02mix, Wham, Whamr, Libri2mix, DnsChallenge, PressSynth)
}
