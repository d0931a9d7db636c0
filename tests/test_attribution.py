"""Attribution within a set of candidates (measure/verify.py): Shapley values, leave-one-out, roles.

The perplexity of each zeroed subset is planted here as a set function with known structure, so
the exact Shapley values are known in closed form: a super weight alone, two redundant weights
writing one channel (either one carries it), an interacting pair (each harmless alone, harmful
together), a weight whose presence doubles the damage of the others, and a decoy.
"""

import math
from itertools import combinations

import pytest

from superweight.coords import SuperWeight
from superweight.errors import UsageError
from superweight.measure.verify import (MAX_EXACT, _shapley, attribute, broken_reason, check_attribution)

BASE = 20.0


def _weights(n: int) -> list[SuperWeight]:
    return [SuperWeight(1, 7, col) for col in range(n)]


def _perplexities(n: int, log_effect) -> dict[frozenset, float]:
    """Every subset of range(n) -> BASE * exp(log_effect(subset))."""
    return {frozenset(c): BASE * math.exp(log_effect(frozenset(c)))
            for k in range(n + 1) for c in combinations(range(n), k)}


def test_shapley_values_sum_to_the_set_effect_and_match_closed_form():
    # v(T) = 3 [0 in T] + 2 [1 in T and 2 in T]: weight 0 carries 3, the AND-pair 1 each, weight 3 nothing.
    def v(subset):
        return 3.0 * (0 in subset) + 2.0 * ({1, 2} <= subset)

    values = _shapley(4, {s: v(s) for s in _perplexities(4, v)})
    assert values == pytest.approx([3.0, 1.0, 1.0, 0.0])
    assert sum(values) == pytest.approx(v(frozenset(range(4))))


def test_roles_super_redundant_pair_interacting_pair_and_decoy():
    """0: super alone. 1, 2: redundant (either zeroed leaves the channel written by the other; both
    zeroed break the model). 3, 4: an interacting pair (harmless alone, harmful together). 5: decoy."""
    def v(subset):
        return (math.log(50) * (0 in subset) + math.log(30) * ({1, 2} <= subset)
                + math.log(8) * ({3, 4} <= subset))

    effects = attribute(_weights(6), _perplexities(6, v), exact=True)
    roles = [e.label for e in effects]
    assert roles == ["super", "joint", "joint", "joint", "joint", "inert"]
    assert effects[1].perplexity == pytest.approx(BASE)  # nothing alone: the old rule could not tell it from the decoy
    assert effects[5].shapley == pytest.approx(0.0)
    assert effects[1].shapley == pytest.approx(math.log(30) / 2)
    assert sum(e.shapley for e in effects) == pytest.approx(v(frozenset(range(6))))


def test_weight_that_does_nothing_alone_or_in_the_set_is_never_a_member():
    """The case the old 'redundant' label got wrong: a weight whose removal changes nothing in any
    company is inert even when the others together break the model."""
    def v(subset):
        return math.log(9) * ({0, 1} <= subset) + 0.001 * (2 in subset)

    effects = attribute(_weights(3), _perplexities(3, v), exact=True)
    assert [e.label for e in effects] == ["joint", "joint", "inert"]


def test_a_weight_whose_presence_doubles_the_damage_is_not_a_member():
    """Like SmolLM2's [2, 507, 90]: zeroing it together with the others halves the damage (it
    counteracts them), so it carries a negative share of the set's effect."""
    def v(subset):
        damage = math.log(200) * ({0, 1} <= subset)
        return damage - math.log(2) * (2 in subset and damage > 0)

    effects = attribute(_weights(3), _perplexities(3, v), exact=True)
    assert effects[2].shapley < 0
    assert [e.label for e in effects] == ["joint", "joint", "inert"]


def test_positive_on_average_but_counteracting_when_zeroed_last_is_not_a_member():
    """Like SmolLM2's [11, 507, 1487]: zeroed after the super weight it adds damage (a positive
    Shapley share), but zeroed last, with every other candidate gone, it lowers perplexity."""
    def v(subset):
        if {0, 1} <= subset:
            return math.log(500) - (math.log(2) if 2 in subset else 0.0)
        return math.log(3) * (0 in subset) + math.log(50) * ({0, 2} <= subset) + math.log(1.5) * (subset == {2} or subset == {1, 2})

    effects = attribute(_weights(3), _perplexities(3, v), exact=True)
    assert effects[2].shapley > 0.1 * v(frozenset(range(3)))
    assert effects[2].leave_one_out > effects[2].perplexity * 100  # keeping it, the others zeroed: worse
    assert [e.label for e in effects] == ["super", "joint", "inert"]


def test_leave_one_out_roles_without_enumeration():
    def v(subset):
        return math.log(50) * (0 in subset) + math.log(30) * ({1, 2} <= subset)

    everything = _perplexities(4, v)
    full = frozenset(range(4))
    needed = {s: p for s, p in everything.items() if len(s) <= 1 or len(s) >= 3}
    assert full in needed
    effects = attribute(_weights(4), needed, exact=False)
    assert all(e.shapley is None for e in effects)
    assert [e.label for e in effects] == ["super", "joint", "joint", "inert"]
    assert effects[1].leave_one_out == pytest.approx(BASE * 50)  # the others zeroed, 1 kept: 2 still writes


def test_attribution_choice_and_limits():
    assert check_attribution("auto", 5) is True
    assert check_attribution("auto", 6) is False
    assert check_attribution("leave-one-out", 3) is False
    assert check_attribution("shapley", MAX_EXACT) is True
    with pytest.raises(UsageError, match="leave-one-out"):
        check_attribution("shapley", MAX_EXACT + 1)
    with pytest.raises(UsageError, match="choose one of"):
        check_attribution("exact", 3)


def test_broken_model_is_named_not_labelled():
    assert broken_reason(26.4) is None
    assert "already broken" in broken_reason(1.565e5)
    assert "already ablated" in broken_reason(26.4, "[11, 507, 1229] zeroed")
    assert broken_reason(float("nan")) is not None
