"""Which code made a run, and whether other code would make the same numbers.

A record's `code` names the code three ways:
  sources: a hash of every bn_jax source and the script, as files (any edit changes it);
  host: a hash of the comment- and docstring-free syntax tree of the modules whose host-side
    Python shapes a run (`HOST_MODULES`: data loading, data order, the schedule, the loop);
  programs: a hash of the configuration's compiled programs as JAX lowers them (init, train
    chunk, eval; StableHLO without source locations) and the JAX and jaxlib versions
    (`programs_fingerprint`, from `programs.compile_programs`).
A finished run is re-used when its sources are today's, or when its host code and programs
are: editing comments, docstrings, plots, tables, report text or a module the run never
executes changes neither, while editing the model, norm, loss, step, optimizer, init, data
pipeline, schedule or evaluation changes one of them.
"""

import ast
import functools
import glob
import hashlib
import os
import subprocess
import sys

import jax
import jaxlib

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The modules whose host-side Python decides a run's numbers beyond its compiled programs:
# which files and examples (data, sources), in what order and how many steps (host, train,
# schedule, loop, programs), on which devices (parallel), and the statistics recomputed after
# training (precise_bn).
HOST_MODULES = ('data', 'sources', 'host', 'train', 'schedule', 'loop', 'programs', 'parallel',
                'precise_bn')


def version(script=None):
  """The code this process runs with: {'sources', 'host', 'script', 'commit', 'dirty'} (the
  git commit and dirty flag when the package is a checkout). Read once per process: the code
  that runs is the code that was loaded, even if the files are edited while a study runs."""
  script = script if script is not None else getattr(sys.modules['__main__'], '__file__', '')
  return _version(os.path.abspath(script) if script else '')


@functools.lru_cache(maxsize=None)
def _version(script):
  digest = hashlib.sha256()
  files = sorted(glob.glob(os.path.join(PACKAGE_DIR, '*.py')))
  if script and os.path.isfile(script):
    files.append(script)
  for path in files:
    with open(path, 'rb') as f:
      digest.update(os.path.basename(path).encode() + b'\0' + f.read() + b'\0')
  found = {'sources': digest.hexdigest()[:16], 'host': host_fingerprint(),
           'script': os.path.basename(script) if script else '', 'commit': None, 'dirty': None}
  try:
    git = lambda *a: subprocess.run(['git', '-C', PACKAGE_DIR, *a], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
    found['commit'] = git('rev-parse', 'HEAD')
    found['dirty'] = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    pass  # not a git checkout (an installed copy): the hashes still name the code
  return found


def host_fingerprint(directory=PACKAGE_DIR, modules=HOST_MODULES):
  """A hash of `modules`' syntax trees without docstrings (comments and layout are not in a
  syntax tree)."""
  digest = hashlib.sha256()
  for name in modules:
    with open(os.path.join(directory, f'{name}.py'), encoding='utf-8') as f:
      tree = ast.parse(f.read())
    digest.update(name.encode() + b'\0' + ast.dump(_without_docstrings(tree)).encode() + b'\0')
  return digest.hexdigest()[:16]


def _without_docstrings(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
         and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
  return tree


def programs_fingerprint(lowered):
  """A hash of lowered programs (`jax.stages.Lowered`: StableHLO text, which carries no
  source locations by default) and the JAX and jaxlib versions that lowered them."""
  digest = hashlib.sha256(f'jax {jax.__version__} jaxlib {jaxlib.__version__}'.encode())
  for program in lowered:
    digest.update(program.as_text().encode() + b'\0')
  return digest.hexdigest()[:16]


def same_numbers(made_by, now, programs):
  """Whether a run made by code `made_by` (a record's `code`) gives the numbers code `now`
  gives: the same sources, or the same host code and the same `programs(seeds)` fingerprint
  (a function of the seed count the run was trained with, called only when needed)."""
  if made_by.get('sources') == now['sources']:
    return True
  return (made_by.get('host') == now['host'] and made_by.get('programs') is not None and
          made_by['programs'] == programs(made_by.get('program_seeds', 1)))
