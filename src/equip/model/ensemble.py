"""Several trained CNNs as one: the k fold models of a cross-validation, averaged
(registry.model=ensemble). Same call as one Classifier: uint8 images in, log probabilities
out (the mean of the members' probabilities, each with its own test-time augmentation), so
whatever serves a Classifier serves this too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from equip.model.cnn import Classifier


class FoldEnsemble(nn.Module):
    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        first = members[0]
        for m in members[1:]:
            if m.classes != first.classes or m.image_size != first.image_size:
                raise ValueError(
                    f"ensemble members disagree: classes {m.classes} at {m.image_size} px "
                    f"against {first.classes} at {first.image_size} px"
                )
        self.members = nn.ModuleList(members)
        self.classes, self.image_size = list(first.classes), first.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(m(x).softmax(1) for m in self.members) / len(self.members)
        return probs.log()  # softmax() of it gives the mean probabilities back
