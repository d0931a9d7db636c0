"""Data-free super-weight detection: one forward pass per iteration (Yu et al. 2024, Sec. 3).

Per decoder layer the hooks (hooks.py) report the largest value the MLP writes into the residual
stream (its *spike*, at token t and hidden channel `row`; after the post-feed-forward norm where
the family has one), the down-projection input channel `col` whose product
`x[t, col] * W[row, col]` pushes hardest in the spike's direction, and the evidence below. Each
layer is judged **on its own write**, never against the other layers: in post-norm models
(Gemma 2/3, OLMo-2) every layer writes thousands and several consecutive layers build one super
activation together, so "stands out from the median layer" sees nothing there. A layer is a
candidate when all of these hold (SpikeRule; README "How detection decides" gives the reasons):

  1. large:         |spike| >= `min_spike`;
  2. concentrated:  the raw down_proj output at token t is nearly one-hot in channel `row`:
                    raw[t, row]**2 / sum(raw[t, :]**2) >= `min_concentration`;
  3. one weight:    x[t, col] * W[row, col] makes at least `min_share` of raw[t, row];
  4. not cancelling: a write against the residual value already at (t, row) that leaves it
     smaller than it found it removes an activation (late layers remove the super activation
     this way), it does not create one;
  5. carried on:    the residual stream leaving the layer holds at least `carry_ratio` x |spike|
     at (t, row), in the spike's sign, and keeps at least `carry_ratio` of that through the next
     `carry_layers(n)` layers (10 % of the depth, at least one). A write in the last layers goes
     straight to the output head; it is not carried anywhere. This is what tells a late layer that
     writes a massive value only because the super activation it normally removes is gone (SmolLM2
     with its super weights zeroed: layer 28) from a layer that creates one.

The super weight of a candidate layer is `down_proj.weight[row, col]`. Iteration zeroes what was
found and runs again, so several super weights in one row (the second one only visible once the
first is gone) are found; it stops when an iteration adds nothing new. A layer seen cancelling in
any iteration stays excluded, and a new candidate fed by the input channel of a weight already
found in the same layer is that input spike's ordinary fan-out into another row, not a new super
weight. Weights are restored before returning: the model is left as it was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..model.adapters import Adapter, adapter_for, decoder_layers, down_proj_matrix
from ..coords import SuperWeight
from ..errors import UsageError
from .hooks import CARRY_DEPTH, LayerStats, capture_layer_stats, carry_window
from ..model.placement import execution_device

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
DEFAULT_ITERATIONS = 5


@dataclass(frozen=True)
class SpikeRule:
    """When one layer's residual write is a super activation (rules 1-5 of the module docstring)."""

    min_spike: float = 100.0
    min_concentration: float = 0.25
    min_share: float = 0.5
    carry_ratio: float = 0.5
    carry_depth: float = CARRY_DEPTH

    def __post_init__(self):
        checks = (("--min-spike", self.min_spike, 0, None), ("--min-concentration", self.min_concentration, 0, 1),
                  ("--min-share", self.min_share, 0, 1), ("carry_ratio", self.carry_ratio, 0, 1), ("carry_depth", self.carry_depth, 0, 1))
        for name, value, low, high in checks:
            if not math.isfinite(value) or value <= low or (high is not None and value > high):
                allowed = f"in (0, {high}]" if high is not None else "a positive number"
                raise UsageError(f"{name} must be {allowed}, got {value:g}")

    def carry_layers(self, num_layers: int) -> int:
        return carry_window(num_layers, self.carry_depth)

    def is_cancelling(self, s: LayerStats) -> bool:
        return s.spike * s.residual_before < 0 and abs(s.residual_after) < abs(s.residual_before)

    def is_carried(self, s: LayerStats, num_layers: int) -> bool:
        sign = 1.0 if s.spike > 0 else -1.0
        landed = s.residual_after * sign
        needed = self.carry_layers(num_layers)
        later = s.carried[:needed]
        return (landed >= self.carry_ratio * abs(s.spike) and len(later) == needed
                and all(value * sign >= self.carry_ratio * landed for value in later))

    def rejection(self, s: LayerStats, num_layers: int) -> str | None:
        """Why layer `s` is not a candidate (the first rule it fails), or None when it is one."""
        if abs(s.spike) < self.min_spike:
            return "small"
        if s.concentration < self.min_concentration:
            return "spread"
        if s.share < self.min_share:
            return "many weights"
        if self.is_cancelling(s):
            return "cancelling"
        if not self.is_carried(s, num_layers):
            return "not carried"
        return None


@dataclass
class Detection:
    """What `detect` found, with the per-layer evidence of every iteration (for tables and plots)."""

    super_weights: list[SuperWeight]
    iterations: list[list[LayerStats]] = field(default_factory=list)
    candidate_layers: list[list[int]] = field(default_factory=list)
    rejections: list[list[str | None]] = field(default_factory=list)  # per iteration, per layer
    cancelling_layers: list[int] = field(default_factory=list)
    prompt: str = DEFAULT_PROMPT
    num_tokens: int = 0
    rule: SpikeRule = field(default_factory=SpikeRule)


def forward_pass(model: nn.Module, input_ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=False)


def input_device(model: nn.Module) -> torch.device:
    return execution_device(model.get_input_embeddings())


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = False, max_length: int | None = None) -> torch.Tensor:
    """`prompt` as input ids [1, seq]; with `chat_template`, wrapped first as one user turn in the
    tokenizer's chat template (how an instruct model sees text), the assistant's turn opened.

    A prompt longer than `max_length` (the model's context, model/context.py) is refused, not cut:
    the coordinates file records the prompt the super activation was seen on, and a model with
    learned positions (GPT-2's family) has no position past its context at all."""
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty; pass a non-empty --prompt (default: the paper's sentence)")
    if chat_template:
        input_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids
    else:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if input_ids.shape[-1] == 0:
        raise UsageError("the prompt encodes to no tokens; pass a longer --prompt")
    if max_length is not None and input_ids.shape[-1] > max_length:
        wrapped = " with the chat template" if chat_template else ""
        raise UsageError(f"the prompt is {input_ids.shape[-1]} tokens{wrapped}; this model reads at most "
                         f"{max_length}; give a shorter --prompt")
    return input_ids


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as the text of one user turn in the tokenizer's chat template (the template adds
    its own special tokens, so the text is encoded without adding more)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UsageError(f"the tokenizer of {name} has no chat template, so --chat-template cannot wrap "
                         f"the prompt; drop --chat-template (a base model reads the raw prompt)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


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
    rule = rule or SpikeRule()
    num_layers = len(decoder_layers(model, adapter))
    input_ids = input_ids.to(input_device(model))
    originals: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    def one_pass() -> list[LayerStats]:
        with capture_layer_stats(model, adapter, rule.carry_layers(num_layers)) as stats:
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
        reasons = [rule.rejection(s, len(stats)) for s in stats]
        cancelling |= {s.layer for s, reason in zip(stats, reasons) if reason == "cancelling"}
        fed = {(w.layer, w.expert, w.col) for w in found.values()}
        for i, s in enumerate(stats):
            if reasons[i] is None and s.layer in cancelling:
                reasons[i] = "cancelling"  # seen cancelling in an earlier iteration
            elif reasons[i] is None and (s.layer, s.expert, s.col) in fed and (s.layer, s.row, s.col, s.expert) not in found:
                reasons[i] = "fan-out"  # the input spike of a found weight, written into another row
        result.rejections.append(reasons)
        candidates = [s for s, reason in zip(stats, reasons) if reason is None]
        result.candidate_layers.append([s.layer for s in candidates])
        new = []
        for s in candidates:
            weight = SuperWeight(
                layer=s.layer, row=s.row, col=s.col, expert=s.expert, value=s.col_weight,
                input_activation=s.col_input, output_spike=s.spike, token=s.spike_token,
                iteration=iteration, raw_output=s.raw_output, concentration=s.concentration,
                share=s.share, residual_after=s.residual_after,
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
