"""The settings every experiment shares (`base_config`), with their defaults and meaning;
scripts start from these and add their own. `bn_jax.settings` maps them to a run."""

import ml_collections

from bn_jax import norms


def base_config():
  """Settings every experiment shares; scripts start from these and add their own.

  Some are read only with others (the renorm_* settings with norm=batch_renorm, momentum with
  the momentum optimizers, ...: `overrides.READ_ONLY_WITH`); one given on the command line that
  no run of the script reads is an error, never silently ignored.
  """
  c = ml_collections.ConfigDict()
  _data(c)
  _normalization(c)
  _model(c)
  _training(c)
  _process(c)
  return c


def _data(c):
  """Data, split and inputs; the model and the ResNet's size."""
  c.data = 'tfds:mnist'  # tfds:NAME | idx:DIR | cifar:DIR | synthetic[:N[:HxWxC]]
  c.data_dir = ''  # TFDS data directory ('' = TFDS's default)
  c.val_fraction = 0.1
  c.split_seed = 42  # the validation split is the same for every run
  c.train_examples = 0  # > 0: train on this many examples (a fixed random subset); 0: all
  # Inputs: pixel / 255 in [0, 1] (the original study), or standardized per channel by the
  # training split's mean and std; one value per sweep (the data is loaded once).
  c.standardize = False
  # none | crop_flip (pad 4 + random crop + flip, on the device; the CNN and the ResNet only:
  # the MLP, which sees pixels as an unordered vector, is refused it)
  c.augment = 'none'
  c.model = 'mlp'  # mlp | cnn | resnet
  c.resnet_depth = 20  # 6n+2: the CIFAR ResNet of He et al. 2016 (20, 32, 44, 56, 110)
  c.resnet_width = 16  # channels of the first stage (then 2x, 4x)


def _model(c):
  """The model's layers, initialization and precision."""
  c.hidden = (128,)  # MLP hidden widths
  c.features = (32, 64)  # CNN: channels of each 3x3 conv block (the first two max-pool)
  c.cnn_pools = 2  # CNN: how many of the first conv blocks end in a 2x2 max-pool
  c.cnn_dense_norm = False  # CNN: normalize the hidden Dense layer too, as the conv blocks
  c.init_scale = 1.0  # hidden (and conv) weights at init: this times LeCun-normal
  c.init_std = 0.0  # > 0: every kernel of the MLP / CNN N(0, init_std^2) instead
  c.dropout = 0.2
  c.activation = 'relu'
  # bfloat16 compute for convs and Dense layers (GPU/TPU); params, optimizer state and the
  # norms stay float32 (as Flax's examples/imagenet; on CPU bfloat16 is slower)
  c.half_precision = False
  # Its dtype: 'bfloat16' (TPU, GPUs since Ampere) or 'float16' (older GPUs), which trains with
  # dynamic loss scaling (Flax's DynamicScale, as examples/imagenet does on GPU).
  c.half_precision_dtype = 'bfloat16'
  c.bn_momentum = norms.BN_MOMENTUM  # 0.99, Keras' (PyTorch's 0.1 is 0.9 here)
  c.bn_epsilon = norms.BN_EPSILON  # 1e-3, Keras' (Flax and PyTorch use 1e-5)


def _normalization(c):
  """The norm and its settings."""
  c.norm = 'batch'  # batch | none | layer | group | batch_renorm | noisy_batch (bn_jax/norms.py)
  c.norm_groups = 32  # GroupNorm: groups per layer (capped at its channel count)
  # Batch Renorm (Ioffe 2017): r in [1/rmax, rmax], d in [-dmax, dmax]; plain BN for the first
  # renorm_warmup_steps, then relaxed linearly to rmax by renorm_rmax_steps, dmax by ..._dmax_.
  c.renorm_rmax = 3.0
  c.renorm_dmax = 5.0
  c.renorm_warmup_steps = 5000
  c.renorm_rmax_steps = 40000
  c.renorm_dmax_steps = 25000
  # noisy_batch (Santurkar et al. 2018, Appendix A): BN, then in training per step and channel
  # x * U(1, 1 + bn_noise / 2) + U(-bn_noise, bn_noise), each with a per-activation jitter of
  # U(-bn_noise / 10, bn_noise / 10); in evaluation the noise's mean, x * (1 + bn_noise / 4).
  # 0.5: the paper's scale U(1, 1.25) and shift U(-0.5, 0.5) (eval scale 1.125).
  c.bn_noise = 0.5
  # Where BN's training statistics come from: 'sync' = the whole (global) batch; 'local' = each
  # device's part; 'ghost' = groups of bn_group_size examples (ghost BN), separating the
  # statistics batch from the optimizer's batch.
  c.bn_stats = 'sync'
  c.bn_group_size = 0


def _training(c):
  """Optimizer, rate schedule, batch, budget, seeds, evaluation."""
  # Optimizer (bn_jax/optim.py): adam (the original study) | sgd | momentum | nesterov | adamw
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.momentum = 0.9  # of momentum / nesterov
  c.weight_decay = 0.0  # L2 (decoupled for adamw) on kernels ...
  c.weight_decay_norms_and_biases = False  # ... and, if true, on biases and norm scales/shifts
  c.lr_schedule = 'constant'  # constant | cosine | step | warmup_cosine
  c.warmup_epochs = 0.0  # linear warm-up from 0 (constant, step, warmup_cosine)
  # step: multiply the rate by lr_decay_factor at these epochs (each within the budget of some
  # run: a decay that no run reaches is an error)
  c.lr_decay_epochs = ()
  c.lr_decay_factor = 0.1
  c.batch_size = 32
  c.epochs = 5
  c.max_steps = 0  # a budget in steps instead of epochs (0: use epochs)
  c.seeds = 3  # seeds first_seed .. first_seed + seeds - 1, trained together in one program
  c.first_seed = 0  # e.g. a selection (of rates, budgets) on seeds disjoint from the tested
  c.chunk_steps = 0  # train steps per dispatched program; 0 = up to the next evaluation
  # Validation points per epoch (the `curve` of each record); at most the steps of an epoch
  # (of the longest epoch among a sweep's runs): more is an error, not silently fewer points.
  c.evals_per_epoch = 1
  c.target_val_accuracy = 0.0  # > 0: tables report steps/examples to reach it
  # > 0: PreciseBN after training, BN statistics recomputed from this many training examples
  # (records gain precise_val_* and precise_test_*)
  c.precise_bn_examples = 0
  # Also evaluate with the running averages bias-corrected for their initial 0/1 (divided by
  # 1 - momentum^steps, as Adam does): `final['corrected_val_accuracy']` etc.
  c.bn_ema_bias_correction = False
  # Steps (from the start) where a run is measured and, in a study, keeps its state: records
  # gain `saved` (train/val/test metrics per step); one run gives a whole budget curve.
  c.save_states_at = ()


def _process(c):
  """Output, devices, hosts, shards, caches, checkpoints, resuming."""
  c.eval_batch_size = 1000
  c.progress = True
  c.tensorboard = True  # event files in WORKDIR/tensorboard/<run key>/seed_<s>/
  # Devices: data-parallel over `devices` (0 = every device JAX sees, of every host) with
  # `parallel` = shard_map | pmap; hosts join through jax.distributed (unset: environment).
  c.devices = 0
  c.parallel = 'shard_map'
  # data_parallel: each configuration over all `devices`; per_device: up to one configuration
  # per local device at once, each on its own device (numbers as alone on one device).
  c.placement = 'data_parallel'
  # 'I/N': train only the (configuration, seed) pairs of shard I of N, N processes sharing the
  # workdir (`bn_jax.shards`; '' = SLURM's array variables if set, else everything).
  c.shard = ''
  c.coordinator_address = ''  # e.g. 10.0.0.1:1234
  c.num_processes = 0
  c.process_id = -1
  # Configurations trained at the same time (threads); 0 = auto: one per CPU core (at most 8)
  # on a single CPU device, else 1. Each run's numbers do not depend on it.
  c.concurrent_runs = 0
  c.compilation_cache = True  # JAX's persistent compilation cache
  # '' = $XDG_CACHE_HOME/bn_jax/jax (~/.cache/bn_jax/jax); one set must be a writable directory
  # (or creatable): anything else is an error before training, not a cache silently off
  c.compilation_cache_dir = ''
  # Checkpoints and resuming: the same command with the same workdir resumes a sweep, skipping
  # finished runs; resume=false starts afresh (refusing to delete results unless overwrite).
  c.resume = True
  c.overwrite = False
  # A finished run made by other code (bn_jax sources or the script changed): 'refuse' (stop
  # and say so), 'retrain' (train it again; the old record moves to superseded.jsonl) or
  # 'reuse' (use it as it is; its record keeps its own code version).
  c.on_code_change = 'refuse'
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  c.checkpoint_min_seconds = 10.0  # but never more often than this
  c.checkpoint_keep = 3
  c.keep_checkpoints = False  # delete a run's checkpoints once its results are recorded
  c.bn_batch_of_one = 'error'  # BN over 1 example outputs just beta: 'error' | 'warn'
