"""The exported feature extractor: same features as the training model."""
import numpy as np
import pytest
from PIL import Image

import fakes
from fedreid_jax import export, train
from fedreid_jax.errors import UserError
from fedreid_jax.evaluation import features as features_lib
from fedreid_jax.federated import rounds


def test_export_round_trip_gives_the_training_models_features(tmp_path):
  cfg = fakes.tiny_config()
  exp = train.Experiment(cfg, fakes.fake_clients())
  exp.train_round(0)
  variables = rounds.global_variables(exp.server)
  export.save(str(tmp_path / "export"), cfg.model, cfg.data.image_size, variables,
              {"algorithm": "fedpav"})
  model = export.load(tmp_path / "export", batch_size=8)
  images = exp.tests[0].gallery_images
  want = np.asarray(features_lib.extract_features(exp.embed_fn, variables, images, 8))
  got = model.features(images)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, img in enumerate(images[:3]):  # at the model's size: no resize, same pixels
    Image.fromarray(img).save(folder / f"{i:02d}.png")
  (folder / "notes.txt").write_text("not an image")
  names, feats = model.embed_folder(folder)
  assert names == ["00.png", "01.png", "02.png"]
  np.testing.assert_allclose(feats, want[:3], atol=1e-5)
  order = export.rank(feats, feats)
  assert order.shape == (3, 3) and list(order[:, 0]) == [0, 1, 2]  # each image finds itself
  assert export.main(["--model", str(tmp_path / "export"), "--query", str(folder),
                      "--gallery", str(folder), "--top", "2"]) == 0
  with pytest.raises(UserError, match="no exported model"):
    export.load(tmp_path)
