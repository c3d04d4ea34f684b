"""Where a sweep's configurations train: one device or data-parallel over several
(`make_runner`), and how many configurations train at once on which devices (`lanes`)."""

import dataclasses
import os

import jax

from bn_jax import host
from bn_jax import parallel
from bn_jax import settings


def make_runner(config):
  """One device, or data-parallel over `config.devices` (joining other hosts if configured and
  `load_data` has not)."""
  parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
  if config.placement == 'per_device':  # each configuration on one device (`_lanes`)
    if jax.process_count() > 1:
      raise settings.ConfigError('placement=per_device runs in one process: drop it for '
                                 'multi-host data parallelism, or split a sweep over hosts '
                                 'with --config.shard=I/N (docs/scaling.md).')
    return host.ONE_DEVICE
  if (config.devices or jax.device_count()) == 1 and jax.process_count() == 1:
    return host.ONE_DEVICE
  return parallel.DataParallel(config.devices, config.parallel)


@dataclasses.dataclass
class Lane:
  """Where configurations train: a runner, the data on its devices, how many at once, and the
  `devices` field of their records."""
  runner: object
  data: object
  threads: int
  devices: dict


def lanes(config, runner, dataset, device_data, num_configs):
  """`placement=data_parallel`: one lane on every device (`runner`), `concurrent_runs`
  configurations at once. `placement=per_device` (one process, several local devices): a lane
  per device, one configuration at a time on each, so each run gets the numbers it gets alone
  on one device."""
  common = {'platform': jax.default_backend(), 'processes': jax.process_count(),
            'placement': config.placement}
  if config.placement != 'per_device' or len(jax.local_devices()) == 1:
    threads = concurrent_runs(config, runner, num_configs)
    return [Lane(runner, device_data, threads, {**common, 'count': runner.num_devices,
                                                  'concurrent_runs': threads})]
  lanes = []
  for device in jax.local_devices()[:max(1, num_configs)]:
    one = host.OneDevice(device)
    lanes.append(Lane(one, host.DeviceData.put(dataset, one), 1, {
        **common, 'count': 1, 'concurrent_runs': min(num_configs, len(jax.local_devices())),
        'device': device.id}))
  return lanes


def concurrent_runs(config, runner, num_configs):
  """How many configurations train at once: 1 with several devices or hosts (one program uses
  them all, and hosts must run the same programs in the same order); on one device
  `config.concurrent_runs`, or with 0 (auto) one per CPU core (at most 8) on a CPU, 1 on an
  accelerator. Measured on a 2-core CPU: two threads train two configurations 1.7x as fast as
  one after the other (a small model's step is bound to one core)."""
  if runner.num_devices > 1 or jax.process_count() > 1:
    return 1
  n = config.concurrent_runs or (
      min(os.cpu_count() or 1, 8) if jax.default_backend() == 'cpu' else 1)
  return max(1, min(n, num_configs))


