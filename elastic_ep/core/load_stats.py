"""Expert load statistics: ``[num_layers, num_logical]`` tokens routed to each expert."""

from __future__ import annotations

import numpy as np


def zipf_load(num_layers: int, num_logical: int, exponent: float, seed: int) -> np.ndarray:
    """``[num_layers, num_logical]`` token counts: popularity ``1 / k**exponent`` over a
    random expert order per layer, with +-20% noise."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, num_logical + 1) ** exponent
    order = np.argsort(rng.random((num_layers, num_logical)), axis=1)
    return base[order] * 1e4 * rng.uniform(0.8, 1.2, (num_layers, num_logical))
