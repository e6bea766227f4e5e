"""The input pipeline: datasets (`fedreid_jax.data`) -> fixed-shape uint8 batches.

- `plan`: the one seeded batch order (`batch_plan`, `client_plan`).
- `reader`: the one way to read model-size images (`read_resized`,
  `load_images`), shared by training, evaluation and the grain loader.
- `grain_loader`: parallel decode + resize + prefetch of a plan's batches.
- `train_input`: `TrainInput`, each client's batch stream for a round, from
  host memory or streamed, identical either way.

Augmentation and normalisation run on the device (`fedreid_jax.models.preprocess`).
"""
