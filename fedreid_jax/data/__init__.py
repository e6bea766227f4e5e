"""The real re-ID datasets: layouts on disk, our split, TFDS builders, loading.

Modules (imported on demand; TFDS and grain are heavy): `specs` (names and
reference counts), `layouts` / `small_layouts` (finding and listing a dataset),
`splits` (our split for the small sets), `builders` (TFDS array_record
builders), `prepare` (+ `python -m fedreid_jax.data prepare`), `source`
(`load_prepared_client`, `load_public`), `grain_loader` (input pipeline),
`fixtures` (tiny fake trees for tests and benchmarks).
"""
