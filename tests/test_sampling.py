"""Client sampling: seeded, sorted, sized as configured; the reference's first client."""
import numpy as np
import pytest

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import sampling


def test_num_selected_rules():
  assert sampling.num_selected(0, 9) == 9  # 0: all
  assert sampling.num_selected(0.5, 9) == 4  # fraction, rounded: round(4.5) -> 4
  assert sampling.num_selected(0.01, 9) == 1  # at least one
  assert sampling.num_selected(3, 9) == 3  # a count
  with pytest.raises(ConfigError, match="exceeds the 9 clients"):
    sampling.num_selected(10, 9)


def test_sampling_is_seeded_sorted_and_varies_by_round():
  draws = [sampling.sample_clients(seed=0, round_index=r, num_clients=9, count=3)
           for r in range(20)]
  for d in draws:
    assert len(d) == 3 and len(set(d)) == 3 and list(d) == sorted(d)
    assert all(0 <= c < 9 for c in d)
  np.testing.assert_array_equal(draws[4], sampling.sample_clients(0, 4, 9, 3))
  assert len({tuple(d) for d in draws}) > 10  # rounds draw different subsets
  assert any(not np.array_equal(sampling.sample_clients(1, r, 9, 3), draws[r]) for r in range(5))
  counts = np.bincount(np.concatenate([sampling.sample_clients(0, r, 9, 3) for r in range(900)]),
                       minlength=9)
  assert counts.min() > 200 and counts.max() < 400  # ~300 each: uniform
  np.testing.assert_array_equal(sampling.sample_clients(0, 0, 9, 9), np.arange(9))


def test_first_client_is_a_seeded_lane():
  lanes = [sampling.first_client(0, r, 4) for r in range(40)]
  assert set(lanes) == {0, 1, 2, 3}
  assert lanes == [sampling.first_client(0, r, 4) for r in range(40)]
