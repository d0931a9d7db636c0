"""`sw detect --verify`: what each found weight measurably does, and whether other prompts agree.

Detection decides from one forward pass what a weight *writes*; verification measures what
removing it *does*. On a short text (configs/verify_text.txt, prose written for this project, or
the user's `--verify-text`) it computes the perplexity of the model

  - as given;
  - with each found weight alone zeroed;
  - with all of them zeroed, then with all zeroed and the super activation written back
    (restore.restored_activation: the paper's Table 1 restoration);
  - with a random control: as many random weights of the same matrices zeroed;

and labels each weight by that (`label_rule`):

  super      zeroing it alone raises perplexity at least SUPER_FACTOR (2x);
  redundant  it is not super alone, but zeroing every found weight that is not super together
             raises perplexity at least 2x: it matters with the others (post-norm models build
             one super activation in several layers, each through one weight);
  minor      otherwise.

It also runs the detection on a few more prompts (VERIFY_PROMPTS) and says whether the same
coordinates come out: the paper finds the super activation independent of the prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..edit.ablate import ablated, random_control
from ..edit.restore import restored_activation
from ..model.adapters import adapter_for
from ..coords import SuperWeight
from ..find.detect import DEFAULT_ITERATIONS, SpikeRule, detect, encode_prompt, input_device
from ..errors import UsageError
from ..model.source import configs_dir

SUPER_FACTOR = 2.0
VERIFY_TEXT_NAME = "verify_text.txt"
MAX_VERIFY_TOKENS = 1024  # enough for a stable ratio; keeps --verify to seconds on a CPU
VERIFY_PROMPTS = (
    "The weather in the mountains changed quickly that afternoon.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis converts light energy into chemical energy.",
)


@dataclass
class WeightEffect:
    weight: SuperWeight
    perplexity: float  # with this weight alone zeroed
    label: str = "minor"


@dataclass
class PromptCheck:
    prompt: str
    coordinates: list[tuple]
    same: bool  # the same coordinates as the detection being verified


@dataclass
class Verification:
    text_source: str
    num_tokens: int
    perplexity: float  # the model as given
    effects: list[WeightEffect]
    all_zeroed: float | None
    restored: float | None  # None where restoration is not supported (mixture-of-experts)
    control: float | None
    control_weights: list[SuperWeight] = field(default_factory=list)
    redundant_group: float | None = None  # every non-super weight zeroed together
    prompts: list[PromptCheck] = field(default_factory=list)
    seconds: float = 0.0

    def labels(self) -> dict[tuple, str]:
        return {e.weight.key: e.label for e in self.effects}

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text_source, "num_tokens": self.num_tokens, "rule": label_rule(),
            "perplexity": self.perplexity, "all_zeroed": self.all_zeroed, "restored": self.restored,
            "random_control": self.control,
            "random_control_weights": [w.to_dict() for w in self.control_weights],
            "non_super_zeroed_together": self.redundant_group,
            "weights": [{**e.weight.to_dict(), "perplexity_alone_zeroed": e.perplexity, "effect": e.label}
                        for e in self.effects],
            "prompts": [{"prompt": p.prompt, "coordinates": [list(c) for c in p.coordinates], "same": p.same}
                        for p in self.prompts],
            "seconds": self.seconds,
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, perplexity, x original) for a table."""
        def row(what: str, value: float | None) -> tuple[str, str, str]:
            if value is None:
                return what, "n/a", ""
            return what, f"{value:.4g}", f"{value / self.perplexity:.2f}"

        rows = [row("original", self.perplexity)]
        rows += [row(f"{e.weight.label()} alone zeroed -> {e.label}", e.perplexity) for e in self.effects]
        if self.redundant_group is not None:
            rows.append(row("non-super weights zeroed together", self.redundant_group))
        rows += [row("all zeroed", self.all_zeroed), row("all zeroed, super activation restored", self.restored),
                 row(f"random control ({len(self.control_weights)} weights)", self.control)]
        return rows


def label_rule() -> str:
    return (f"super: zeroing it alone raises perplexity >= {SUPER_FACTOR:g}x; redundant: not super, but zeroing "
            f"all non-super found weights together raises it >= {SUPER_FACTOR:g}x; minor: otherwise")


def read_verify_text(path: str | Path | None = None) -> tuple[str, str]:
    """(text, where it came from): `path`, or the prose shipped in configs/."""
    source = Path(path) if path is not None else configs_dir() / VERIFY_TEXT_NAME
    if not source.is_file():
        raise UsageError(f"--verify-text {source}: no such file; give a UTF-8 text file of a few hundred words")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--verify-text {source} is not UTF-8 text; give a UTF-8 text file") from None
    if not text.strip():
        raise UsageError(f"--verify-text {source} is empty; give a file of a few hundred words")
    return text, ("shipped text" if path is None else str(source))


def encode_text(tokenizer, text: str) -> torch.Tensor:
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :MAX_VERIFY_TOKENS]
    if input_ids.shape[-1] < 2:
        raise UsageError("--verify-text encodes to fewer than 2 tokens; give a longer text")
    return input_ids


def text_perplexity(model: nn.Module, input_ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) over the text, log-softmax in float32."""
    input_ids = input_ids.to(input_device(model))
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        targets = input_ids[0, 1:].to(logits.device)
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).mean()
    return math.exp(float(nll))


def verify(
    model: nn.Module,
    tokenizer,
    weights: Sequence[SuperWeight],
    *,
    text: str | None = None,
    text_source: str = "shipped text",
    prompts: Sequence[str] = VERIFY_PROMPTS,
    rule: SpikeRule | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Verification:
    """Measure each weight's effect (module docstring). The model is left as it was given."""
    progress = progress or (lambda message: None)
    started = time.perf_counter()
    if text is None:
        text, text_source = read_verify_text()
    input_ids = encode_text(tokenizer, text)
    weights = list(weights)

    def zeroed(ws: Sequence[SuperWeight]) -> float:
        with ablated(model, ws):
            return text_perplexity(model, input_ids)

    progress("verifying: perplexity of the original")
    base = text_perplexity(model, input_ids)
    effects = []
    for i, w in enumerate(weights):
        progress(f"verifying: {w.label()} alone zeroed ({i + 1}/{len(weights)})")
        effects.append(WeightEffect(w, zeroed([w])))
    result = Verification(text_source, int(input_ids.shape[-1]), base, effects, None, None, None)
    if weights:
        progress("verifying: all zeroed, restored, random control")
        with ablated(model, weights) as record:
            result.all_zeroed = text_perplexity(model, input_ids)
            if not adapter_for(model).experts:  # restoration is dense-only (ablate.py)
                with restored_activation(model, record):
                    result.restored = text_perplexity(model, input_ids)
        result.control_weights = random_control(model, weights, seed)
        result.control = zeroed(result.control_weights)
        for e in effects:
            e.label = "super" if e.perplexity >= SUPER_FACTOR * base else "minor"
        rest = [e for e in effects if e.label != "super"]
        if len(rest) > 1:
            result.redundant_group = zeroed([e.weight for e in rest])
            if result.redundant_group >= SUPER_FACTOR * base:
                for e in rest:
                    e.label = "redundant"
    found = sorted(w.key for w in weights)
    for prompt in prompts:
        progress(f"verifying: detection on {prompt[:30]!r}")
        other = detect(model, encode_prompt(tokenizer, prompt), iterations=iterations, rule=rule, prompt=prompt)
        keys = sorted(w.key for w in other.super_weights)
        result.prompts.append(PromptCheck(prompt, keys, keys == found))
    result.seconds = time.perf_counter() - started
    return result


def labelled(weights: Sequence[SuperWeight], verification: Verification) -> list[SuperWeight]:
    """The weights with their measured effect recorded (for the coordinates file)."""
    by_key = {e.weight.key: e for e in verification.effects}
    return [replace(w, effect=by_key[w.key].label, perplexity_alone_zeroed=by_key[w.key].perplexity)
            if w.key in by_key else w for w in weights]
