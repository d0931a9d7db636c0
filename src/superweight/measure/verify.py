"""`sw detect --verify`: what each candidate measurably does, alone and within the set.

Detection decides from one forward pass what a weight *writes*: it finds *candidates*. What makes a
candidate a *super weight* is what removing it does. On a short text (configs/verify_text.txt,
prose written for this project, or the user's `--verify-text`) verification measures the
log-perplexity effect `v(T) = log ppl(T zeroed) - log ppl(original)` of zeroing sets T of the
candidates S:

  - alone:          v({w}) for each candidate;
  - leave-one-out:  v(S) - v(S without w), what w adds once every other candidate is already zeroed;
  - Shapley value:  the average of v(T + w) - v(T) over every order of zeroing S (exact, by
                    enumerating all 2^n subsets, for n <= MAX_EXACT); the values sum to v(S), so
                    they split the set's whole effect among its members and show interactions
                    (a weight that does nothing alone can carry much of the set's effect);

plus the set zeroed with the super activation written back (the paper's Table 1 restoration) and a
random control of as many weights of the same matrices. Each candidate gets a *role* (`role_rule`):

  super   zeroing it alone raises perplexity >= SUPER_FACTOR (2x): a super weight by itself;
  joint   not super alone, but zeroing the whole set raises perplexity >= SUPER_FACTOR, this
          weight carries at least MEMBER_SHARE (10 %) of that effect (its Shapley value; where the
          set is too large to enumerate, its leave-one-out effect), and zeroing it last, once every
          other candidate is zeroed, still raises perplexity: a super weight that works only
          together with others (post-norm models build one super activation in several layers,
          each through one weight). A weight whose removal *lowers* the damage of the others (it
          counteracts them) is not a member, whatever it does on average;
  inert   otherwise: it does nothing measurable alone or within the set.

*Super weights* are the candidates labelled super or joint. A model whose own perplexity on the
text is already beyond BROKEN_PERPLEXITY (no working language model reads plain prose that badly),
or a folder written by `sw ablate`, is reported as broken and not labelled: there is nothing left
to remove.

Verification also runs the detection on a few more prompts (VERIFY_PROMPTS) and says which
candidates appear or disappear there: the paper finds the super activation independent of the
prompt.
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
from ..model.context import model_max_length

SUPER_FACTOR = 2.0  # perplexity ratio that counts as breaking the model
MEMBER_SHARE = 0.10  # part of the set's log-perplexity effect a joint super weight carries at least
MAX_EXACT = 8  # largest set whose Shapley values are computed exactly (2^8 = 256 forward passes)
DEFAULT_EXACT = 5  # `--attribution auto` enumerates sets up to this size (32 passes, ~35 s for SmolLM2 on a CPU)
ATTRIBUTIONS = ("auto", "shapley", "leave-one-out")
BROKEN_PERPLEXITY = 1000.0  # working models read plain English prose far below this; SmolLM2-135M: ~26
ROLES = ("super", "joint", "inert")
VERIFY_TEXT_NAME = "verify_text.txt"
SHIPPED_TEXT = "the project's verification text (configs/verify_text.txt)"
GIVEN_TEXT = "the text given to verify()"
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
    label: str = "inert"  # its role (ROLES)
    leave_one_out: float | None = None  # perplexity with every other candidate zeroed (this one kept)
    shapley: float | None = None  # its Shapley value of log-perplexity over the set (None: not enumerated)


@dataclass
class PromptCheck:
    prompt: str
    coordinates: list[tuple]
    same: bool  # the same coordinates as the detection being verified

    def difference(self, found: Sequence[tuple]) -> str:
        """Which candidates this prompt adds or loses, against the detection being verified."""
        gained = [list(k[:3]) for k in self.coordinates if k not in set(found)]
        lost = [list(k[:3]) for k in found if k not in set(self.coordinates)]
        parts = ([f"also finds {', '.join(map(str, gained))}"] if gained else []) + \
                ([f"does not find {', '.join(map(str, lost))}"] if lost else [])
        return "; ".join(parts) or "the same candidates"


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
    attribution: str = "leave-one-out"  # "shapley" where the set was enumerated
    broken: str | None = None  # why the model is already broken (then nothing is labelled)
    prompts: list[PromptCheck] = field(default_factory=list)
    seconds: float = 0.0

    def labels(self) -> dict[tuple, str]:
        return {} if self.broken else {e.weight.key: e.label for e in self.effects}

    @property
    def set_effect(self) -> float | None:
        """v(S): the log-perplexity effect of zeroing every candidate."""
        return None if self.all_zeroed is None else math.log(self.all_zeroed / self.perplexity)

    def to_dict(self) -> dict[str, Any]:
        def weight(e: WeightEffect) -> dict[str, Any]:
            share = (e.shapley / self.set_effect if e.shapley is not None and self.set_effect else None)
            return {**e.weight.to_dict(), "perplexity_alone_zeroed": e.perplexity,
                    "perplexity_others_zeroed": e.leave_one_out, "shapley_log_perplexity": e.shapley,
                    "shapley_share": share, "role": None if self.broken else e.label}

        return {
            "text": self.text_source, "num_tokens": self.num_tokens, "rule": role_rule(),
            "broken": self.broken, "attribution": self.attribution,
            "perplexity": self.perplexity, "all_zeroed": self.all_zeroed, "restored": self.restored,
            "set_log_perplexity": self.set_effect,
            "random_control": self.control,
            "random_control_weights": [w.to_dict() for w in self.control_weights],
            "weights": [weight(e) for e in self.effects],
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
        if self.broken:
            return rows
        rows += [row(f"{e.weight.label()} alone zeroed", e.perplexity) for e in self.effects]
        rows += [row("all candidates zeroed", self.all_zeroed),
                 row("all zeroed, super activation restored", self.restored),
                 row(f"random control ({len(self.control_weights)} weights)", self.control)]
        return rows

    def attribution_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(weight, x alone, x when zeroed last, Shapley share, role) for a table: `zeroed last` is the
        perplexity ratio of zeroing it once every other candidate is zeroed (< 1: it counteracts them)."""
        if self.broken or not self.effects or self.all_zeroed is None:
            return []
        rows = []
        for e in self.effects:
            kept = "" if e.leave_one_out is None else f"{self.all_zeroed / e.leave_one_out:.3g}"
            share = "" if e.shapley is None or not self.set_effect else f"{e.shapley / self.set_effect:+.0%}"
            rows.append((e.weight.label(), f"{e.perplexity / self.perplexity:.3g}", kept, share, e.label))
        return rows


def role_rule() -> str:
    return (f"super: zeroing it alone raises perplexity >= {SUPER_FACTOR:g}x; joint: not super alone, but the "
            f"whole set zeroed raises it >= {SUPER_FACTOR:g}x, this weight carries >= {MEMBER_SHARE:.0%} of that "
            "log-perplexity effect (its Shapley value, or its leave-one-out effect where the set is not "
            "enumerated) and zeroing it last still raises perplexity; inert: otherwise")


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
    return text, (SHIPPED_TEXT if path is None else str(source))


def encode_text(model: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """The text's first tokens: at most MAX_VERIFY_TOKENS, and no more than the model's context
    (a model with learned positions, GPT-2's 1024 or fewer, has no position beyond it)."""
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :min(MAX_VERIFY_TOKENS,
                                                                       model_max_length(model, tokenizer))]
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


def _shapley(n: int, value: dict[frozenset, float]) -> list[float]:
    """Exact Shapley values of the set function `value` (over every subset of range(n))."""
    weights = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    result = []
    for i in range(n):
        total = 0.0
        for subset, v in value.items():
            if i not in subset:
                total += weights[len(subset)] * (value[subset | {i}] - v)
        result.append(total)
    return result


def _subsets_to_measure(n: int, exact: bool) -> list[frozenset]:
    """The subsets whose effect verification needs: all of them, or singletons, leave-one-outs, all."""
    if exact:
        return [frozenset(i for i in range(n) if mask >> i & 1) for mask in range(1, 1 << n)]
    full = frozenset(range(n))
    return sorted({frozenset([i]) for i in range(n)} | {full - {i} for i in range(n)} | {full}, key=len)


def check_attribution(attribution: str, n: int | None = None) -> bool:
    """Whether to enumerate Shapley values for a set of n candidates; bad values are usage errors."""
    if attribution not in ATTRIBUTIONS:
        raise UsageError(f"--attribution {attribution!r}: choose one of {', '.join(ATTRIBUTIONS)}")
    if n is None:
        return attribution == "shapley"
    if attribution == "shapley" and n > MAX_EXACT:
        raise UsageError(f"--attribution shapley enumerates 2^n subsets; {n} candidates is more than {MAX_EXACT}: "
                         "use --attribution leave-one-out")
    return attribution == "shapley" or (attribution == "auto" and n <= DEFAULT_EXACT)


def broken_reason(perplexity: float, recorded: str | None = None) -> str | None:
    """Why a model cannot be verified, or None: an ablation record, or a perplexity no working model has."""
    if recorded:
        return f"the model is already ablated ({recorded}): its super weights are gone, nothing left to verify"
    if not math.isfinite(perplexity) or perplexity > BROKEN_PERPLEXITY:
        return (f"the model is already broken: perplexity {perplexity:.4g} on plain prose (a working model is far "
                f"below {BROKEN_PERPLEXITY:g}); verify the original model instead")
    return None


def attribute(weights: Sequence[SuperWeight], perplexity: dict[frozenset, float], exact: bool) -> list[WeightEffect]:
    """Each weight's effects and role from the perplexities of zeroed subsets (indices into
    `weights`; the empty set is the original model): every subset when `exact`, else the
    singletons, the leave-one-outs and the whole set."""
    base = perplexity[frozenset()]
    full = frozenset(range(len(weights)))
    effects = [WeightEffect(w, perplexity[frozenset([i])],
                            leave_one_out=perplexity[full - {i}] if len(weights) > 1 else base)
               for i, w in enumerate(weights)]
    if not weights:
        return effects
    if exact:
        log_effect = {s: math.log(p / base) for s, p in perplexity.items()}
        for e, value in zip(effects, _shapley(len(weights), log_effect)):
            e.shapley = value
    _label(effects, base, perplexity[full])
    return effects


def _label(effects: list[WeightEffect], base: float, all_zeroed: float) -> None:
    set_effect = math.log(all_zeroed / base)
    for e in effects:
        if e.perplexity >= SUPER_FACTOR * base:
            e.label = "super"
            continue
        added_last = math.log(all_zeroed / e.leave_one_out)
        carried = e.shapley if e.shapley is not None else added_last
        set_breaks = all_zeroed >= SUPER_FACTOR * base
        e.label = "joint" if set_breaks and added_last > 0 and carried >= MEMBER_SHARE * set_effect else "inert"


def verify(
    model: nn.Module,
    tokenizer,
    weights: Sequence[SuperWeight],
    *,
    text: str | None = None,
    text_source: str | None = None,
    prompts: Sequence[str] = VERIFY_PROMPTS,
    rule: SpikeRule | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    attribution: str = "auto",
    chat_template: bool = False,
    recorded_ablation: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Verification:
    """Measure each candidate's effect and role (module docstring). The model is left as given."""
    progress = progress or (lambda message: None)
    started = time.perf_counter()
    weights = list(weights)
    exact = check_attribution(attribution, len(weights))
    if text is None:
        text, text_source = read_verify_text()
    elif text_source is None:  # not the shipped text: the report must not say it was
        text_source = GIVEN_TEXT
    input_ids = encode_text(model, tokenizer, text)

    progress("verifying: perplexity of the original")
    base = text_perplexity(model, input_ids)
    result = Verification(text_source, int(input_ids.shape[-1]), base, [], None, None, None,
                          attribution="shapley" if exact else "leave-one-out",
                          broken=broken_reason(base, recorded_ablation))
    if result.broken:
        result.effects = [WeightEffect(w, float("nan")) for w in weights]
        result.seconds = time.perf_counter() - started
        return result
    perplexity: dict[frozenset, float] = {frozenset(): base}
    subsets = _subsets_to_measure(len(weights), exact) if weights else []
    for done, subset in enumerate(subsets):
        progress(f"verifying: candidate sets zeroed ({done + 1}/{len(subsets)})")
        with ablated(model, [weights[i] for i in sorted(subset)]):
            perplexity[subset] = text_perplexity(model, input_ids)
    result.effects = attribute(weights, perplexity, exact)
    if weights:
        result.all_zeroed = perplexity[frozenset(range(len(weights)))]
        progress("verifying: all zeroed with the super activation restored; random control")
        if not adapter_for(model).experts:  # restoration is dense-only (edit/restore.py)
            with ablated(model, weights) as record, restored_activation(model, record):
                result.restored = text_perplexity(model, input_ids)
        result.control_weights = random_control(model, weights, seed)
        with ablated(model, result.control_weights):
            result.control = text_perplexity(model, input_ids)
    found = sorted(w.key for w in weights)
    for prompt in prompts:
        progress(f"verifying: detection on {prompt[:30]!r}")
        ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, max_length=model_max_length(model, tokenizer))
        other = detect(model, ids, iterations=iterations, rule=rule, prompt=prompt)
        keys = sorted(w.key for w in other.super_weights)
        result.prompts.append(PromptCheck(prompt, keys, keys == found))
    result.seconds = time.perf_counter() - started
    return result


def labelled(weights: Sequence[SuperWeight], verification: Verification) -> list[SuperWeight]:
    """The weights with their measured role recorded (for the coordinates file)."""
    if verification.broken:
        return list(weights)
    by_key = {e.weight.key: e for e in verification.effects}
    return [replace(w, role=by_key[w.key].label, perplexity_alone_zeroed=by_key[w.key].perplexity,
                    shapley_share=(by_key[w.key].shapley / verification.set_effect
                                   if by_key[w.key].shapley is not None and verification.set_effect else None))
            if w.key in by_key else w for w in weights]
