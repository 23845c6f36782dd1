"""openblip: BLIP (Bootstrapping Language-Image Pre-training) in PyTorch."""

__version__ = "0.1.0"

from .api import Blip, Features, MatchScores, load  # noqa: E402
from .config import BlipConfig, TextConfig, VisionConfig, list_presets, preset  # noqa: E402
from .models.blip import BlipModel  # noqa: E402

__all__ = ["Blip", "BlipConfig", "BlipModel", "Features", "MatchScores", "TextConfig", "VisionConfig", "list_presets",
           "load", "preset"]
