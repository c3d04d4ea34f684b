"""Data parallelism over devices and hosts, with BN statistics groups as an explicit setting.

`DataParallel` runs the per-device programs of `bn_jax.train` (the same pure `train_step` with
`axis_name='batch'`) under `jax.jit(jax.shard_map(...))` on a 1-D mesh (default, the route the
JAX migration guide recommends) or under `jax.pmap` (single host). The dataset is replicated
on every device; each batch's indices are split over the devices, so each device (and host)
gathers only its own shard of every batch. Gradients are averaged and metrics summed over
devices; BN running averages are averaged every step, so they are identical on every device.

Where BN's training statistics come from (`bn_stats`):
  sync:  the whole global batch (nn.BatchNorm's axis_name);
  local: each device's part of the batch;
  ghost: groups of `bn_group_size` examples within each device's part.
"""

import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bn_jax import errors
from bn_jax import train

AXIS = 'batch'
BN_STATS = ('sync', 'local', 'ghost')
KINDS = ('shard_map', 'pmap')


def _chunks(states, data, order, rngs, start, stop):
  """Per device: `train.train_chunk` over the stacked seeds, collectives over AXIS."""
  chunk = functools.partial(train.train_chunk, axis_name=AXIS)
  return train.over_seeds(chunk, (0, None, 0, 0, None, None))(
      states, data, order, rngs, start, stop)


def _evaluate(states, data, rows):
  return train.over_seeds(functools.partial(train.evaluate, axis_name=AXIS),
                          (0, None, None))(states, data, rows)


class DataParallel:
  """Runs the seed-stacked programs data-parallel; the runner interface of `loop.fit`."""

  def __init__(self, num_devices=0, kind='shard_map'):
    if kind not in KINDS:
      raise errors.ConfigError(f'unknown parallel {kind!r}: choose one of {KINDS}.')
    devices = jax.devices()  # every device of every process
    if not 0 <= num_devices <= len(devices):
      raise errors.ConfigError(f'devices={num_devices}, but JAX sees {len(devices)} '
                       f'({jax.default_backend()}); 0 means all of them.')
    if kind == 'pmap' and jax.process_count() > 1:
      raise errors.ConfigError("parallel='pmap' runs on one host; use 'shard_map' across hosts.")
    self.kind = kind
    self.num_devices = num_devices or len(devices)
    self.mesh = jax.sharding.Mesh(np.array(devices[:self.num_devices]), (AXIS,))
    if kind == 'shard_map':
      self.train_chunks = jax.jit(jax.shard_map(
          _chunks, mesh=self.mesh, in_specs=(P(), P(), P(None, None, AXIS), P(), P(), P()),
          out_specs=(P(), P())), donate_argnums=0)
      self.evaluate = jax.jit(jax.shard_map(
          _evaluate, mesh=self.mesh, in_specs=(P(), P(), P(None, AXIS)), out_specs=P()))
    else:  # pmap: every argument carries a leading device axis, the same step inside
      self.train_chunks = jax.pmap(
          _chunks, AXIS, in_axes=(0, 0, 0, 0, None, None), donate_argnums=0,
          devices=self.mesh.devices.tolist())
      self.evaluate = jax.pmap(_evaluate, AXIS, devices=self.mesh.devices.tolist())

  def _sharding(self, ndim, split_last):
    if self.kind == 'pmap':
      return NamedSharding(self.mesh, P(AXIS))
    return NamedSharding(self.mesh, P(*[None] * (ndim - 1), AXIS) if split_last else P())

  def _layout(self, x, split_last):
    """Host array -> the global array's layout: pmap wants a leading device axis."""
    if self.kind == 'shard_map':
      return x
    if not split_last:
      return np.broadcast_to(x, (self.num_devices,) + x.shape)
    x = x.reshape(x.shape[:-1] + (self.num_devices, -1))
    return np.moveaxis(x, -2, 0)

  def put(self, tree, split_last=False):
    """Host values (the same on every host) -> global arrays: replicated, or with the last
    (batch) axis split over the devices. Each host fills only its own devices' shards."""

    def put_one(x):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_one(jax.random.key_data(x)),
                                        impl=jax.random.key_impl(x))
      x = self._layout(np.asarray(x), split_last)
      return jax.make_array_from_callback(x.shape, self._sharding(x.ndim, split_last),
                                          lambda index: x[index])

    return jax.tree.map(put_one, tree)

  def abstract(self, shape, dtype, split_last=False):
    shape = self._layout(np.empty(shape, np.bool_), split_last).shape
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding(len(shape), split_last))

  def get(self, tree):
    """Replicated global arrays -> host numpy (one copy; readable on every host)."""

    def get_one(x):
      if not isinstance(x, jax.Array):
        return x
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
      local = np.asarray(x.addressable_data(0))
      return local[0] if self.kind == 'pmap' else local

    return jax.tree.map(get_one, tree)


def initialize_distributed(coordinator_address='', num_processes=0, process_id=-1):
  """`jax.distributed.initialize` from arguments, or from the environment when they are unset
  (JAX's own detection on TPU/SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID). A no-op for a single process, or when already initialized. CPU processes
  talk through gloo. Call it before any other JAX call (`sweep.load_data` does, first): JAX
  refuses to join other processes once it has started its backend."""
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  count = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '0'))
  pid = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1'))
  if count == 1 or (not address and not count):
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if address:
    kwargs['coordinator_address'] = address
  if count:
    kwargs['num_processes'] = count
  if pid >= 0:
    kwargs['process_id'] = pid
  jax.distributed.initialize(**kwargs)
  return True
