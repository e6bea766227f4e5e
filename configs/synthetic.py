"""FedPav on the embedded synthetic federated re-ID benchmark (the default).

  python -m fedreid_jax.main --config configs/synthetic.py --workdir runs/demo

About 1.5 minutes on a 2-core CPU from a fresh clone (data generation and
compilation included; under a minute with a warm compilation cache).
Nine synthetic domains mirroring the nine real datasets' relative sizes and
camera counts, 64x32 images, a narrow ResNet; FedPav then the local-training
baseline, compared in one table.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # see fedreid_jax.data.registry
  c.data.root = "data"
  c.data.image_size = (64, 32)
  c.data.clients = ()  # empty: every client of the benchmark
  c.data.scenario = "by_dataset"  # by_dataset | by_camera | by_identity (one dataset in clients)
  c.data.scenario_clients = 2  # by_identity: number of clients
  c.data.in_memory = True  # keep decoded training images in host memory
  c.data.loader_threads = 8  # in_memory=False: grain reading threads per client loader
  c.data.loader_workers = 0  # in_memory=False: grain worker processes (more cores: raise)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet_tiny"
  c.model.width = 16
  c.model.last_stride = 2
  c.model.small_stem = False
  c.model.embed_dim = 512
  c.model.dropout = 0.5
  # auto | xla | patches: conv lowering (fedreid_jax/models/conv.py; docs/performance.md "Speed
  # and precision"). auto: XLA's convolutions on GPU/TPU; on CPU im2col + matmul where XLA's
  # CPU convolution is slow, and CPU-friendly gradients. xla: the plain flax model.
  c.model.conv_impl = "auto"
  c.model.dtype = "float32"  # float32 | bfloat16: compute dtype (params, optimizer, BN stats f32)
  # A torchvision ResNet weights file for the backbone (docs/data.md, "Pretrained backbones");
  # "": random initialisation.
  c.model.pretrained = ""
  # True: BatchNorm running variance updated with the unbiased batch variance, as PyTorch
  # does; False: Flax's biased one (this config's figures in the README).
  c.model.bn_unbiased_variance = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.local_epochs = 1
  c.train.lr_backbone = 0.05  # from scratch: the paper's 0.005 assumes ImageNet weights
  c.train.lr_head = 0.05
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.pad = 4  # pad-and-crop pixels (10 at 256x128)
  c.train.flip = True
  # Random erasing probability (the reference's --erasing_p; 0: off, as there by default;
  # 0.5 is the usual re-ID setting). One rectangle of 2-40% of the image set to the mean colour.
  c.train.random_erasing = 0.0

  c.fed = ml_collections.ConfigDict()
  # any registered algorithm (fedreid_jax.federated.registered(); docs/algorithms.md)
  c.fed.algorithm = "fedpav"
  c.fed.rounds = 15
  c.fed.clients_per_round = 0  # 0: all; 0<x<1: fraction; >=1: count
  c.fed.weighting = "data_size"  # data_size | uniform
  c.fed.bn_aggregation = "mean"  # mean | first_client (reference quirk)
  c.fed.reset_optimizer = True
  c.fed.strategy = "serial"  # serial (CPU) | vmap (GPU) | sequential | sharded | devices
  c.fed.chunk_steps = 1  # XLA CPU runs a scanned step ~2.5x slower: dispatch per step
  # devices | sharded: use the first N devices (0: all present); more than present is an error.
  # `devices` queues whole clients on them longest first (docs/strategies_and_scaling.md).
  c.fed.num_devices = 0
  # Failing and slow clients, seeded per round, the same under every strategy
  # (docs/algorithms.md, "Failing and slow clients"). dropout: share of the selected
  # clients that fail mid-round (update lost, weight 0); straggler_fraction of the
  # others complete only straggler_steps of their local steps.
  c.fed.dropout = 0.0
  c.fed.straggler_fraction = 0.0
  c.fed.straggler_steps = 0.5

  # Several hosts (docs/strategies_and_scaling.md): the same command on every host, with
  # --config.hosts.process_id=K (0 on the coordinator's host). 1: one host; 0: detect
  # the cluster (SLURM, Open MPI, ...). Needs fed.strategy = "devices".
  c.hosts = ml_collections.ConfigDict()
  c.hosts.num_processes = 1
  c.hosts.process_id = -1  # -1: from the cluster's environment
  c.hosts.coordinator_address = ""  # HOST:PORT of process 0; "": JAX_COORDINATOR_ADDRESS
  c.hosts.timeout_s = 300  # how long a process waits for the others to join

  # Cosine-distance weights (the _cdw algorithms; docs/algorithms.md).
  c.cdw = ml_collections.ConfigDict()
  c.cdw.form = "logit"  # logit (the reference's) | delta (shared-parameter angle)
  c.cdw.mode = "default"  # default (eval mode, frozen copy) | reference (its train-mode quirks)
  c.cdw.batch_size = 32  # one batch of each client's own training data per round

  # Knowledge distillation on the server's public set (the _kd algorithms).
  c.kd = ml_collections.ConfigDict()
  c.kd.every_rounds = 10  # after aggregation of rounds 10, 20, ...
  c.kd.batch_size = 32
  c.kd.lr = 5e-4  # server SGD, re-created at every KD call
  c.kd.momentum = 0.9
  c.kd.nesterov = True
  c.kd.weight_decay = 5e-4
  c.kd.normalize_teachers = True  # L2-normalise each teacher's embedding (the paper's flag)
  c.kd.mode = "default"  # default (eval mode, selected clients) | reference (its train-mode quirks)

  # Secure aggregation, simulated (docs/secure_aggregation.md): the server learns only sums.
  # Each client's weighted update is clipped to [-clip, clip], encoded with frac_bits
  # fractional bits and masked; sums are taken modulo 2^bits (bits <= 32).
  c.secagg = ml_collections.ConfigDict()
  c.secagg.enabled = False
  c.secagg.bits = 32
  c.secagg.frac_bits = 20
  c.secagg.clip = 8.0
  # BatchNorm statistics move much more in a round (the stem's running variance by
  # hundreds): their own clip, with a coarser step on the same integer range.
  c.secagg.stats_clip = 4096.0
  c.secagg.stats_frac_bits = 11

  # FedProx (the fedprox* algorithms; docs/algorithms.md, "Baselines"): each client adds
  # (mu / 2) ||w - w_global||^2 over the shared subtree to its loss.
  c.prox = ml_collections.ConfigDict()
  c.prox.mu = 0.01

  # Server optimizers on the pseudo-gradient (fedavgm, fedadagrad, fedadam, fedyogi and their
  # _kd/_cdw forms; Reddi et al., ICLR 2021). lr None: the algorithm's default (fedavgm 1.0,
  # the adaptive ones 0.01); momentum: fedavgm's; b1, b2, eps (tau): the adaptive ones'.
  c.server_opt = ml_collections.ConfigDict()
  c.server_opt.lr = ml_collections.FieldReference(None, field_type=float)
  c.server_opt.momentum = 0.9
  c.server_opt.b1 = 0.9
  c.server_opt.b2 = 0.99
  c.server_opt.eps = 1e-3

  # Differential privacy (docs/privacy.md). mode: off | sgd (DP-SGD in each client; unit
  # image | identity) | client (DP-FedAvg over Poisson-sampled clients, rate client_rate).
  # target_epsilon > 0: the noise multiplier calibrated for fed.rounds (0: as given).
  c.dp = ml_collections.ConfigDict()
  c.dp.mode = "off"
  c.dp.unit = "image"
  c.dp.clip_norm = 1.0
  c.dp.noise_multiplier = 1.0
  c.dp.delta = 1e-5
  c.dp.target_epsilon = 0.0
  c.dp.accountant = "pld"  # pld | rdp
  c.dp.images_per_identity = 4  # unit identity: at most this many images of a sampled person
  c.dp.client_rate = 0.2  # mode client: each client's chance of joining a round
  c.dp.adaptive_clip = False  # mode client: Andrew et al. 2021's quantile-tracking clip
  c.dp.clip_quantile = 0.5
  c.dp.clip_lr = 0.2
  c.dp.count_stddev = 0.0  # 0: expected clients per round / 20

  c.eval = ml_collections.ConfigDict()
  c.eval.every_rounds = 5
  c.eval.protocol = "standard"  # standard | fedreid
  c.eval.batch_size = 256
  # Read query/gallery batch by batch (never the whole test set in host memory), each
  # distinct test set embedded once per model; same metrics as in-memory (tested).
  c.eval.streamed = True
  c.eval.client_models = True  # also test each client's own trained model ("FedPav local")
  c.eval.before_kd = True  # on KD rounds also test the global model before distillation
  # Also report metrics after k-reciprocal re-ranking (<metric>_rr; Zhong et al. 2017,
  # memory-bounded: docs/evaluation_and_report.md) and after alpha query expansion
  # (<metric>_aqe, fast-reid's aqe; aqe_k 0 = off). The plain metrics are unchanged.
  c.eval.re_ranking = False
  c.eval.rr_k1 = 20
  c.eval.rr_k2 = 6
  c.eval.rr_lambda = 0.3
  c.eval.aqe_k = 0
  c.eval.aqe_alpha = 3.0
  # Clients held out of training, scored by the global model (docs/evaluation_and_report.md).
  c.eval.unseen = ()

  # Other algorithms run after the main one, same data and seed, each in
  # <workdir>/baseline_<name> (the suite: docs/algorithms.md).
  c.baselines = ("local",)
  c.eval.best_metric = "rank1"  # mean over clients; the best global model -> <workdir>/export_best

  c.checkpoint_every = 5
  c.checkpoint_keep = 2  # the latest checkpoints kept (a damaged latest falls back to the previous)
  c.log_every = 1
  return c
