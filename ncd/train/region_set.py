"""``RegionSet``: the crops, masks and labels that training and inference read, decoded per row."""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class RegionSet:
    """Decoded-on-demand crops and their metadata; ``labels`` is -1 for unlabelled rows."""

    crop_png: list[bytes]
    mask_png: list[bytes]
    labels: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32, crop scores in [0,1] (1 for labelled rows)
    region_ids: list[str]
    guide_png: list[list[bytes]] = field(default_factory=list)  # extra mask channels (anomaly, object)

    def __len__(self) -> int:
        return len(self.region_ids)

    @property
    def labelled(self) -> np.ndarray:
        return self.labels >= 0

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (3,H,W) uint8 and masks (1+G,H,W) float in [0,1] of row ``i``: the region mask,
        then one channel per ``guide_png`` column (anomaly map, object mask)."""
        img = cv2.imdecode(np.frombuffer(self.crop_png[i], np.uint8), cv2.IMREAD_COLOR)
        region = cv2.imdecode(np.frombuffer(self.mask_png[i], np.uint8), cv2.IMREAD_GRAYSCALE)
        masks = [region]
        for c, g in enumerate(self.guide_png):  # a row without the channel: region mask, then all-object
            masks.append(cv2.imdecode(np.frombuffer(g[i], np.uint8), cv2.IMREAD_GRAYSCALE) if g[i]
                          else (region if c == 0 else np.full_like(region, 255)))
        masks = np.stack(masks)
        img = torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)
        return img, torch.from_numpy(masks).float() / 255.0
