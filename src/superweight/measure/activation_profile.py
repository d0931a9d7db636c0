"""The activation profile of a study: per layer, the largest |down_proj input| and |output|
before and after zeroing the super weights (read through `find.hooks`; zeroing through
`ablate.ablated`, undone exactly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..coords import SuperWeight
from ..edit import ablate
from ..find.hooks import LayerStats, capture_layer_stats
from ..model.placement import execution_device


@dataclass
class ActivationProfile:
    """Per-layer max |down_proj input| / |output| before and after zeroing the super weights."""

    before: list[LayerStats]
    after: list[LayerStats]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [
            {"layer": b.layer, "input_max_before": b.input_max, "input_max_after": a.input_max,
             "output_max_before": b.output_max, "output_max_after": a.output_max}
            for b, a in zip(self.before, self.after)
        ]}


def activation_profile(model, input_ids: torch.Tensor, super_weights: Sequence[SuperWeight]) -> ActivationProfile:
    device = execution_device(model.get_input_embeddings())
    input_ids = input_ids.to(device)

    def measure() -> list[LayerStats]:
        with capture_layer_stats(model) as stats, torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
        return stats

    before = measure()
    with ablate.ablated(model, list(super_weights)):
        after = measure()
    return ActivationProfile(before, after)
