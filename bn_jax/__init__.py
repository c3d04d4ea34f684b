"""bn_jax: Batch Normalization and batch-size effects, studied in JAX/Flax.

Modules, in the order data flows through them:
  settings    defaults, run identity, config -> model, optimizer and fit arguments
  checks      every check on the settings, one message each
  data        data specs -> uint8 pixels, validation split, float inputs (lookup table)
  sources     data files (IDX, CIFAR-10) and TFDS -> numpy arrays
  augment     data augmentation on the device (crop + flip), inside the train step
  models      MLP, CNN and their normalization layers
  train       TrainState, the pure train / eval steps, chunked and seed-stacked programs
  parallel    the same programs data-parallel over devices and hosts
  schedule    epochs -> dispatched chunks and eval points
  loop        the fit loop: programs compiled ahead, divergence, validation, checkpoints
  checkpoint  Orbax checkpoints
  sweep       the resumable sweep every experiment runs through
  results     records, run keys, the workdir, atomic files
  code_version  which code made a run, and whether other code gives the same numbers
  report      tables and plots
  claims      effects, verdicts and BN measurements of the claims study
  timing      the step timer
  cli         the command line of the experiment scripts
  threefry    JAX's random hash unrolled on CPU (same bits, less compiling); `install()`,
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
