"""The descriptor table's reader and writer, through its spec and its manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.descriptors import read_descriptors, write_descriptors
from model.tables import DESCRIPTORS_OUTPUT


def _unit(rows: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_written_descriptors_read_back_with_their_manifest(tmp_path: Path) -> None:
    x = _unit(5, 8)
    uri = write_descriptors(
        str(tmp_path / "d"), list("abcde"), x, network={"weights": "w"}, settings={"max_size": 64}
    )
    desc = read_descriptors(uri)
    assert list(desc.image_ids) == list("abcde") and desc.dim == 8
    np.testing.assert_array_equal(desc.vectors, x)
    assert desc.manifest["network"] == {"weights": "w"}
    assert desc.manifest["settings"] == {"max_size": 64} and desc.manifest["dim"] == 8
    assert desc.output == DESCRIPTORS_OUTPUT.manifest(uri)
    assert desc.identity == desc.output.identity


def test_every_problem_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run pipeline\.extract first"):
        read_descriptors(str(tmp_path / "none"))
    x = _unit(3, 4)
    x[2, 0] = np.nan
    uri = write_descriptors(str(tmp_path / "d"), ["a", "a", "b"], x)
    with pytest.raises(ValueError, match="2 problems") as err:
        read_descriptors(uri)
    assert "1 image_id(s) appear more than once" in str(err.value)
    assert "non-finite values" in str(err.value)
    DESCRIPTORS_OUTPUT.unpublish(uri)
    with pytest.raises(ValueError, match="not a complete extract output"):
        read_descriptors(uri)
