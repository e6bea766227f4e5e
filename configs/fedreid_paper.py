"""FedPav in the paper's setting (ACM MM 2020, "Performance Optimization for
Federated Person Re-identification via Benchmark Analysis").

  python -m fedreid_jax.data prepare --dataset all --manual_dir <downloads> --data_dir data/tfds
  python -m fedreid_jax.models.convert_weights --input resnet50-0676ba61.pth \
      --output weights/resnet50_torchvision.npz
  python -m fedreid_jax.main --config configs/fedreid_paper.py --workdir runs/paper

Needs the nine real datasets prepared (see docs/data.md, "Real datasets") and
torchvision's ImageNet ResNet-50 weights converted (docs/data.md, "Pretrained
backbones"; https://download.pytorch.org/models/resnet50-0676ba61.pth). 300
rounds of ~2,400 local steps of 32 images at 256x128 on a ResNet-50: on the
order of a day on one H100 (benchmarks/RESULTS.md has measured step times);
not meant for a CPU.
"""
import pathlib

from fedreid_jax.config_lib import load_config_file


def get_config():
  c = load_config_file(str(pathlib.Path(__file__).with_name("synthetic.py")))
  c.data.name = "fedreid"
  c.data.root = "data/tfds"
  c.data.image_size = (256, 128)
  c.data.clients = ()  # empty: the paper's nine datasets, MSMT17 ... iLIDS
  c.data.in_memory = False  # decoded lazily, streamed chunk by chunk

  c.model.backbone = "resnet50"
  c.model.width = 64
  c.model.last_stride = 2
  c.model.small_stem = False
  c.model.conv_impl = "auto"  # XLA's conv on GPU/TPU; im2col + matmul for tiny maps on CPU
  # torchvision's ImageNet ResNet-50 (IMAGENET1K_V1), converted once by the command in
  # the docstring; '' trains from scratch (far below the paper's numbers).
  c.model.pretrained = "weights/resnet50_torchvision.npz"
  c.model.bn_unbiased_variance = True  # PyTorch's BatchNorm running variance (the paper's code)

  c.train.batch_size = 32
  c.train.lr_backbone = 0.005
  c.train.lr_head = 0.05
  c.train.pad = 10

  c.fed.rounds = 300
  c.fed.strategy = "serial"  # 9x vmap on an H200 (benchmarks/RESULTS.md)
  c.fed.chunk_steps = 16

  c.eval.every_rounds = 10
  c.eval.protocol = "fedreid"
  c.eval.client_models = True
  c.baselines = ()  # the local baseline doubles the cost: add ("local",) to run it
  c.checkpoint_every = 10
  return c
