"""Condition alignment of a generation's samples: does each image show what it was asked for?

Bohacek & Farid report a CLIP score beside FID; the loop measures the same kind of thing per family:

* class-conditional models: the share of samples that the loop's feature classifier (trained on the real set,
  :mod:`diffaudit.metrics.classifier`) assigns to their intended class;
* text-to-image pipelines: a CLIP score (cosine similarity of image and prompt embeddings, x 100, as in Hessel
  et al.'s CLIPScore without the 2.5 weight and clipping) from a CLIP model directory the user supplies
  (``clip_model``); no download is ever attempted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.errors import CheckpointError

#: Row key suffix (``"<group>/alignment"``).
ALIGNMENT_KEY = "alignment"


def class_alignment(extractor: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> np.ndarray | None:
    """``bool (N,)``: the classifier's top class equals the intended label; None when not a class classifier.

    ``extractor`` is the loop's ``classifier`` feature extractor (its module's ``forward`` gives class logits).
    """
    import torch

    module = getattr(extractor, "module", None)
    head = getattr(module, "head", None)
    if module is None or not isinstance(head, torch.nn.Linear):
        return None
    from diffaudit.metrics.classifier import to_input

    preds = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_input(images[start : start + batch_size]).to(extractor.device)
            preds.append(module(x).argmax(1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    return pred == np.asarray(labels)


class ClipScorer:
    """CLIP score of images against their prompts from a local transformers CLIP directory."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a CLIP model directory (no config.json)")
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load the CLIP model ({exc})") from exc
        self.device = device

    def __call__(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``float64 (N,)`` scores for uint8 ``(N, C, H, W)`` images (grey is repeated to RGB)."""
        import torch

        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if batch.shape[1] == 1:
                batch = np.repeat(batch, 3, axis=1)
            pil = list(batch.transpose(0, 2, 3, 1))
            inputs = self.processor(
                text=list(prompts[start : start + batch_size]), images=pil, return_tensors="pt", padding=True
            ).to(self.device)
            with torch.no_grad():
                img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                txt = self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((100.0 * (img * txt).sum(-1)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)
