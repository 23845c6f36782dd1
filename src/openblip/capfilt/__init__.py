"""CapFilt: bootstrap a web image-text dataset with a captioner and a filter (BLIP section 3.3).

:func:`run_capfilt` reads WebDataset shards and writes one output shard per input shard
with the kept web and synthetic texts; :func:`score_texts` and :func:`decide` are the
filter, :func:`sample_captions` the captioner. The command line is ``openblip capfilt``.
"""

from .filter import DEFAULT_THRESHOLD, decide, score_texts
from .run import CapfiltSettings, input_shards, run_capfilt
from .sample import sample_captions, sample_seed, sampling_settings

__all__ = [
    "DEFAULT_THRESHOLD",
    "CapfiltSettings",
    "decide",
    "input_shards",
    "run_capfilt",
    "sample_captions",
    "sample_seed",
    "sampling_settings",
    "score_texts",
]
