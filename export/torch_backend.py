"""The torch model behind the generation loop's backend interface (agent/generation.py)."""
from __future__ import annotations

import numpy as np
import torch

from export.model import MiniCPM


class TorchBackend:
    """Runs prefill/decode on a MiniCPM module; inputs and outputs are numpy, as for every backend."""

    def __init__(self, model: MiniCPM, max_batch: int = 1, max_seq: int = 2048):
        self.model = model
        self.max_batch, self.max_seq = max_batch, max_seq
        model.setup_cache(max_batch, max_seq)

    @torch.inference_mode()
    def prefill(self, row: int, ids: np.ndarray) -> np.ndarray:
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]  # (1, T)
        pos = torch.arange(ids_t.shape[1])[None]
        return self.model(ids_t, pos, first_row=row)[0, -1].numpy()

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[:, None]  # (n, 1)
        pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))[:, None]
        return self.model(ids_t, pos)[:, -1].numpy()

    @torch.inference_mode()
    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        """fp32 logits (B, T, V) of every position of equal-length rows, from an empty cache."""
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        pos = torch.arange(ids_t.shape[1]).expand(ids_t.shape[0], -1)
        return self.model(ids_t, pos).numpy()
