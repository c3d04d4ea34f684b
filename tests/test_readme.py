"""README.md is a map: at most 20 KB, every docs page linked, every relative link and anchor
resolving, no words about how the code was built, and its API tour runs as written."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
DOCS = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')  # [text](target) and ![alt](target)
FENCE = re.compile(r'^```.*?^```', re.S | re.M)


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _links(path):
  """The relative link targets of a Markdown file, outside code blocks."""
  text = FENCE.sub('', _read(path))
  return [t for t in LINK.findall(text) if not re.match(r'[a-z][a-z0-9+.-]*:', t)]


def _anchors(path):
  """GitHub's anchors of a Markdown file's headings."""
  headings = re.findall(r'^#+\s+(.*?)\s*$', FENCE.sub('', _read(path)), re.M)
  return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def _rel(path):
  return os.path.relpath(path, ROOT)


def test_readme_is_at_most_20_kb():
  size = os.path.getsize(README)
  assert size <= 20_000, f'README.md is {size} bytes: move detail to a docs/ page (limit 20,000).'


def test_readme_links_every_docs_page():
  linked = {os.path.normpath(os.path.join(ROOT, t.split('#')[0])) for t in _links(README)}
  missing = [_rel(p) for p in DOCS if os.path.normpath(p) not in linked]
  assert not missing, f'README.md does not link {missing}: add each page to its Docs list.'


@pytest.mark.parametrize('path', [README] + DOCS, ids=_rel)
def test_relative_links_resolve(path):
  broken = []
  for target in _links(path):
    file_part, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
        else path
    if not os.path.exists(resolved):
      broken.append(f'{target} (no file {_rel(resolved)})')
    elif anchor and resolved.endswith('.md') and anchor not in _anchors(resolved):
      broken.append(f'{target} (no heading with anchor #{anchor} in {_rel(resolved)})')
  assert not broken, f'{_rel(path)}: broken links: {broken}'


def test_readme_layout_lists_every_module():
  layout = _read(README).split('## Layout', 1)[-1].split('\n## ', 1)[0]
  listed = set(re.findall(r'^\s+([a-z_0-9]+\.py)\s', layout, re.M))
  modules = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'bn_jax', '*.py'))}
  missing = sorted(modules - listed - {'__init__.py'})
  gone = sorted(listed - modules)
  assert not missing and not gone, (f"README.md's Layout: add {missing}, remove {gone} "
                                    '(one line each, from the module docstring).')


# Words about the process that built the code, or identity claimed beyond what holds.
FORBIDDEN = ('session', "developers' notes", 'our machine', 'no gpu was available',
             'number for number')


@pytest.mark.parametrize('path', [README] + DOCS, ids=_rel)
def test_no_words_about_how_the_code_was_built(path):
  text = ' '.join(_read(path).lower().split())
  found = [w for w in FORBIDDEN if w in text]
  assert not found, (f'{_rel(path)} says {found}: describe the code and its results; where '
                     'numbers repeat, say "bit-identical on the same CPU model and library '
                     'versions".')


@pytest.mark.slow
def test_readme_api_tour_runs_as_written(tmp_path, monkeypatch):
  """The README's API tour (the Python block of its section), executed as it stands, in a
  fresh directory (~20-30 s, most of it compiling: slow tier; the Editing-bn_jax blocks:
  tests/test_recipes.py)."""
  tour = _read(README).split('## API tour')[1].split('\n## ')[0]
  blocks = re.findall(r'^```python\n(.*?)^```', tour, re.S | re.M)
  assert len(blocks) == 1, 'the API tour should be one Python block.'
  monkeypatch.chdir(tmp_path)
  scope = {'__name__': 'readme_tour'}
  exec(compile(blocks[0], 'README.md (API tour)', 'exec'), scope)  # pylint: disable=exec-used
  assert set(scope['sums']) == {'loss', 'correct', 'count'}
  assert scope['results'][0]['status'] == 'ok' and len(scope['results']) == 2
  assert len(scope['records']) == 4  # 2 norms x 2 seeds
  assert (tmp_path / 'runs' / 'tour' / 'results.jsonl').exists()


def test_the_package_docstring_lists_every_module():
  import bn_jax  # pylint: disable=g-import-not-at-top
  modules = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'bn_jax', '*.py'))
             if not p.endswith('__init__.py')]
  assert [m for m in modules if f'\n  {m} ' not in bn_jax.__doc__] == []
