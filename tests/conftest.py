"""Shared fixtures: a tiny synthetic face set, generated once per test session."""

import pytest

from synthetic_faces import generate

TINY_SET = dict(identities=4, train_per_identity=8, dev_per_identity=3, test_per_identity=2, image_size=48, seed=0)
TINY_NET = ["--widths", "8,16,24,32", "--depths", "1,1,1,1"]


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory):
    """4 identities x (8 train, 3 dev, 2 test) faces at 48 px, with test_labels.csv."""
    root = tmp_path_factory.mktemp("faces") / "data"
    generate(root, **TINY_SET, workers=1)
    return root
