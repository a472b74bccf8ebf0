"""A class-aware contrastive loss for labelled caption sets.

CLIP's InfoNCE (open_clip's ``ClipLoss``) has one positive per row: every other image of the
batch is a negative for a caption, however alike. Remote-sensing caption sets are small and
class-structured (UCM-captions: 21 classes, most sentences naming the class, "there is a piece
of farmland ." alone 82 times), so a batch of 64 holds several images of each class whose
captions describe them all equally well. When images have class labels,
:func:`class_aware_clip_loss` gives a share ``class_weight`` of each row's target to the
other pairs of the same class (supervised-contrastive style) and keeps ``1 - class_weight``
on the pair itself. With ``class_weight = 0`` or no labels it is exactly ``ClipLoss``.

(Exactly repeated sentences need no special care: identical texts have identical
embeddings, so for them ``ClipLoss`` already equals a loss that counts both pairs positive.)
"""
from __future__ import annotations

import torch


def contrastive_targets(labels, class_weight: float, dtype=None):
    """``[B, B]`` target distributions: ``1 - class_weight`` on the diagonal and
    ``class_weight`` spread over the rows' same-class pairs (itself included); rows whose
    label is negative (no class) keep the plain identity target."""
    labelled = labels >= 0
    same = (labels[:, None] == labels[None, :]) & labelled[:, None]
    spread = same.to(dtype or torch.float32)
    spread = spread / spread.sum(dim=1, keepdim=True).clamp(min=1.0)
    eye = torch.eye(labels.numel(), dtype=spread.dtype, device=labels.device)
    weight = class_weight * labelled.to(spread.dtype)[:, None]
    return (1.0 - weight) * eye + weight * spread


def class_aware_clip_loss(image_features, text_features, logit_scale, labels, class_weight: float):
    """Symmetric cross-entropy of the image-text similarities against
    :func:`contrastive_targets` (``labels``: class index per row, -1 for none)."""
    targets = contrastive_targets(labels, class_weight, image_features.dtype)
    logits = logit_scale * image_features @ text_features.T
    per_image = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    per_text = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()  # the targets are symmetric
    return (per_image + per_text) / 2
