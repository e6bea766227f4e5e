"""FedPav aggregation, by hand on two clients."""
import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import rounds
from fedreid_jax.federated.algorithm import Algorithm, data_size_weights, uniform_weights
from fedreid_jax.federated.state import ClientStates, ServerState


def two_clients():
  params = {"backbone": {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])},
            "embedding": {"b": jnp.array([[0.0], [4.0]])},
            "classifier": {"k": jnp.array([[10.0], [20.0]])}}
  stats = {"backbone": {"mean": jnp.array([[1.0], [5.0]])}}
  clients = ClientStates(params=params, batch_stats=stats, opt_state=(), rng=jnp.zeros(2),
                         step=jnp.zeros(2, jnp.int32), num_classes=jnp.array([3, 5]),
                         num_examples=jnp.array([100.0, 300.0]))
  server = ServerState(params={"backbone": {"w": jnp.zeros(2)}, "embedding": {"b": jnp.zeros(1)}},
                       batch_stats={"backbone": {"mean": jnp.zeros(1)}},
                       round=jnp.array(0), rng=jax.random.key(0))
  return server, clients


def spec(**kw):
  return Algorithm("test", "Test", ("backbone", "embedding"), **kw)


def test_fedpav_weighted_mean_by_hand():
  server, clients = two_clients()
  weights = data_size_weights(clients, {})
  out = rounds.aggregate(server, clients, weights, jnp.array(1), spec())
  # weights 100/400 and 300/400: 0.25*[1,2] + 0.75*[3,6] = [2.5, 5.0]
  np.testing.assert_allclose(out.params["backbone"]["w"], [2.5, 5.0])
  np.testing.assert_allclose(out.params["embedding"]["b"], [3.0])  # 0.75*4
  np.testing.assert_allclose(out.batch_stats["backbone"]["mean"], [4.0])  # 0.25+3.75
  assert "classifier" not in out.params
  assert int(out.round) == 1


def test_non_sharing_algorithm_only_advances_the_round():
  server, clients = two_clients()
  out = rounds.aggregate(server, clients, jnp.ones(2), jnp.array(0), Algorithm("none", "None", ()))
  assert int(out.round) == 1
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out.params, server.params))


def test_uniform_weights_and_reference_bn_quirk():
  server, clients = two_clients()
  weights = uniform_weights(clients, {})
  out = rounds.aggregate(server, clients, weights, jnp.array(0), spec(bn_aggregation="first_client"))
  np.testing.assert_allclose(out.params["backbone"]["w"], [2.0, 4.0])
  np.testing.assert_allclose(out.batch_stats["backbone"]["mean"], [1.0])  # client 0's, unaveraged


def test_split_and_merge_roundtrip():
  _, clients = two_clients()
  shared, private = params_lib.split_tree(clients.params, params_lib.prefix_predicate(["backbone"]))
  assert set(shared) == {"backbone"} and set(private) == {"embedding", "classifier"}
  merged = params_lib.merge_trees(private, shared)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), merged, clients.params))
