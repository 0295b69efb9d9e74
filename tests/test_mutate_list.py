"""tests/mutate.py's list stays runnable (issue #25): every entry's snippets
apply to the code as it is now (none stale: a stale entry would make
`make mutate` refuse to run), ids are unique, and the test files each entry
names exist. Reads files only: milliseconds."""

import os

from tests import mutate


def test_every_mutation_applies_and_names_existing_tests():
  stale = mutate._stale(mutate.MUTATIONS, None)
  assert not stale, "re-anchor in tests/mutate.py: " + "; ".join(
    f"{k}: {v}" for k, v in stale.items()
  )
  ids = [m.id for m in mutate.MUTATIONS]
  assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
  for m in mutate.MUTATIONS:
    for arg in m.tests:
      if arg.startswith("tests/"):
        path = os.path.join(mutate.REPO, arg.split("::")[0])
        assert os.path.exists(path), (m.id, arg)
