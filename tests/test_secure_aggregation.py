"""Secure aggregation's arithmetic, checked against plain numpy written here:
fixed point, pairwise masks that cancel, dropout recovery, the error bound."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import secure_aggregation as sa


def np_encode(values, omega, s: sa.Settings):
  """Independent fixed point: round([omega clip(x), omega] 2^f) mod 2^k, as integers."""
  clipped = np.clip(values.astype(np.float32), -s.clip, s.clip)
  omega = omega[:, None].astype(np.float32)
  weighted = (omega * clipped).astype(np.float64) * 2.0 ** s.frac_bits
  weight = omega.astype(np.float64) * max(s.clip, 1.0) * 2.0 ** s.frac_bits
  q = np.round(np.concatenate([weighted, weight], axis=1)).astype(np.int64)
  return np.mod(q, 2 ** s.bits)


def np_decode(total, s: sa.Settings):
  total = np.asarray(total, np.int64)
  signed = np.where(total >= 2 ** (s.bits - 1), total - 2 ** s.bits, total)
  return np.concatenate([signed[:-1] * 2.0 ** -s.frac_bits,
                         signed[-1:] * 2.0 ** -s.frac_bits / max(s.clip, 1.0)])


def data(num_clients=5, n=300, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  values = (rng.normal(size=(num_clients, n)) * scale).astype(np.float32)
  weights = rng.uniform(0.5, 3.0, size=num_clients).astype(np.float32)
  return values, weights


def np_prg(seed, n, bits):
  """The counter-mode mask generator, in numpy's wrapping uint32 arithmetic."""
  def mix(h):
    h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))
  seed = np.asarray(seed, np.uint32)
  with np.errstate(over="ignore"):
    out = mix(mix(np.arange(n, dtype=np.uint32) ^ seed[0]) + seed[1])
  return (out & np.uint32((1 << bits) - 1)).astype(np.int64)


def test_mask_generator_matches_numpy_and_looks_uniform():
  seed = sa.pair_key(jax.random.key(11), 2, 5)
  for bits in (32, 20):
    r = np.asarray(sa.prg(seed, 100_000, bits), np.int64)
    np.testing.assert_array_equal(r, np_prg(seed, 100_000, bits))
    ones = (r[:, None] >> np.arange(bits)) & 1  # every bit set half of the time
    assert np.all(np.abs(ones.mean(0) - 0.5) < 0.01) and r.max() < 2 ** bits
  other = np.asarray(sa.prg(sa.pair_key(jax.random.key(11), 2, 6), 100_000, 32), np.int64)
  assert np.mean(other == np_prg(seed, 100_000, 32)) < 1e-3  # another pair, another mask


SETTINGS = (sa.Settings(), sa.Settings(bits=26, frac_bits=16, clip=2.0),
            sa.Settings(bits=20, frac_bits=10, clip=1.0))


@pytest.mark.parametrize("s", SETTINGS)
def test_masks_cancel_exactly_and_hide_the_encodings(s):
  values, weights = data()
  omega = np.asarray(sa.scaled_weights(jnp.asarray(weights)))
  key = jax.random.key(7)
  encoded = np.asarray(sa.encode(jnp.asarray(values), jnp.asarray(omega), s), np.int64)
  np.testing.assert_array_equal(encoded, np_encode(values, omega, s))
  n = encoded.shape[1]
  masks = np.asarray(sa.client_masks(key, 5, n, s.bits), np.int64)
  # the masks rebuilt in numpy from each pair's PRG output: + for the first lane, - the second
  expected = np.zeros_like(masks)
  for i, j in zip(*sa.pairs(5)):
    r = np.asarray(sa.prg(sa.pair_key(key, i, j), n, s.bits), np.int64)
    expected[i] += r
    expected[j] -= r
  np.testing.assert_array_equal(masks, np.mod(expected, 2 ** s.bits))
  assert np.all(np.mod(masks.sum(0), 2 ** s.bits) == 0)  # they cancel over all clients
  masked = sa.mask(jnp.asarray(encoded, jnp.uint32), jnp.asarray(masks, jnp.uint32), s.bits)
  assert np.mean(np.asarray(masked.vectors, np.int64) == encoded) < 0.01
  total = sa.server_sum(masked, jnp.ones(5, bool), s.bits)
  np.testing.assert_array_equal(np.asarray(total, np.int64),
                                np.mod(np_encode(values, omega, s).sum(0), 2 ** s.bits))


@pytest.mark.parametrize("delivered", ([1, 0, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]))
def test_dropout_recovery_removes_the_dropped_clients_masks(delivered):
  s = sa.Settings(bits=26, frac_bits=16, clip=2.0)
  values, weights = data(seed=1)
  delivered = np.array(delivered, bool)
  omega = np.asarray(sa.scaled_weights(jnp.asarray(weights * delivered)))
  key = jax.random.key(3)
  encoded = sa.encode(jnp.asarray(values), jnp.asarray(omega), s)
  masked = sa.mask(encoded, sa.client_masks(key, 5, encoded.shape[1], s.bits), s.bits)
  total = sa.server_sum(masked, jnp.asarray(delivered), s.bits)
  revealed = sa.revealed_seeds(key, jnp.asarray(delivered))
  expected = np.mod(np_encode(values, omega, s)[delivered].sum(0), 2 ** s.bits)
  np.testing.assert_array_equal(np.asarray(sa.recover(total, revealed, s.bits), np.int64),
                                expected)
  # revealed: exactly the pairs of one survivor and one dropped client
  first, second = sa.pairs(5)
  crossing = delivered[first] != delivered[second]
  np.testing.assert_array_equal(np.asarray(revealed.sign) != 0, crossing)
  assert not np.asarray(revealed.seeds)[~crossing].any()
  if crossing.any():  # without recovery the sum is garbage
    assert np.mean(np.asarray(total, np.int64) == expected) < 0.01


@pytest.mark.parametrize("s", SETTINGS)
def test_quantisation_error_within_its_bound(s):
  values, weights = data(num_clients=6, n=2000, seed=2, scale=0.7 * s.clip)
  values[0, :5] = [3 * s.clip, -3 * s.clip, s.clip, -s.clip, 0.0]  # clipped, not wrapped
  weights[2] = 0.0  # dropped
  got_num, got_den = sa.secure_weighted_sum(
      jnp.asarray(values), sa.scaled_weights(jnp.asarray(weights)), jnp.asarray(weights > 0),
      jax.random.key(0), s)
  omega = weights.astype(np.float64) / weights.sum()
  ideal = (omega[:, None] * np.clip(values.astype(np.float64), -s.clip, s.clip)).sum(0)
  bound = sa.sum_error_bound(6, s)
  assert np.max(np.abs(np.asarray(got_num, np.float64) - ideal)) <= bound * (1 + 1e-6)
  assert abs(float(got_den) - 1.0) <= bound / max(s.clip, 1.0)
  # the decoded sum is exactly numpy's decode of numpy's integer sum
  live = weights > 0
  omega32 = np.asarray(sa.scaled_weights(jnp.asarray(weights)))  # the clients' float32 weights
  q = np.mod(np_encode(values, omega32, s)[live].sum(0), 2 ** s.bits)
  np.testing.assert_allclose(np.asarray(got_num), np_decode(q, s)[:-1], rtol=2 ** -23)
  assert float(got_den) == pytest.approx(np_decode(q, s)[-1], rel=2 ** -23)
  mean = sa.secure_weighted_mean(jnp.asarray(values), jnp.asarray(weights), jax.random.key(0), s)
  ideal_mean = ideal / omega[live].sum()
  err = np.max(np.abs(np.asarray(mean, np.float64) - ideal_mean))
  assert err <= sa.mean_error_bound(6, s) + 2 ** -22 * s.clip  # + float32's own rounding
  assert sa.mean_error_bound(6, s) <= 1.01 * 6 * 2.0 ** -s.frac_bits


def test_negative_and_wrapping_sums_decode():
  s = sa.Settings(bits=12, frac_bits=4, clip=1.0)  # 4 clients: |sum| <= 4 * 16.5 < 2^11
  values = np.array([[-1.0, 1.0, 0.5, -0.25]] * 4, np.float32)
  num, den = sa.secure_weighted_sum(jnp.asarray(values), jnp.ones(4), jnp.ones(4, bool),
                                    jax.random.key(1), s)
  np.testing.assert_allclose(np.asarray(num), [-4.0, 4.0, 2.0, -1.0])
  assert float(den) == 4.0


def test_capacity_refusals_are_one_line():
  assert sa.capacity_error(9, sa.Settings()) is None
  message = sa.capacity_error(9, sa.Settings(bits=24, frac_bits=20, clip=8.0))
  assert "config.secagg.bits=24 is too few for 9 clients" in message and "\n" not in message
  assert "raise bits to >= 28" in message
  with pytest.raises(ConfigError, match="too few for 300 clients"):
    sa.check_capacity(300, sa.Settings())
  assert "float32" in sa.capacity_error(2, sa.Settings(bits=32, frac_bits=25, clip=1.0))
  with pytest.raises(ConfigError, match="too few"):  # at trace time too
    sa.secure_weighted_sum(jnp.zeros((5, 3)), jnp.ones(5), jnp.ones(5, bool),
                           jax.random.key(0), sa.Settings(bits=8, frac_bits=6, clip=1.0))
