"""Data-free super-weight detection: one forward pass per iteration (Yu et al. 2024, Sec. 3).

Per decoder layer the hooks report the largest value the MLP writes into the residual stream
(its *spike*, at token t and hidden channel `row`) and the down-projection input channel `col`
whose product `x[t, col] * W[row, col]` contributes most to it. A layer is a candidate when

  1. |spike| >= `min_spike`                                  (absolute floor), and
  2. |spike| >= `median_ratio` x median over layers of |spike|  (it stands out), and
  3. it is not *cancelling* a massive activation already in the residual stream: a write of the
     opposite sign to a residual value at least `cancel_ratio` x |spike| large is a layer that
     removes the super activation (late layers do this), not one that creates it. A layer seen
     cancelling in any iteration is excluded from then on: once the true super weights are
     zeroed, those layers over-shoot and would otherwise look like new sources.

The super weight of a candidate layer is `down_proj.weight[row, col]`. Iteration zeroes what was
found and runs again, so several super weights in one row (the second one only visible once the
first is gone) are found; it stops when an iteration adds nothing new. Weights are restored
before returning: the model is left as it was given.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .arch import Adapter, adapter_for, down_proj_matrix
from .coords import SuperWeight
from .errors import UsageError
from .hooks import LayerStats, capture_layer_stats
from .placement import execution_device

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
DEFAULT_ITERATIONS = 5


@dataclass(frozen=True)
class SpikeRule:
    """When a layer's residual write counts as a super activation (see module docstring)."""

    min_spike: float = 100.0
    median_ratio: float = 50.0
    cancel_ratio: float = 0.1

    def is_cancelling(self, s: LayerStats) -> bool:
        opposes = s.spike * s.residual_before < 0
        return opposes and abs(s.residual_before) >= self.cancel_ratio * abs(s.spike)

    def standing_out(self, stats: list[LayerStats]) -> list[LayerStats]:
        """Layers whose spike passes the floor and the multiple of the median (rules 1 and 2)."""
        median = statistics.median(abs(s.spike) for s in stats)
        threshold = max(self.min_spike, self.median_ratio * median)
        return [s for s in stats if abs(s.spike) >= threshold]


@dataclass
class Detection:
    """What `detect` found, with the per-layer evidence of every iteration (for tables and plots)."""

    super_weights: list[SuperWeight]
    iterations: list[list[LayerStats]] = field(default_factory=list)
    candidate_layers: list[list[int]] = field(default_factory=list)
    cancelling_layers: list[int] = field(default_factory=list)
    prompt: str = DEFAULT_PROMPT
    num_tokens: int = 0
    rule: SpikeRule = field(default_factory=SpikeRule)


def forward_pass(model: nn.Module, input_ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=False)


def input_device(model: nn.Module) -> torch.device:
    return execution_device(model.get_input_embeddings())


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty; pass a non-empty --prompt (default: the paper's sentence)")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if input_ids.shape[-1] == 0:
        raise UsageError("the prompt encodes to no tokens; pass a longer --prompt")
    return input_ids


def detect(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    rule: SpikeRule | None = None,
    prompt: str = DEFAULT_PROMPT,
    on_iteration=None,
) -> Detection:
    """Find super weights of `model` from forward passes on `input_ids` ([1, seq])."""
    adapter: Adapter = adapter_for(model)
    input_ids = input_ids.to(input_device(model))
    originals: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    def one_pass() -> list[LayerStats]:
        with capture_layer_stats(model, adapter) as stats:
            forward_pass(model, input_ids)
        return stats

    def zero(weight: SuperWeight) -> None:
        matrix = down_proj_matrix(model, weight.layer, weight.expert, adapter)
        with torch.no_grad():
            originals.append((matrix, weight.row, weight.col, matrix[weight.row, weight.col].clone()))
            matrix[weight.row, weight.col] = 0

    try:
        return iterate(one_pass, zero, iterations=iterations, rule=rule, prompt=prompt,
                       num_tokens=int(input_ids.shape[-1]), on_iteration=on_iteration)
    finally:
        with torch.no_grad():
            for matrix, row, col, value in reversed(originals):
                matrix[row, col] = value


def iterate(
    one_pass: Callable[[], list[LayerStats]],
    zero: Callable[[SuperWeight], None],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    rule: SpikeRule | None = None,
    prompt: str = DEFAULT_PROMPT,
    num_tokens: int = 0,
    on_iteration=None,
) -> Detection:
    """The iteration of the module docstring, whatever runs the passes.

    `one_pass` runs one forward pass and returns its per-layer stats; `zero(weight)` makes the next
    passes see that weight as zero (in a loaded model, or in weights streamed from disk).
    """
    if iterations < 1:
        raise UsageError(f"--iterations must be at least 1, got {iterations}")
    rule = rule or SpikeRule()
    result = Detection(super_weights=[], rule=rule, prompt=prompt, num_tokens=num_tokens)
    found: dict[tuple, SuperWeight] = {}
    cancelling: set[int] = set()
    for iteration in range(iterations):
        stats = one_pass()
        result.iterations.append(stats)
        spiking = rule.standing_out(stats)
        cancelling |= {s.layer for s in spiking if rule.is_cancelling(s)}
        candidates = [s for s in spiking if s.layer not in cancelling]
        result.candidate_layers.append([s.layer for s in candidates])
        new = []
        for s in candidates:
            weight = SuperWeight(
                layer=s.layer, row=s.row, col=s.col, expert=s.expert, value=s.col_weight,
                input_activation=s.col_input, output_spike=s.spike, token=s.spike_token,
                iteration=iteration,
            )
            if weight.key not in found:
                new.append(weight)
        if on_iteration:
            on_iteration(iteration, new)
        if not new:
            break
        for weight in new:
            found[weight.key] = weight
            zero(weight)
    result.super_weights = list(found.values())
    result.cancelling_layers = sorted(cancelling)
    return result
