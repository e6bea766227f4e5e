"""The literature's baselines (fedreid_jax/federated/baselines.py), each against
a plain numpy implementation written here: FedProx's gradient term, the
server optimizers of Reddi et al. (Algorithm 2, with tau) and FedAvgM over
three rounds, FedBN's BatchNorm leaves through broadcast and aggregation,
the limits (fedprox mu=0 and fedavgm momentum 0, lr 1 are FedPav) on one
round of a tiny experiment each, and bad config lines."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import fakes
from fedreid_jax import config_lib, federated, run_config, train
from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import baselines
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import rounds
from fedreid_jax.federated.state import ClientStates, ServerState
from fedreid_jax.models.reid import build_model

NAMES = ("fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedbn", "scaffold", "ditto")


class TinyModel(nn.Module):
  """backbone / embedding / classifier subtrees, each with a BatchNorm where the
  real model has them."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.mean(x, axis=(1, 2))
    x = _Backbone(name="backbone")(x, train)
    f = _Embedding(name="embedding")(x, train)
    return f, nn.Dense(self.num_classes, name="classifier")(f)


class _Backbone(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4, name="conv1")(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x))


class _Embedding(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4, name="dense")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_registered_after_the_built_ins_with_their_compositions():
  names = federated.registered()
  assert names[:7] == ("local", "fedpav", "fedpav_kd", "fedpav_cdw", "fedpav_kd_cdw", "fedavg",
                       "centralised")
  want = tuple(f"{n}{s}" for n in NAMES for s in ("", "_kd", "_cdw", "_kd_cdw"))
  assert names[7:7 + len(want)] == want == baselines.NAMES
  cfg = fakes.tiny_config()
  labels = {n: config_lib.describe_algorithm(n, cfg) for n in want}
  assert labels["fedprox_kd_cdw"].label == "FedProx+KD+CDW"
  assert labels["fedyogi_cdw"].label == "FedYogi+CDW"
  assert labels["fedbn_kd"].needs_public and labels["fedbn_kd"].keep_local is not None
  assert labels["fedadam_kd"].server_optimizer is not None
  assert labels["fedprox"].client_regularizer is not None
  assert labels["scaffold_kd_cdw"].label == "SCAFFOLD+KD+CDW"
  assert labels["scaffold"].after_training is not None and labels["ditto"].personal_mu == 0.01


def test_fedprox_adds_its_gradient_to_one_plain_sgd_step():
  """One plain-SGD step of fedprox's regularizer (mu from config.prox) minus the
  same step without it moves each shared weight by -lr mu (w - g) (by hand),
  the classifier not at all."""
  cfg = fakes.tiny_config(**{"prox.mu": 0.5})
  lr, mu = 0.1, 0.5
  model, tx = TinyModel(), optax.sgd(lr)
  variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8, 4, 3)), train=False)
  alg = federated.build_algorithm("fedprox", cfg, model)
  with_term = jax.jit(local_lib.make_local_step(model, tx, cfg.train, alg.client_regularizer))
  without = jax.jit(local_lib.make_local_step(model, tx, cfg.train, None))
  state = ClientStates(params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]), rng=jax.random.key(1),
                       step=jnp.int32(0), num_classes=jnp.int32(3), num_examples=jnp.float32(8))
  shared = {k: state.params[k] for k in ("backbone", "embedding")}
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), shared)
  images = jnp.asarray(rng.integers(0, 256, (8, 8, 4, 3)), jnp.uint8)
  labels = jnp.asarray(rng.integers(0, 3, 8))
  a, _ = with_term(state, images, labels, jnp.array(True), g)
  b, _ = without(state, images, labels, jnp.array(True), g)
  w, got = _flat(state.params), _flat(jax.tree.map(jnp.subtract, a.params, b.params))
  for path, gv in _flat(g).items():
    np.testing.assert_allclose(got[path], -lr * mu * (np.asarray(w[path]) - np.asarray(gv)),
                               rtol=1e-4, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(got[p]))) == 0.0 for p in got if p[0] == "classifier")
  term = alg.client_regularizer(state.params, g, ())
  want = mu / 2 * sum(np.sum((np.asarray(w[p]) - np.asarray(v)) ** 2) for p, v in _flat(g).items())
  np.testing.assert_allclose(float(term), want, rtol=1e-5)


def _trained(x, offsets, num_examples):
  """Clients `[S, 3]` at x + offsets[s]."""
  return ClientStates(params={"backbone": {"w": jnp.asarray(x[None] + offsets, jnp.float32)}},
                      batch_stats={"backbone": {"m": jnp.asarray(offsets[:, :1], jnp.float32)}},
                      opt_state=(), rng=jnp.zeros(len(offsets)),
                      step=jnp.zeros(len(offsets), jnp.int32),
                      num_classes=jnp.full(len(offsets), 3), num_examples=num_examples)


# Client offsets from the server per round: large steps, then small and
# opposite ones (Yogi's sign flips both ways against tau^2 = 1e-4).
OFFSETS = [np.array([[0.3, -0.2, 0.0], [0.1, 0.4, 0.0]]),
           np.array([[-0.02, 0.01, 0.001], [0.0, 0.03, -0.002]]),
           np.array([[0.005, -0.5, 0.0], [-0.01, -0.3, 0.0]])]


def _paper(name, x, deltas, lr, b1, b2, tau, momentum):
  """Reddi et al. Algorithm 2 (and FedAvgM) in numpy: the server after each round."""
  m, v, out = np.zeros_like(x), np.full_like(x, tau ** 2), []
  for d in deltas(x):
    if name == "fedavgm":  # v = momentum v + Delta; x += lr v
      m = momentum * m + d
      x = x + lr * m
    else:
      m = b1 * m + (1 - b1) * d
      if name == "fedadagrad":
        v = v + d ** 2
      elif name == "fedadam":
        v = b2 * v + (1 - b2) * d ** 2
      else:
        v = v - (1 - b2) * d ** 2 * np.sign(v - d ** 2)
      x = x + lr * m / (np.sqrt(v) + tau)
    out.append(x.copy())
  return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
@pytest.mark.parametrize("settings", [{}, {"lr": 0.3, "momentum": 0.5, "b1": 0.8, "b2": 0.9,
                                          "eps": 0.05}], ids=["defaults", "set"])
def test_server_optimizer_follows_the_papers_formula_over_three_rounds(name, settings):
  """`rounds.aggregate` with the built algorithm, three rounds, against the
  paper's update in numpy (Delta = weighted mean - server), defaults and set."""
  cfg = fakes.tiny_config()
  for k, v in settings.items():
    cfg.server_opt[k] = v
  alg = federated.build_algorithm(name, cfg, None)
  opt = baselines.server_opt_settings(cfg)
  lr = opt["lr"] if opt["lr"] is not None else baselines.SERVER_LR[name]
  if not settings:
    assert (lr, opt["momentum"], opt["b1"], opt["b2"], opt["eps"]) == (
        1.0 if name == "fedavgm" else 0.01, 0.9, 0.9, 0.99, 1e-3)
  sizes = jnp.array([1.0, 3.0])
  w = np.array([0.25, 0.75])
  x0 = np.array([1.0, -2.0, 0.5])
  server = ServerState(params={"backbone": {"w": jnp.asarray(x0, jnp.float32)}},
                       batch_stats={"backbone": {"m": jnp.zeros(1)}}, round=jnp.int32(0),
                       rng=jax.random.key(0))
  server = server._replace(opt_state=alg.server_optimizer.init(server.params))
  aggregate = jax.jit(lambda s, t, wts: rounds.aggregate(s, t, wts, jnp.int32(0), alg))
  got = []
  for offsets in OFFSETS:
    x = np.asarray(server.params["backbone"]["w"], np.float64)
    server = aggregate(server, _trained(x, offsets, sizes), sizes)
    got.append(np.asarray(server.params["backbone"]["w"], np.float64))
    np.testing.assert_allclose(server.batch_stats["backbone"]["m"], w @ offsets[:, :1],
                               rtol=1e-6)  # statistics: the weighted mean

  def deltas(x):  # the weighted mean of the clients minus the server, round by round
    for offsets in OFFSETS:
      yield w @ offsets  # clients at x + offsets: mean - x
  want = _paper(name, x0, deltas, lr, opt["b1"], opt["b2"], opt["eps"], opt["momentum"])
  for g, p in zip(got, want):
    np.testing.assert_allclose(g, p, rtol=2e-5, atol=2e-6)


def test_optax_adam_is_not_the_papers_update():
  """Why `scale_by_fedopt` exists: optax's adam (bias correction, v from 0)
  moves the first round by lr sign(Delta) where the paper moves by
  lr (1 - b1) Delta / (sqrt(tau^2 + (1 - b2) Delta^2) + tau)."""
  g = {"w": jnp.array([-0.5])}  # pseudo-gradient; Delta = 0.5
  ours = baselines.fedopt("adam", 0.01, 0.9, 0.99, 1e-3)
  theirs = optax.adam(0.01, 0.9, 0.99, eps=1e-3)
  u_ours = ours.update(g, ours.init(g))[0]["w"]
  u_theirs = theirs.update(g, theirs.init(g))[0]["w"]
  np.testing.assert_allclose(u_ours, 0.01 * 0.1 * 0.5 / (np.sqrt(1e-6 + 0.01 * 0.25) + 1e-3),
                             rtol=1e-5)
  np.testing.assert_allclose(u_theirs, 0.01 * 0.5 / (0.5 + 1e-3), rtol=1e-5)


def test_batchnorm_predicate_is_every_batchnorm_of_the_model():
  """`is_batchnorm` picks exactly the modules with running statistics in the
  real re-ID model (backbone and embedding block), their scale and bias."""
  cfg = fakes.tiny_config()
  model = build_model(cfg.model, 5)
  v = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                        jnp.zeros((1, 32, 16, 3)), train=False))
  bn_modules = {p[:-1] for p in _flat(v["batch_stats"])}
  assert ("embedding", "bn") in bn_modules and ("backbone", "bn1") in bn_modules
  for path in _flat(v["params"]):
    assert baselines.is_batchnorm(path) == (path[:-1] in bn_modules), path
  assert all(baselines.is_batchnorm(p) for p in _flat(v["batch_stats"]))


def _fedbn_trees(rng, num_clients):
  """A server (shared subtree) and stacked clients (with classifiers) in the
  re-ID layout, every leaf random."""
  shape = {"backbone": {"conv1": {"kernel": (2, 3)}, "bn1": {"scale": (3,), "bias": (3,)}},
           "embedding": {"dense": {"kernel": (3, 2)}, "bn": {"scale": (2,), "bias": (2,)}}}
  stats = {"backbone": {"bn1": {"mean": (3,), "var": (3,)}},
           "embedding": {"bn": {"mean": (2,), "var": (2,)}}}
  leaf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  is_shape = lambda x: isinstance(x, tuple)
  server = ServerState(params=jax.tree.map(lambda s: leaf(*s), shape, is_leaf=is_shape),
                       batch_stats=jax.tree.map(lambda s: leaf(*s), stats, is_leaf=is_shape),
                       round=jnp.int32(0), rng=jax.random.key(0))
  params = jax.tree.map(lambda s: leaf(num_clients, *s), shape, is_leaf=is_shape)
  params["classifier"] = {"kernel": leaf(num_clients, 2, 4)}
  clients = ClientStates(
      params=params, batch_stats=jax.tree.map(lambda s: leaf(num_clients, *s), stats,
                                              is_leaf=is_shape),
      opt_state=jax.vmap(optax.sgd(0.1).init)(params),
      rng=jax.random.split(jax.random.key(1), num_clients),
      step=jnp.zeros(num_clients, jnp.int32), num_classes=jnp.full(num_clients, 4),
      num_examples=jnp.array([2.0, 5.0, 3.0])[:num_clients])
  return server, clients


@pytest.mark.parametrize("server_opt", [None, "fedadam"])
def test_fedbn_keeps_each_clients_batchnorm_through_a_round(server_opt):
  """FedBN, three clients, two selected: broadcast leaves each client its own
  BatchNorm leaves and sends the rest; after training (random moves) and
  aggregation, the server's non-BatchNorm leaves are the data-size-weighted
  mean (or, with a server optimizer composed on it, the optimizer's step),
  its BatchNorm leaves the weighted mean of the trained clients' (never the
  optimizer's); the next broadcast gives each client back exactly the
  BatchNorm leaves it trained; the unselected client is untouched."""
  cfg = fakes.tiny_config()
  alg = federated.build_algorithm("fedbn", cfg, None)
  if server_opt:
    alg = federated.with_server_optimizer(
        alg, baselines.server_optimizer(server_opt, cfg), "fedbn_adam", "FedBN+Adam")
  rng = np.random.default_rng(0)
  server, clients = _fedbn_trees(rng, 3)
  if server_opt:
    server = server._replace(opt_state=alg.server_optimizer.init(server.params))
  tx = optax.sgd(0.1)
  ids = jnp.array([0, 2])
  sel = rounds.broadcast(server, clients, ids, alg, tx)
  bn = baselines.is_batchnorm
  for tree, srv, own in ((sel.params, server.params, clients.params),
                         (sel.batch_stats, server.batch_stats, clients.batch_stats)):
    f, s, o = _flat(tree), _flat(srv), _flat(own)
    for path in f:
      want = (np.asarray(o[path])[np.asarray(ids)] if bn(path) or path[0] == "classifier"
              else np.broadcast_to(s[path], f[path].shape))
      np.testing.assert_array_equal(f[path], want, err_msg=str(path))
  rows = rounds.broadcast_rows(server, clients, jnp.array([True, False, True]), alg, tx)
  for path, x in _flat(rows.params).items():  # the same, without a gather
    np.testing.assert_array_equal(x[np.array([0, 2])], _flat(sel.params)[path])
    np.testing.assert_array_equal(x[1], _flat(clients.params)[path][1])
  trained = sel._replace(
      params=jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), sel.params),
      batch_stats=jax.tree.map(lambda x: x * 1.5, sel.batch_stats))
  weights = trained.num_examples
  w = np.asarray(weights) / np.asarray(weights).sum()
  new = rounds.aggregate(server, trained, weights, jnp.int32(0), alg)
  mean = lambda x: np.tensordot(w, np.asarray(x, np.float64), axes=1)
  if server_opt:  # the paper's first FedAdam step on the non-BatchNorm leaves
    opt = baselines.server_opt_settings(cfg)
    lr, tau = baselines.SERVER_LR[server_opt], opt["eps"]
  tp = _flat(trained.params)
  for path, x in _flat(new.params).items():
    want = mean(tp[path])
    if server_opt and not bn(path):
      d = want - np.asarray(_flat(server.params)[path])
      want = np.asarray(_flat(server.params)[path]) + lr * (1 - opt["b1"]) * d / (
          np.sqrt(tau ** 2 + (1 - opt["b2"]) * d ** 2) + tau)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6, err_msg=str(path))
  for path, x in _flat(new.batch_stats).items():
    np.testing.assert_allclose(x, mean(_flat(trained.batch_stats)[path]), rtol=1e-6)
  after = rounds.scatter(clients, trained, ids)
  again = rounds.broadcast(new, after, ids, alg, tx)
  for tree, srv, got in ((trained.params, new.params, again.params),
                         (trained.batch_stats, new.batch_stats, again.batch_stats)):
    t, s = _flat(tree), _flat(srv)
    for path, x in _flat(got).items():
      want = t[path] if bn(path) or path[0] == "classifier" else np.broadcast_to(s[path], x.shape)
      np.testing.assert_array_equal(x, want, err_msg=str(path))
  for path, x in _flat(after.params).items():  # client 1 did not train: as it was
    np.testing.assert_array_equal(x[1], _flat(clients.params)[path][1])


def _weighted_mean_of(exp, ids):
  w = np.asarray(exp.clients.num_examples)[ids]
  w = w / w.sum()
  shared = params_lib.prefix_predicate(rounds.FEATURE_EXTRACTOR)
  return jax.tree.map(lambda x: np.tensordot(w, np.asarray(x, np.float64)[ids], axes=1),
                      params_lib.split_tree(exp.clients.params, shared)[0])


@pytest.fixture(scope="module")
def limit_rounds():
  """One round of `fedavgm` (momentum 0, lr 1) and of `fedprox` (mu 0)."""
  out = {}
  for name, overrides in (("fedavgm", {"server_opt.momentum": 0.0, "server_opt.lr": 1.0}),
                          ("fedprox", {"prox.mu": 0.0})):
    cfg = fakes.tiny_config(**{"fed.algorithm": name, "model.dropout": 0.0, **overrides})
    config_lib.validate(cfg)
    exp = train.Experiment(cfg, fakes.fake_clients(((3, 8), (2, 8))))
    exp.train_round(0)
    out[name] = exp
  return out


def test_fedavgm_with_momentum_0_and_rate_1_is_fedpav(limit_rounds):
  """FedPav's server is the data-size-weighted mean of the trained clients;
  fedavgm (momentum 0, lr 1) lands on it after one round of a tiny experiment
  (its clients train exactly as FedPav's: the server optimizer acts after)."""
  exp = limit_rounds["fedavgm"]
  assert exp.algorithm.server_optimizer is not None
  want = _weighted_mean_of(exp, [0, 1])
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(exp.server.params)):
    np.testing.assert_allclose(np.asarray(y, np.float64), x, rtol=1e-5, atol=1e-6)


def test_fedprox_with_mu_0_is_fedpav(limit_rounds):
  """fedprox with mu 0 after one round: every client and the server equal
  FedPav's (the fedavgm run's clients, which train as FedPav's, and its
  server, FedPav's mean), within float tolerance."""
  a, b = limit_rounds["fedavgm"], limit_rounds["fedprox"]
  assert b.algorithm.client_regularizer is not None  # the term is there, weighted 0
  for x, y in zip(jax.tree.leaves((a.clients.params, a.clients.batch_stats, a.server.params)),
                  jax.tree.leaves((b.clients.params, b.clients.batch_stats, b.server.params))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("prox.mu", -0.1, r"config.prox.mu=-0.1 must be a non-negative number"),
    ("server_opt.lr", 0.0, r"config.server_opt.lr=0.0 must be a positive number, or None"),
    ("server_opt.lr", -1.0, r"config.server_opt.lr=-1.0 must be a positive"),
    ("server_opt.eps", -1e-3, r"config.server_opt.eps=-0.001 must be a non-negative number"),
    ("server_opt.momentum", 1.0, r"config.server_opt.momentum=1.0 must be in \[0, 1\)"),
    ("server_opt.momentum", -0.1, r"config.server_opt.momentum=-0.1 must be in \[0, 1\)"),
    ("server_opt.b1", 1.0, r"config.server_opt.b1=1.0 must be in \[0, 1\)"),
    ("server_opt.b2", -0.5, r"config.server_opt.b2=-0.5 must be in \[0, 1\)"),
])
def test_bad_lines_are_one_line_before_anything_is_built(field, value, match):
  cfg = fakes.tiny_config(**{field: value})
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.validate(cfg)
  assert "\n" not in str(e.value)


def test_fedbn_refuses_the_reference_cdw():
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedbn_cdw", "cdw.mode": "reference"})
  with pytest.raises(ConfigError, match="fedbn with cdw.mode='reference' is refused"):
    config_lib.validate(cfg)
  cfg.cdw.form = "delta"  # no in-flight statistics: fine
  config_lib.validate(cfg)


def test_a_config_saved_before_the_sections_still_validates_and_resumes(tmp_path):
  """An older config.json has no `prox` / `server_opt`: the defaults apply,
  validation passes, and a resume with today's config is not refused; a
  config.json of today (lr None) loads back and validates."""
  old = fakes.tiny_config(**{"fed.algorithm": "fedadam"})
  del old["prox"]
  del old["server_opt"]
  config_lib.validate(old)
  assert baselines.prox_settings(old) == baselines.PROX_DEFAULTS
  assert baselines.server_opt_settings(old) == baselines.SERVER_OPT_DEFAULTS
  now = fakes.tiny_config(**{"fed.algorithm": "fedadam", "server_opt.lr": 0.1})
  run_config.check_meaning(old.to_dict(), now.to_dict(), str(tmp_path))
  path = tmp_path / "config.json"
  path.write_text(fakes.tiny_config(**{"fed.algorithm": "fedyogi"}).to_json())
  saved = config_lib.load_config_file(str(path))
  assert saved.server_opt.lr is None and saved.prox.mu == 0.01
  config_lib.validate(saved)
