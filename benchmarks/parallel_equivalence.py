r"""How close data-parallel training is to one device, in numbers (a check, not a timing).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/parallel_equivalence.py

Trains the BN MLP (dropout off, so every run sees the same randomness) for each of `--steps`
on `--data` and prints the largest absolute difference of params and BN batch_stats between:
sync BN on 8 devices vs 1 device on the whole batch; local BN on 8 devices vs ghost BN with
G = per-device batch on 1 device; shard_map vs pmap on 8 devices.
"""

import argparse
import dataclasses

import jax
import numpy as np

from bn_jax import data
from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import parallel
from bn_jax import threefry


def main():
  threefry.install()  # as the experiment scripts run
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', default='synthetic:4000')
  parser.add_argument('--steps', default='1,10,100,1000', help='compare after these steps')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--devices', type=int, default=8)
  args = parser.parse_args()
  dataset = data.load(args.data)
  n = args.devices

  def fit(runner=host.ONE_DEVICE, **kwargs):
    model = models.create_model('mlp', dropout=0.0, **kwargs)
    _, states = loop.fit(model, dataset, batch_size=args.batch_size, max_steps=steps,
                          progress=False, runner=runner)
    return states

  def diff(a, b):
    d = lambda x, y: max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
                         for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    return f'params {d(a.params, b.params):.2e}, batch_stats {d(a.batch_stats, b.batch_stats):.2e}'

  # Several devices train on whole batches only; give one device the same batches.
  whole = (len(dataset.train_labels) // args.batch_size) * args.batch_size
  dataset = dataclasses.replace(dataset, train_pixels=dataset.train_pixels[:whole],
                                train_labels=dataset.train_labels[:whole])
  print(f'{args.data}, batch {args.batch_size}, jax {jax.__version__}; max |difference|')
  for steps in [int(s) for s in args.steps.split(',')]:
    sync_n = fit(parallel.DataParallel(n), norm='batch', bn_axis_name=parallel.AXIS)
    print(f'after {steps} steps')
    print(f'  sync on {n} devices vs 1 device:         ', diff(sync_n, fit(norm='batch')))
    print(f'  local on {n} devices vs ghost G={args.batch_size // n} on 1:',
          diff(fit(parallel.DataParallel(n), norm='batch'),
               fit(norm='ghost', bn_group_size=args.batch_size // n)))
    print(f'  pmap vs shard_map on {n} devices:        ',
          diff(fit(parallel.DataParallel(n, 'pmap'), norm='batch', bn_axis_name=parallel.AXIS),
               sync_n))


if __name__ == '__main__':
  main()
