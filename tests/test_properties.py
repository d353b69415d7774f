"""Properties: stored paths never resolve outside the tree; subsets partition the rows."""

from __future__ import annotations

import os
import posixpath

from hypothesis import given
from hypothesis import strategies as st

from chachaml_ops.layout import UnsafePath, resolve_stored_path
from chachaml_ops.verify import Subset

segments = st.one_of(
    st.sampled_from(["..", ".", "", "run", "model.bin", "a b", "x/..", "/"]),
    st.text(min_size=1, max_size=8),
)
paths = st.lists(segments, min_size=0, max_size=6).map("/".join)


@given(paths)
def test_resolved_paths_never_leave_the_artifact_dir(stored):
    root = "/srv/ml/chachaml-artifacts"
    try:
        rel = resolve_stored_path(stored)
    except UnsafePath:
        return
    joined = posixpath.normpath(posixpath.join(root, rel))
    assert joined.startswith(root + "/")
    assert ".." not in rel.split("/") and "" not in rel.split("/")
    assert not rel.startswith("/") and "\x00" not in rel
    assert os.path.relpath(joined, root) == rel


@given(st.text(min_size=1), st.integers(min_value=1, max_value=50))
def test_each_id_is_in_exactly_one_subset(artifact_id, t):
    owners = [n for n in range(1, t + 1) if Subset(n, t).contains(artifact_id)]
    assert len(owners) == 1


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=1, max_value=30))
def test_subset_text_round_trips(n, t):
    if n <= t:
        assert str(Subset.parse(f"{n}/{t}")) == f"{n}/{t}"
