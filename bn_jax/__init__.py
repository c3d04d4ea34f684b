"""bn_jax: Batch Normalization and batch-size effects, studied in JAX/Flax.

Modules, in the order data flows through them:
  defaults      the settings every experiment shares, their defaults and meaning
  settings      run identity, config -> model, optimizer and fit arguments
  checks        every check on the settings, one message each
  overrides     command-line settings a script would ignore, refused
  errors        the user errors (settings, data, workdir): one line, exit status 2
  cli           the command line of the experiment scripts
  data          data specs -> uint8 pixels, validation split, float inputs (lookup table)
  sources       data files (IDX, CIFAR-10) and TFDS -> numpy arrays
  augment       data augmentation on the device (crop + flip), inside the train step
  norms         the norms, each declared once (REGISTRY), and their constructors
  norm_modules  the Flax modules Flax lacks: ghost BN, Batch Renorm, noise, GroupNorm
  models        MLP, CNN, a model by name
  resnet        the CIFAR ResNet of He et al. 2016
  convs         the models' conv layers: XLA's, and the CPU forms that train fast
  optim         Optax optimizers, weight-decay masks, rate schedules
  train         TrainState, the pure train / eval steps, chunked and seed-stacked programs
  host          batch order per epoch, the data on the device, the one-device runner
  parallel      the same programs data-parallel over devices and hosts
  schedule      epochs -> dispatched chunks and eval points
  programs      a configuration's programs lowered and compiled ahead, their fingerprint
  loop          fit: a chunk at a time, divergence, validation, checkpoints
  progress      the progress bar, or one line per epoch in a log file
  precise_bn    PreciseBN statistics and bias-corrected running averages
  checkpoint    Orbax checkpoints with checksums
  interrupt     SIGTERM / SIGINT: stop at a chunk boundary, checkpoint, resume
  code_version  which code made a run, and whether other code gives the same numbers
  results       records, run keys, the workdir, atomic files
  locks         one writer per workdir, checked before every record
  reuse         what a sweep keeps of its workdir: finished runs, checkpoints, states
  shards        a sweep split over processes sharing a workdir
  placement     where a sweep trains: one device, data-parallel, or one run per device
  sweep         the resumable sweep every experiment runs through, and Study (with states)
  summaries     TensorBoard event files
  health        the warnings records carry, the gates findings check
  verdicts      findings, gates and the one verdict rule
  report        tables and plots
  claims        BN measurements of the claims study
  papers        the reproductions' findings and reports
  ics           internal covariate shift and loss-landscape measures
  timing        the step timer
  threefry      JAX's random hash unrolled on CPU (same bits, less compiling); `install()`,
                which the scripts' `cli.run` calls

Importing bn_jax changes nothing global: no plotting backend, no JAX lowering; Orbax, SciPy
and tensorboardX load when first used.
"""

from bn_jax import augment
from bn_jax import checkpoint
from bn_jax import checks
from bn_jax import claims
from bn_jax import cli
from bn_jax import data
from bn_jax import loop
from bn_jax import models
from bn_jax import parallel
from bn_jax import report
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep
from bn_jax import timing
from bn_jax import train
