"""Images of several sizes in one flat uint8 buffer: how the in-memory path stores a training
folder whose images differ in size (photos as users have them). Each image keeps its own
pixels (no resize when stored); its views are cut from it one by one (tlkd/data/batch_aug.py).

torch has no ragged image tensor (nested tensors do not index or memory-map like this), hence
this small class: ``data`` holds the images back to back in (C, H, W) order, ``index`` one row
per image: its offset in ``data``, then C, H, W.
"""

from __future__ import annotations

import torch


class Ragged:
    """A sequence of uint8 (C, H, W) images of several sizes, stored back to back."""

    def __init__(self, data: torch.Tensor, index: torch.Tensor) -> None:
        self.data, self.index = data, index
        self._rows = index.tolist()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        offset, c, h, w = self._rows[i]
        return self.data[offset : offset + c * h * w].view(c, h, w)

    def sizes(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Heights and widths (float32) of the images ``rows`` (all when None)."""
        hw = self.index[:, 2:4] if rows is None else self.index[rows, 2:4]
        return hw[:, 0].float(), hw[:, 1].float()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    def element_size(self) -> int:
        return 1
