"""The rules the schema states once for validation and the models: MoR's
layer fit and sharing map, the capacities, MoD's routed layers and tokens,
the attention pattern's per-layer kind, the funnel's deepest stride."""

import pytest

from efficient_lm.config import (
  AttentionConfig,
  ConfigError,
  FunnelConfig,
  RoutingConfig,
)


def _mor(sharing, n):
  return RoutingConfig(kind="mor", sharing=sharing, num_recursions=n)


@pytest.mark.parametrize(
  "sharing,layers,n,want",
  [
    ("cycle", 4, 2, (0, 1, 0, 1)),
    ("sequence", 4, 2, (0, 0, 1, 1)),
    ("middle_cycle", 6, 2, (0, 1, 2, 1, 2, 3)),
    ("middle_sequence", 6, 2, (0, 1, 1, 2, 2, 3)),
    ("cycle", 6, 3, (0, 1, 0, 1, 0, 1)),
    ("middle_sequence", 8, 3, (0, 1, 1, 1, 2, 2, 2, 3)),
    ("cycle", 3, 1, (0, 1, 2)),
  ],
)
def test_layer_map_by_hand(sharing, layers, n, want):
  r = _mor(sharing, n)
  assert r.fits(layers)
  assert r.layer_map(layers) == want
  ends = 2 if sharing.startswith("middle_") else 0
  assert r.unique_ends == bool(ends)
  assert r.recursed_layers(layers) == layers - ends
  assert r.recursion_depth(layers) == (layers - ends) // n
  assert len(set(want)) == ends + r.recursion_depth(layers)


@pytest.mark.parametrize(
  "sharing,layers,n",
  [
    ("cycle", 3, 2),  # not a multiple
    ("cycle", 1, 2),  # fewer layers than recursions
    ("middle_cycle", 5, 2),  # 3 middle layers
    ("middle_cycle", 2, 1),  # no middle layer
    ("sequence", 4, 0),  # no recursion
  ],
)
def test_layers_that_do_not_fit(sharing, layers, n):
  r = _mor(sharing, n)
  assert not r.fits(layers)
  for call in (r.check_fit, r.recursion_depth, r.layer_map):
    with pytest.raises(ConfigError, match=f"num_layers={layers} does not fit"):
      call(layers)


def test_capacities_default_and_explicit():
  assert _mor("cycle", 3).resolved_capacities == (1.0, 2 / 3, 1 / 3)
  assert _mor("cycle", 1).resolved_capacities == (1.0,)
  r = RoutingConfig(kind="mor", num_recursions=2, capacities=(1.0, 0.25))
  assert r.resolved_capacities == (1.0, 0.25)


def test_mod_routed_layers_and_tokens():
  mod = RoutingConfig(kind="mod", every=2, capacity=0.29)
  assert [mod.routes_layer(i) for i in range(4)] == [False, True] * 2
  every_one = RoutingConfig(kind="mod", every=1)
  assert all(every_one.routes_layer(i) for i in range(3))
  assert not any(RoutingConfig(every=1).routes_layer(i) for i in range(3))
  assert mod.mod_tokens(100) == 29  # 0.29 * 100 = 28.999999999999996
  assert mod.mod_tokens(3) == 0
  assert RoutingConfig(capacity=1.0).mod_tokens(7) == 7


def test_layer_kind_cycles_the_pattern():
  a = AttentionConfig(pattern="sliding_window, dense")
  assert [a.layer_kind(i) for i in range(4)] == [
    "sliding_window",
    "dense",
  ] * 2
  assert AttentionConfig(kind="tglobal").layer_kind(5) == "tglobal"


def test_funnel_deepest_stride():
  assert FunnelConfig(stages=(2, 2, 2), factor=2).deepest_stride == 4
  assert FunnelConfig(stages=(4,), factor=3).deepest_stride == 1
