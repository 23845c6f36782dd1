"""CapFilt: bootstrap a web image-text dataset with a captioner and a filter (BLIP section 3.3).

:func:`run_capfilt` reads WebDataset shards and writes one output shard per input shard
with the kept web and synthetic texts; :func:`score_texts` and :func:`decide` are the
filter, :func:`sample_captions` the captioner, :func:`calibrate_threshold` chooses the filter's
threshold on held-out human pairs. The command line is ``openblip capfilt``.
"""

from .calibrate import calibrate_threshold, load_or_calibrate
from .filter import DEFAULT_THRESHOLD, decide, score_texts
from .run import CapfiltSettings, input_shards, run_capfilt
from .sample import sample_captions, sample_seed, sampling_settings

__all__ = [
    "DEFAULT_THRESHOLD",
    "CapfiltSettings",
    "calibrate_threshold",
    "decide",
    "input_shards",
    "load_or_calibrate",
    "run_capfilt",
    "sample_captions",
    "sample_seed",
    "sampling_settings",
    "score_texts",
]
