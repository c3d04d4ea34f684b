"""experiments/papers/wu_he2018.py end to end in quick mode."""

import pytest

from _paper_run import run_quick


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  _, rows = run_quick(tmp_path, 'wu_he2018')
  assert len(rows) == 3
