r"""Speed of bn_jax on whatever backend JAX has, in one process:

  (a) the default batch-size grid (BN/no-BN x batch 16..256, 1 seed, 5 epochs) end to end,
      cold (empty compilation cache) and warm (wall, and the runs' own times summed);
  (b) one configuration with 1, 8 and 64 seeds trained together;
  (c) train-step throughput at batch 32 and 256 against the measured float32 matmul rate;
  (d) the same grid in plain PyTorch (eager; only if torch is installed);
  (e) the BN-CNN's train step (in the training loop) at batch 32 with its convolutions as
      patch matmuls and as XLA convolutions, and PyTorch's eager CNN step;
  (f) the same for ResNet-20 (BN, option A; bn_jax.resnet) at batch 128 on 32x32x3 generated
      inputs, with conv = forward (the CPU default), patches and xla, against the same ResNet-20
      in eager PyTorch. On CPU the xla variant is timed over 1 step: it is 35-50x slower inside
      the training loop (jax-ml/jax#12868). --resnet_steps=0 skips (f).

  python benchmarks/speed.py --data=idx:/usr/share/datasets/fashion-mnist --out=speed.json

Prints a table and writes the numbers as JSON. Timings on shared machines are noisy: compare
ratios measured in one run.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp

from bn_jax import data as data_lib
from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep
from bn_jax import threefry
from bn_jax import timing

BATCH_SIZES = (16, 32, 64, 128, 256)
FLOPS_PER_EXAMPLE = 6 * (784 * 128 + 128 * 10)  # forward + backward of the MLP's matmuls


def grid(dataset, epochs, cache_dir, batch_sizes=BATCH_SIZES):
  """The BN/no-BN x batch-size grid as the batch-size study runs it; (wall, train) seconds."""
  config = settings.base_config()
  config.update(seeds=1, epochs=epochs, progress=False, compilation_cache_dir=cache_dir)
  specs = [{'norm': n, 'batch_size': b} for n in ('batch', 'none') for b in batch_sizes]
  t0 = time.perf_counter()
  records = sweep.sweep(config, dataset, specs, experiment='benchmark')
  wall = time.perf_counter() - t0
  train_seconds = sum(r['wall_seconds'] for r in records)  # fit() time, programs compiled
  accuracy = [r['final']['test_accuracy'] for r in records]
  return wall, train_seconds, accuracy


def seeds_scaling(dataset, counts, epochs):
  """Train seconds (compile excluded) of one configuration with several seed counts."""
  data = host.DeviceData.put(dataset)
  model = models.create_model('mlp', norm='batch')
  out = {}
  for n in counts:
    results, _ = loop.fit(model, data, seeds=range(n), batch_size=32, epochs=epochs,
                           progress=False)
    out[n] = sum(h['seconds'] for h in results[0]['history'])
  return out


def matmul_rate(m=1024, reps=50):
  """Measured float32 matmul FLOP/s (a chain of dependent m x m matmuls)."""
  a = jnp.full((m, m), 1.0 / m, jnp.float32)
  chain = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, x: x @ a, a))
  chain(a).block_until_ready()
  t0 = time.perf_counter()
  chain(a).block_until_ready()
  return 2 * m**3 * reps / (time.perf_counter() - t0)


def step_seconds(dataset, model, batch_size, steps):
  """Seconds per train step of `model` (1 seed; `bn_jax.timing`, the claims' timer)."""
  times = timing.step_times({'model': model}, host.DeviceData.put(dataset), batch_size, steps)
  return times['model']['train'][0]


def step_throughput(dataset, batch_size, steps=400):
  """Examples per second of the BN-MLP train step (1 seed)."""
  model = models.create_model('mlp', norm='batch')
  return batch_size / step_seconds(dataset, model, batch_size, steps)


def cnn_step_ms(dataset, conv, batch_size=32, steps=50):
  """Milliseconds per train step of the BN-CNN (1 seed), with `conv` = patches | xla."""
  model = models.create_model('cnn', norm='batch', conv=conv)
  return step_seconds(dataset, model, batch_size, steps) * 1e3


def torch_cnn_step_ms(batch_size=32, steps=50):
  """Milliseconds per eager PyTorch train step of the same BN-CNN (None without torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  nn = torch.nn
  net = nn.Sequential(
      nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32, 1e-3, 0.01), nn.ReLU(),
      nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1, bias=False),
      nn.BatchNorm2d(64, 1e-3, 0.01), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)).to(device)
  return _torch_step_ms(torch, net, (batch_size, 1, 28, 28), steps, warmup=5)


def resnet_step_ms(conv, batch_size=128, steps=20, examples=600, dtype=jnp.float32):
  """Milliseconds per train step of ResNet-20 (BN, option A; bn_jax.resnet) on
  32x32x3 generated inputs (1 seed), with `conv` = forward | patches | xla, computing in
  `dtype` (bfloat16: convs and dense layers; params and norms stay float32)."""
  dataset = data_lib.load(f'synthetic:{examples}:32x32x3')
  model = models.create_model('resnet', norm='batch', conv=conv, depth=20, dtype=dtype)
  return step_seconds(dataset, model, batch_size, steps) * 1e3


def torch_resnet(torch, depth=20, width=16, num_classes=10, in_channels=3):
  """ResNet-`depth` of He et al. 2016 §4.2 in PyTorch, as bn_jax.resnet builds it: option-A
  shortcuts (subsample, zero-pad half the new channels on each side), BN with our momentum
  and epsilon, Kaiming-normal fan_out convs."""
  nn, functional = torch.nn, torch.nn.functional

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout, 1e-3, 0.01)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout, 1e-3, 0.01)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = functional.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.stride != 1:
        x = x[:, :, ::self.stride, ::self.stride]
      if self.extra:
        x = functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return functional.relu(y + x)

  layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width, 1e-3, 0.01), nn.ReLU()]
  cin = width
  for stage in range(3):
    for block in range((depth - 2) // 6):
      layers.append(Block(cin, width * 2**stage, 2 if stage and not block else 1))
      cin = width * 2**stage
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  net = nn.Sequential(*layers)
  for m in net.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
  return net


def torch_resnet_step_ms(batch_size=128, steps=20):
  """Milliseconds per eager PyTorch train step (Adam) of the same ResNet-20 on 32x32x3 inputs
  (None without torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  net = torch_resnet(torch).to(device)
  return _torch_step_ms(torch, net, (batch_size, 3, 32, 32), steps, warmup=3)


def _torch_step_ms(torch, net, shape, steps, warmup):
  """Milliseconds per eager Adam train step of `net` on random inputs of `shape`, after
  `warmup` untimed steps."""
  device = next(net.parameters()).device
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  x = torch.rand(*shape, device=device)
  y = torch.randint(0, 10, (shape[0],), device=device)
  for i in range(steps + warmup):
    if i == warmup:
      if device.type == 'cuda':
        torch.cuda.synchronize()
      t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  if device.type == 'cuda':
    torch.cuda.synchronize()
  return (time.perf_counter() - t0) / steps * 1e3


def torch_grid(dataset, epochs, batch_sizes=BATCH_SIZES):
  """The grid in plain PyTorch, eager, doing what bn_jax's grid does: the seed MLP, data on the
  device, index batches; each step's loss and correct predictions summed (on the device),
  validation loss and accuracy after every epoch, and at the end loss and accuracy on the test
  set and on the training set in eval mode (bn_jax's `train_eval_*`)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  split = lambda name: (
      torch.tensor(getattr(dataset, f'{name}_images').reshape(-1, 784), device=device),
      torch.tensor(getattr(dataset, f'{name}_labels'), dtype=torch.long, device=device))
  (x, y), val, test = split('train'), split('val'), split('test')
  f = torch.nn.functional

  def evaluate(net, images, labels):  # (loss, accuracy) in eval mode, batches of 1,000
    net.eval()
    loss = correct = 0.0
    with torch.no_grad():
      for i in range(0, len(labels), 1000):
        out, target = net(images[i:i + 1000]), labels[i:i + 1000]
        loss += f.cross_entropy(out, target, reduction='sum')
        correct += (out.argmax(1) == target).sum()
    return float(loss) / len(labels), float(correct) / len(labels)

  finals = {}  # per configuration: the keys of a bn_jax record's `final`
  t0 = time.perf_counter()
  for norm in ('batch', 'none'):
    for batch_size in batch_sizes:
      torch.manual_seed(0)
      layers = [torch.nn.Linear(784, 128, bias=norm == 'none')]
      if norm == 'batch':  # Keras' momentum 0.99 is PyTorch's 0.01
        layers.append(torch.nn.BatchNorm1d(128, eps=1e-3, momentum=0.01))
      layers += [torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 10)]
      net = torch.nn.Sequential(*layers).to(device)
      opt = torch.optim.Adam(net.parameters(), lr=1e-3)
      for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y), device=device)
        loss_sum = correct = torch.zeros((), device=device)
        for i in range(0, len(y), batch_size):
          idx = perm[i:i + batch_size]
          out = net(x[idx])
          loss = f.cross_entropy(out, y[idx])
          opt.zero_grad(set_to_none=True)
          loss.backward()
          opt.step()
          loss_sum = loss_sum + loss.detach() * len(idx)
          correct = correct + (out.argmax(1) == y[idx]).sum()
        train = float(loss_sum) / len(y), float(correct) / len(y)
        val_metrics = evaluate(net, *val)
      final = {}
      for name, metrics in (('train', train), ('val', val_metrics),
                            ('test', evaluate(net, *test)), ('train_eval', evaluate(net, x, y))):
        final.update({f'{name}_loss': metrics[0], f'{name}_accuracy': metrics[1]})
      finals[f'{norm}/{batch_size}'] = final
  seconds = time.perf_counter() - t0
  test_accuracy = [final['test_accuracy'] for final in finals.values()]
  return {'seconds': seconds, 'torch': torch.__version__, 'device': device, 'final': finals,
          'test_accuracy_min_max': [min(test_accuracy), max(test_accuracy)]}


def main():
  threefry.install()  # as the experiment scripts run
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', default='idx:/usr/share/datasets/fashion-mnist')
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--batch_sizes', default=','.join(map(str, BATCH_SIZES)),
                      help='the grid\'s batch sizes (each with and without BN)')
  parser.add_argument('--seed_counts', default='1,8,64')
  parser.add_argument('--seed_epochs', type=int, default=1)
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--cnn_steps', type=int, default=50, help='timed BN-CNN train steps')
  parser.add_argument('--resnet_steps', type=int, default=20,
                      help='timed ResNet-20 train steps (f); 0 skips the section')
  parser.add_argument('--out', default='speed.json')
  args = parser.parse_args()

  dataset = data_lib.load(args.data)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  out = {'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
         'data': args.data, 'epochs': args.epochs, 'batch_sizes': batch_sizes, 'versions': results.versions(),
         'machine': platform.machine(), 'cpus': os.cpu_count()}
  cache = tempfile.mkdtemp(prefix='bn_jax_bench_cache_')  # empty: the first grid runs cold
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  sweep.enable_compilation_cache(_cache(cache))
  wall, train_s, acc = grid(dataset, args.epochs, cache, batch_sizes)
  # `runs`: the runs' own wall times summed; configurations train concurrently
  # (placement.concurrent_runs), so this exceeds the wall time.
  out['grid_cold'] = {'wall': wall, 'runs': train_s,
                      'test_accuracy_min_max': [min(acc), max(acc)]}
  jax.clear_caches()  # the warm run reads the persistent cache the cold run filled
  wall, train_s, _ = grid(dataset, args.epochs, cache, batch_sizes)
  out['grid_warm'] = {'wall': wall, 'runs': train_s}
  counts = [int(c) for c in args.seed_counts.split(',')]
  out['seeds'] = {'epochs': args.seed_epochs, 'batch_size': 32,
                  'train_seconds': seeds_scaling(dataset, counts, args.seed_epochs)}
  rate = matmul_rate()
  out['matmul_flops'] = rate
  out['throughput'] = {}
  for b in (32, 256):
    eps = step_throughput(dataset, b)
    out['throughput'][b] = {'examples_per_s': eps, 'roofline_examples_per_s':
                            rate / FLOPS_PER_EXAMPLE, 'fraction_of_roofline':
                            eps * FLOPS_PER_EXAMPLE / rate}
  out['cnn_step_ms'] = {conv: cnn_step_ms(dataset, conv, steps=args.cnn_steps)
                        for conv in ('patches', 'xla')}
  if not args.skip_torch:
    out['torch_grid'] = torch_grid(dataset, args.epochs, batch_sizes)
    out['cnn_step_ms']['torch'] = torch_cnn_step_ms(steps=args.cnn_steps)
  if args.resnet_steps:
    slow_xla = jax.default_backend() == 'cpu'  # ~1 min per step on a 2-core CPU
    xla_steps = 1 if slow_xla else args.resnet_steps
    out['resnet_step_ms'] = {
        'batch_size': 128, 'steps': args.resnet_steps, 'xla_steps': xla_steps,
        'forward': resnet_step_ms('forward', steps=args.resnet_steps),
        'patches': resnet_step_ms('patches', steps=args.resnet_steps),
        'xla': resnet_step_ms('xla', steps=xla_steps)}
    if not slow_xla:  # bfloat16 pays on GPUs and TPUs; on a CPU it is slower
      out['resnet_step_ms']['xla_bfloat16'] = resnet_step_ms('xla', steps=args.resnet_steps,
                                                             dtype=jnp.bfloat16)
    if not args.skip_torch:
      out['resnet_step_ms']['torch'] = torch_resnet_step_ms(steps=args.resnet_steps)

  print(_table(out))
  results.atomic_write(args.out, json.dumps(out, indent=2))
  print(f'wrote {args.out}')


def _cache(path):
  config = settings.base_config()
  config.compilation_cache_dir = path
  return config


def _table(out):
  rows = [('backend', f"{out['backend']} x{len(out['devices'])}")]
  for key in ('grid_cold', 'grid_warm'):
    g = out[key]
    rows.append((f'grid {key[5:]}: wall / runs summed (concurrent)',
                 f"{g['wall']:.1f} s / {g['runs']:.1f} s"))
  seeds = out['seeds']['train_seconds']
  base = seeds[min(seeds)]
  rows.append((f"seeds (bs 32, {out['seeds']['epochs']} epoch train s)",
               ', '.join(f'{n}: {s:.2f} s ({s / base:.1f}x)' for n, s in seeds.items())))
  rows.append(('float32 matmul rate', f"{out['matmul_flops'] / 1e9:.0f} GFLOP/s"))
  for b, t in out['throughput'].items():
    rows.append((f'train step, batch {b}', f"{t['examples_per_s']:,.0f} ex/s = "
                 f"{t['fraction_of_roofline']:.2f} of roofline "
                 f"({t['roofline_examples_per_s']:,.0f} ex/s)"))
  cnn = out['cnn_step_ms']
  rows.append(('BN-CNN train step, batch 32', ', '.join(
      f'{name}: {ms:.1f} ms' for name, ms in cnn.items() if ms is not None) +
               f" (xla / patches = {cnn['xla'] / cnn['patches']:.1f}x)"))
  res = out.get('resnet_step_ms')
  if res:
    times = {name: res.get(name) for name in ('forward', 'patches', 'xla', 'xla_bfloat16',
                                              'torch')}
    line = ', '.join(f'{name}: {ms:.0f} ms' for name, ms in times.items() if ms is not None)
    line += f" (xla / forward = {res['xla'] / res['forward']:.1f}x"
    if res.get('torch') is not None:
      line += f", torch / forward = {res['torch'] / res['forward']:.2f}x"
    rows.append(('ResNet-20 (BN) train step, batch 128, 32x32x3', line + ')'))
  torch_result = out.get('torch_grid')
  if torch_result:
    rows.append((f"PyTorch {torch_result['torch']} eager grid ({torch_result['device']})",
                 f"{torch_result['seconds']:.1f} s = "
                 f"{torch_result['seconds'] / out['grid_cold']['wall']:.2f}x bn_jax cold; "
                 'test accuracy %.4f-%.4f (bn_jax %.4f-%.4f)' % (
                     *torch_result['test_accuracy_min_max'],
                     *out['grid_cold']['test_accuracy_min_max'])))
  width = max(len(r[0]) for r in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


if __name__ == '__main__':
  main()
