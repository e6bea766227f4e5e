"""Every dataset the engine can train on, as `ClientData` / `ReIDSplit` records.

Modules (imported on demand; TFDS is heavy):
- `base` (ClientData, ReIDSplit), `naming` (ids from file names), `images`
  (decode + bicubic resize: the one implementation), `market_folder`
  (Market-1501-style folders), `scenarios` (by dataset / camera / identity),
  `registry` (benchmarks by name: `load(config.data, seed)`);
- the synthetic benchmark: `synthetic` (generator, on-disk cache) and
  `synthetic_render` (the renderer);
- the real datasets: `specs` (names, reference counts), `layouts` /
  `small_layouts` (finding and listing a download), `splits` (our seeded
  split for the small sets), `builders` (TFDS array_record builders),
  `prepare` (+ `python -m fedreid_jax.data prepare`), `source`
  (`load_prepared_client`, `load_public`).

Batches are made from these by `fedreid_jax.input`.
"""
