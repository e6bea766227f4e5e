"""Secure aggregation (Bonawitz et al., CCS 2017), simulated: the server
learns the sum of the clients' vectors and nothing else.

A simulation of the protocol's arithmetic, not a cryptographic
implementation: the pairwise seeds are derived from the run's seed (no key
agreement, no secret sharing, no authenticated channels), the mask generator
expands each seed with a counter-mode hash (`prg`, not a stream cipher),
and the clients' self-masks (which protect a slow client whose pair seeds
were revealed) are not simulated. What it shows faithfully: the server's sum
receives masked vectors only, the masks cancel exactly modulo 2^k, a client
that drops out after masking is removed from the sum by regenerating its pair
masks from seeds the survivors reveal, and fixed point bounds the error.

With S clients in lanes 0..S-1, each holding a vector x_k `[n]` and a
weight omega_k in [0, 1] (`secure_weighted_sum`):

1. encode: q_k = [round(omega_k clip(x_k, -c, c) 2^f), round(omega_k
   max(c, 1) 2^f)] `[n + 1]` (the weight travels alongside, on the values'
   integer range), k-bit two's-complement integers stored in uint32 modulo
   2^k (f = frac_bits, k = bits <= 32).
2. mask: each pair i < j has a seed s_ij (`pair_key`: fold_in(fold_in(round
   key, i), j)) and a mask r_ij = PRG(s_ij) uniform in [0, 2^k)^(n+1);
   y_i = q_i + sum_{j > i} r_ij - sum_{j < i} r_ji (mod 2^k).
3. `server_sum`: the sum of the delivered y_i modulo 2^k; every pair of
   delivered clients cancels.
4. dropout: a client whose y never arrives (`delivered` False) leaves its
   pair masks with the survivors in the sum; the survivors reveal those pair
   seeds (`revealed_seeds`) and the server regenerates the masks and removes
   them (`recover`).
5. decode: sign-extend from k bits, times 2^-f (the weight: over
   max(c, 1) 2^f) (`decode`).

Error: each client's rounding is at most half a step, 2^-(f+1), exactly so
while |omega clip(x)| 2^f <= 2^24 (float32's integers; `capacity_error`
refuses more), so each coordinate of the decoded sum is within
S 2^-(f+1) of the sum of the clipped values (the weights' sum within
S 2^-(f+1) / max(c, 1)); no wrap-around while S (max(c, 1) 2^f + 1/2) <
2^(k-1) (`capacity_error`). A weighted mean N / D of the two sums (D: the
weights' sum, 1 when the weights were scaled by their total) is then within
`mean_error_bound`, about S 2^-f.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.errors import ConfigError

FLOAT32_INTEGERS = 24  # float32 holds every integer up to 2^24


class Settings(NamedTuple):
  """The fixed point and the modulus: `bits` k (sum modulo 2^k, k <= 32),
  `frac_bits` f (a step of 2^-f), `clip` c (values clipped to [-c, c])."""
  bits: int = 32
  frac_bits: int = 20
  clip: float = 8.0


class Masked(NamedTuple):
  """What a client sends: its encoded vector plus its pair masks, `[S, n]`
  uint32 (one row per client). The server's sum takes nothing else."""
  vectors: jax.Array


class Revealed(NamedTuple):
  """Pair seeds the survivors reveal for the pairs (survivor, dropped client):
  `seeds` `[P, 2]` uint32 key data (zero for pairs not revealed), `sign` `[P]`
  int32: +1 the survivor is the pair's first lane (it added the mask), -1 the
  second (it subtracted it), 0 not revealed."""
  seeds: jax.Array
  sign: jax.Array


def capacity_error(num_clients: int, settings: Settings, prefix: str = "") -> str | None:
  """Why `num_clients` vectors cannot be summed under `settings` (one line),
  or None: the sum could wrap around modulo 2^bits, or one client's encoded
  value leaves float32's exact integers. `prefix`: of the fields named
  (`stats_`: `stats_clip`, `stats_frac_bits`)."""
  k, f, c = settings.bits, settings.frac_bits, float(settings.clip)
  largest = num_clients * (max(c, 1.0) * 2.0 ** f + 0.5)
  if largest >= 2.0 ** (k - 1):
    need = int(np.floor(np.log2(largest))) + 2
    return (f"config.secagg.bits={k} is too few for {num_clients} clients with "
            f"{prefix}clip={c:g} and {prefix}frac_bits={f}: their sum can reach {largest:.3g} "
            f">= 2^{k - 1} and wrap around; raise bits to >= {need} (at most 32) or lower "
            f"{prefix}frac_bits or {prefix}clip")
  if max(c, 1.0) * 2.0 ** f > 2.0 ** FLOAT32_INTEGERS:
    return (f"config.secagg.{prefix}frac_bits={f} with {prefix}clip={c:g} encodes values "
            f"beyond float32's exact integers (2^{FLOAT32_INTEGERS}); keep "
            f"max({prefix}clip, 1) * 2^{prefix}frac_bits <= 2^{FLOAT32_INTEGERS}")
  return None


def check_capacity(num_clients: int, settings: Settings, prefix: str = "") -> None:
  """ConfigError (one line) when `capacity_error` says why."""
  problem = capacity_error(num_clients, settings, prefix)
  if problem is not None:
    raise ConfigError(problem)


def weight_scale(settings: Settings) -> float:
  """The weight's fixed-point scale, max(c, 1) 2^f: the values' integer range,
  so a weight in [0, 1] has steps of 2^-f / max(c, 1)."""
  return max(float(settings.clip), 1.0) * 2.0 ** settings.frac_bits


def sum_error_bound(num_clients: int, settings: Settings) -> float:
  """Largest error of one coordinate of a decoded sum of `num_clients`
  clipped, weighted values: S 2^-(f+1) (the weights' sum: S / (2 scale))."""
  return num_clients * 2.0 ** -(settings.frac_bits + 1)


def mean_error_bound(num_clients: int, settings: Settings, weight_sum: float = 1.0) -> float:
  """Largest error of one coordinate of the mean N / D of clipped values
  (|x| <= c) with weights summing to B = `weight_sum`: with e_N the sum
  bound and e_D = S / (2 scale) the weight sum's,
  |N/D - A/B| <= (e_N + c e_D) / (B - e_D) <= 2 e_N / (B - e_D)."""
  e_n = sum_error_bound(num_clients, settings)
  e_d = num_clients / (2.0 * weight_scale(settings))
  return (e_n + float(settings.clip) * e_d) / (weight_sum - e_d)


def modulus_mask(bits: int) -> jax.Array:
  """2^bits - 1 as uint32: `x & modulus_mask(k)` is x modulo 2^k."""
  return jnp.uint32((1 << bits) - 1)


def encode(values: jax.Array, omega: jax.Array, settings: Settings) -> jax.Array:
  """Each client's fixed-point vector. values `[S, n]` f32, omega `[S]` in
  [0, 1] -> `[S, n + 1]` uint32: round(omega clip(x) 2^f), then
  round(omega `weight_scale`), mod 2^k."""
  clipped = jnp.clip(values.astype(jnp.float32), -settings.clip, settings.clip)
  q = jnp.concatenate([jnp.round(omega[:, None] * clipped * np.float32(2.0 ** settings.frac_bits)),
                       jnp.round(omega[:, None] * np.float32(weight_scale(settings)))], axis=1)
  return jax.lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32) & modulus_mask(
      settings.bits)


def decode(total: jax.Array, settings: Settings) -> jax.Array:
  """A k-bit two's-complement sum `[n + 1]` uint32 -> f32: the values times
  2^-f, the weights' sum (last) over `weight_scale`."""
  shift = 32 - settings.bits
  signed = (jax.lax.bitcast_convert_type(total << shift, jnp.int32) >> shift).astype(jnp.float32)
  return jnp.concatenate([signed[:-1] * np.float32(2.0 ** -settings.frac_bits),
                          signed[-1:] / np.float32(weight_scale(settings))])


def pairs(num_clients: int) -> tuple[np.ndarray, np.ndarray]:
  """Every lane pair i < j, as two `[P]` int32 arrays (P = S (S - 1) / 2)."""
  i, j = np.triu_indices(num_clients, k=1)
  return i.astype(np.int32), j.astype(np.int32)


def pair_key(round_key: jax.Array, i, j) -> jax.Array:
  """The seed s_ij of lanes i < j in a round: the two uint32 words `[2]` of
  fold_in(fold_in(round_key, i), j)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(round_key, i), j))


def mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def prg(seed: jax.Array, n: int, bits: int) -> jax.Array:
  """The pair mask of `seed` (`[2]` uint32): `[n]` uint32 uniform modulo
  2^bits, in counter mode: mix32(mix32(t ^ seed[0]) + seed[1]) for t = 0..n-1.
  Statistically uniform, not a cryptographic stream (a deployment would use
  AES-CTR or ChaCha20); 20x faster than jax.random.bits (threefry) on CPU."""
  counter = jnp.arange(n, dtype=jnp.uint32)
  return mix32(mix32(counter ^ seed[0]) + seed[1]) & modulus_mask(bits)


def client_masks(round_key: jax.Array, num_clients: int, n: int, bits: int) -> jax.Array:
  """Each client's total mask `[S, n]`: sum_{j>i} r_ij - sum_{j<i} r_ji mod 2^k
  (what the clients compute from their own pair seeds; one PRG call per pair)."""
  first, second = (jnp.asarray(a) for a in pairs(num_clients))

  def add_pair(p, masks):
    r = prg(pair_key(round_key, first[p], second[p]), n, bits)
    masks = masks.at[first[p]].add(r)
    return masks.at[second[p]].add(jnp.uint32(0) - r)

  masks = jnp.zeros((num_clients, n), jnp.uint32)
  return jax.lax.fori_loop(0, first.shape[0], add_pair, masks) & modulus_mask(bits)


def mask(encoded: jax.Array, masks: jax.Array, bits: int) -> Masked:
  """Clients: y_i = q_i + m_i mod 2^k. `[S, n]` x2 -> `Masked`."""
  return Masked((encoded + masks) & modulus_mask(bits))


def server_sum(masked: Masked, delivered: jax.Array, bits: int) -> jax.Array:
  """The server: the sum of the delivered masked vectors modulo 2^k.
  `Masked` `[S, n]`, delivered `[S]` bool -> `[n]` uint32."""
  if not isinstance(masked, Masked):
    raise TypeError(f"server_sum takes Masked vectors, not {type(masked).__name__}")
  rows = jnp.where(delivered[:, None], masked.vectors, jnp.uint32(0))
  return jnp.sum(rows, axis=0, dtype=jnp.uint32) & modulus_mask(bits)


def revealed_seeds(round_key: jax.Array, delivered: jax.Array) -> Revealed:
  """The survivors' answer to the server: for every pair of one delivered and
  one dropped client, the pair's seed (what the protocol's secret shares
  reconstruct). delivered `[S]` bool -> `Revealed` over the `[P]` pairs."""
  first, second = (jnp.asarray(a) for a in pairs(delivered.shape[0]))
  sign = (delivered[first] & ~delivered[second]).astype(jnp.int32) - (
      delivered[second] & ~delivered[first]).astype(jnp.int32)
  seeds = jax.vmap(lambda i, j: pair_key(round_key, i, j))(first, second)
  return Revealed(jnp.where(sign[:, None] != 0, seeds, jnp.uint32(0)), sign)


def recover(total: jax.Array, revealed: Revealed, bits: int) -> jax.Array:
  """The server removes the dropped clients' pair masks from `total` `[n]`:
  each revealed seed's mask regenerated and taken back out (the survivor
  added it: subtract; it subtracted it: add). Only revealed pairs run."""
  n = total.shape[0]

  def one(p, acc):
    def remove(acc):
      r = prg(revealed.seeds[p], n, bits)
      return jnp.where(revealed.sign[p] > 0, acc - r, acc + r)
    return jax.lax.cond(revealed.sign[p] != 0, remove, lambda a: a, acc)

  return jax.lax.fori_loop(0, revealed.sign.shape[0], one, total) & modulus_mask(bits)


def secure_weighted_sum(values: jax.Array, omega: jax.Array, delivered: jax.Array,
                        round_key: jax.Array, settings: Settings) -> tuple[jax.Array, jax.Array]:
  """The protocol end to end: (sum over delivered clients of omega_k clip(x_k)
  `[n]`, sum of their omega_k) as the server decodes them. values `[S, n]`,
  omega `[S]` in [0, 1], delivered `[S]` bool. ConfigError (at trace time)
  when S clients overflow `settings`."""
  num_clients, n = values.shape
  check_capacity(num_clients, settings)
  encoded = encode(values, omega, settings)  # each client, its own vector
  masked = mask(encoded, client_masks(round_key, num_clients, n + 1, settings.bits),
                settings.bits)
  total = server_sum(masked, delivered, settings.bits)
  total = recover(total, revealed_seeds(round_key, delivered), settings.bits)
  decoded = decode(total, settings)
  return decoded[:n], decoded[n]


def scaled_weights(weights: jax.Array) -> jax.Array:
  """`[S]` weights >= 0 -> omega in [0, 1]: divided by their total (the
  denominator the server learns anyway; all zero stays zero)."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def secure_weighted_mean(values: jax.Array, weights: jax.Array, round_key: jax.Array,
                         settings: Settings) -> jax.Array:
  """sum_k w_k x_k / sum_k w_k over the clients with w_k > 0 (the others
  dropped out after masking), from two secure sums. `[S, n]`, `[S]` -> `[n]`."""
  numerator, denominator = secure_weighted_sum(values, scaled_weights(weights), weights > 0,
                                               round_key, settings)
  return numerator / denominator
