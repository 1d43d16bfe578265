"""Tests of ddpm/prefetch.py: sharding over the 8 devices, stacking, consumer-position state."""
import json
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm import input_pipeline, prefetch
# The pipeline tests' helpers (pytest puts tests/ on sys.path).
from test_input_pipeline import assert_batches_equal, make_config, take


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def test_prefetch_to_mesh_shards_over_the_8_devices(mesh):
  config = make_config(dataset="digits", image_size=8, batch_size=16)
  ds = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  twin = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  sharding = NamedSharding(mesh, P("data"))
  with prefetch.prefetch_to_mesh(ds.train_iter, sharding, size=2) as batches:
    batch = next(batches)
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (16, 8, 8, 1) and batch["label"].shape == (16,)
    assert batch["image"].sharding == sharding and batch["label"].sharding == sharding
    assert len(batch["image"].addressable_shards) == 8
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 8, 8, 1)}
    assert_batches_equal([batch, next(batches)], take(twin.train_iter, 2))
  # stack=1 with the batch axis at 1 asks for the stacked layout [1, B, ...].
  with prefetch.prefetch_to_mesh(ds.train_iter, NamedSharding(mesh, P(None, "data")),
                                 stack=1) as stacked:
    batch = next(stacked)
    assert batch["image"].shape == (1, 16, 8, 8, 1) and batch["label"].shape == (1, 16)
    np.testing.assert_array_equal(np.asarray(batch["image"])[0], next(twin.train_iter)["image"])
  with pytest.raises(ValueError, match="partitions axes \\[0\\].*P\\(None, 'data'\\)"):
    prefetch.prefetch_to_mesh(ds.train_iter, NamedSharding(mesh, P("data")), stack=2)
  with pytest.raises(ValueError, match="partitions axes \\[2\\]"):
    prefetch.prefetch_to_mesh(ds.train_iter, NamedSharding(mesh, P(None, None, "data")))


def test_prefetch_to_mesh_stacks_and_restores_consumer_position(mesh):
  config = make_config(dataset="digits", image_size=8, batch_size=16, random_flip=True)
  ds = input_pipeline.create_datasets(config, seed=4, process_index=0, process_count=1)
  twin = input_pipeline.create_datasets(config, seed=4, process_index=0, process_count=1)
  sharding = NamedSharding(mesh, P(None, "data"))
  batches = prefetch.prefetch_to_mesh(ds.train_iter, sharding, size=2, stack=3)
  first = next(batches)
  assert first["image"].shape == (3, 16, 8, 8, 1) and first["label"].shape == (3, 16)
  assert first["image"].sharding == sharding
  raw = take(twin.train_iter, 3)
  np.testing.assert_array_equal(np.asarray(first["image"]), np.stack([b["image"] for b in raw]))
  state = batches.get_state()
  assert state["next_batch"] == 3  # what was consumed, not what was prefetched
  deadline = time.time() + 10
  while ds.train_iter.get_state()["next_batch"] < 9 and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.05)
  assert ds.train_iter.get_state()["next_batch"] == 9  # size=2 stacked batches built ahead
  after = take(batches, 2)
  batches.set_state(state)
  assert_batches_equal(take(batches, 2), after)
  batches.close()
  assert ds.train_iter.get_state()["next_batch"] == 9  # rewound to what was consumed

  fresh = input_pipeline.create_datasets(config, seed=4, process_index=0, process_count=1)
  fresh.train_iter.set_state(json.loads(json.dumps(state)))
  with prefetch.prefetch_to_mesh(fresh.train_iter, sharding, stack=3) as resumed:
    assert_batches_equal(take(resumed, 2), after)
