"""bench/scenarios.py: the order in which the sides take their turns."""

from __future__ import annotations

from bench.scenarios import rounds_order


def test_two_sides_swap_every_round() -> None:
    order = list(rounds_order(4, ("direct", "popproxy")))
    assert order == ["direct", "popproxy", "popproxy", "direct"] * 2


def test_with_peers_each_side_takes_each_place_once_in_as_many_rounds() -> None:
    sides = ("direct", "popproxy", "nginx", "perdition")
    order = list(rounds_order(4, sides))
    rounds = [order[i : i + 4] for i in range(0, 16, 4)]
    assert all(sorted(r) == sorted(sides) for r in rounds)
    for place in range(4):
        assert sorted(r[place] for r in rounds) == sorted(sides)
