"""The tag-and-scrub option of the loop: tag every synthetic image, drop detected images before retraining.

Bohacek & Farid show why generated images must be kept out of the next training set; this wires the
safeguards (:mod:`diffaudit.guards`) into the loop engine's hooks. The detection threshold is calibrated on the
loop's own real (untagged) images at ``target_fpr``, so real images are removed at about that rate.
"""

from __future__ import annotations

from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.guards.scrub import LoopTagger, make_loop_filter, tag_name
from diffaudit.guards.tagging import get_tagger
from diffaudit.loop.config import LoopHooks


def tag_and_scrub_hooks(
    real: ImageSet, key: int = 1234, amplitude: float = 3.0, target_fpr: float = 0.01
) -> tuple[LoopHooks, LoopTagger, dict[str, Any]]:
    """Hooks that tag samples with a keyed spread-spectrum pattern and scrub detected images before retraining.

    ``real`` (uint8 ``(N, C, H, W)``, untagged) sets the threshold. Returns the hooks, the tag hook (whose
    ``inherited`` dict says, per generation, which share of a model's *untagged* outputs already carry the tag:
    a tag learned from tagged training data) and a JSON-ready description of the choices.
    """
    tagger = get_tagger("spread-spectrum", key=key, amplitude=amplitude)
    threshold = float(tagger.calibrate(real.images, target_fpr))
    tag_fn = LoopTagger(tagger, threshold)
    hooks = LoopHooks(filter_fn=make_loop_filter(tagger, threshold), tag_fn=tag_fn)
    info = {
        "tagger": tag_name(tagger),
        "threshold": threshold,
        "target_fpr": target_fpr,
        "calibrated_on": f"{len(real)} real images of the loop",
        "realised_fpr_on_real": float(tagger.detect(real.images, threshold).mean()),
        "why": "threshold = the (1 - target_fpr) quantile of tag scores of untagged real images",
    }
    return hooks, tag_fn, info
