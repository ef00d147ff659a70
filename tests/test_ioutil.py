"""frugalvit.ioutil: files appear whole or not at all, with normal permissions, and no temporaries remain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from frugalvit.ioutil import (atomic_file, check_output_dir, write_bytes_atomically, write_files_atomically,
                              write_json_atomically)
from frugalvit.training import save_atomically


@pytest.fixture()
def umask_022():  # noqa: ANN201 - yields nothing
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_writes_honour_the_umask(tmp_path: Path, umask_022: None) -> None:
    write_json_atomically({"a": 1}, tmp_path / "sub" / "a.json")
    write_bytes_atomically(tmp_path / "b.bin", b"xyz")
    with atomic_file(tmp_path / "c.npz") as handle:
        np.savez(handle, x=np.arange(3))
    save_atomically({"w": torch.zeros(2)}, tmp_path / "d.pt")
    for name in ("sub/a.json", "b.bin", "c.npz", "d.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"a": 1}
    assert np.load(tmp_path / "c.npz")["x"].tolist() == [0, 1, 2]
    assert not list(tmp_path.rglob("*.tmp"))


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(TypeError):
        write_json_atomically({"not": object()}, target)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_files_written_together_or_not_at_all(tmp_path: Path) -> None:
    def broken(handle: object) -> None:
        raise RuntimeError("cannot render")

    with pytest.raises(RuntimeError):
        write_files_atomically({tmp_path / "a.json": b"{}", tmp_path / "b.png": broken})
    assert list(tmp_path.iterdir()) == []
    write_files_atomically({tmp_path / "a.json": b"{}", tmp_path / "b.png": lambda handle: handle.write(b"png")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]


def test_check_output_dir(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing created
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file" / "sub", option="--run")
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a directory"):
        check_output_dir(tmp_path / "out", ("report.json",))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "out", "report.json"]


def test_json_has_no_nan_tokens(tmp_path: Path) -> None:
    """NaN and infinities are not JSON: written as null, which every reader parses."""
    path = tmp_path / "r.json"
    write_json_atomically({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_files_written_together_are_checked_before_the_first_rename(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("OLD")
    (tmp_path / "b.png").mkdir()
    with pytest.raises(IsADirectoryError, match="b.png"):
        write_files_atomically({tmp_path / "a.json": b"NEW", tmp_path / "b.png": b"X"})
    assert (tmp_path / "a.json").read_text() == "OLD"


def test_a_dangling_link_is_no_output_directory(tmp_path: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone" / "x")
    with pytest.raises(ValueError, match="link to nothing"):
        check_output_dir(link)
