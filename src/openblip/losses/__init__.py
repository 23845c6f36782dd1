"""Training objectives of BLIP: ITC with momentum queue, ITM with hard negatives, LM."""
from openblip.losses.itc import itc_hard_targets, itc_logits, itc_loss, ramp_alpha
from openblip.losses.itm import itm_labels, itm_loss, sample_hard_negatives
from openblip.losses.lm import IGNORE_INDEX, lm_loss, mask_prompt_and_padding, scored_positions
from openblip.losses.queue import FeatureQueue, QueueFeatures, copy_params, momentum_update

__all__ = [
    "itc_loss",
    "itc_logits",
    "itc_hard_targets",
    "ramp_alpha",
    "FeatureQueue",
    "QueueFeatures",
    "momentum_update",
    "copy_params",
    "sample_hard_negatives",
    "itm_loss",
    "itm_labels",
    "lm_loss",
    "mask_prompt_and_padding",
    "scored_positions",
    "IGNORE_INDEX",
]
