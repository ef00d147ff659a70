"""Writing files whole or not at all, and checking an output directory before long work.

Every app (CLI, video report, benchmarks, training checkpoints) writes through
these helpers, so a crash, a full disk or a bad path never leaves a
half-written result or a stray temporary file, and results are created with
ordinary permissions (0666 less the umask, as `open` gives), not the 0600 of
`tempfile`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _temporary_path(path: Path) -> Path:
    """A fresh hidden name beside `path` (same directory, hence the same file system for the rename)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_file(path: Path | str) -> Iterator[IO[bytes]]:
    """Open a temporary file beside `path` for binary writing; on success rename it over `path`.

    Use with any writer that takes a file object (`torch.save`, `np.savez`,
    `figure.savefig(..., format="png")`, `json.dump` through a text wrapper).
    On any error the temporary file is removed and `path` is left as it was.
    The parent directory must exist (see `check_output_dir`).
    """
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "xb") as handle:  # "x": never clobber; mode 0666 & ~umask like any new file
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_file(path) as handle:
        handle.write(data)


def _finite(data: Any) -> Any:
    """`data` with every NaN or infinite float as None: JSON has no such numbers (Python's `NaN` / `Infinity`
    tokens are not JSON, and other readers reject the file); null says "no value" in every reader."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def json_bytes(data: Any, indent: int | None = 2) -> bytes:
    """`data` as UTF-8 JSON text ending in a newline, non-finite floats as null (raises TypeError/ValueError before
    anything is written)."""
    return (json.dumps(_finite(data), indent=indent, allow_nan=False) + "\n").encode()


def read_json(path: Path | str, remedy: str) -> Any:
    """The JSON in `path`; a damaged file is one ValueError naming it and `remedy` (what to do about it)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {remedy}") from None


def check_fields(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise ValueError when `data` (a settings record read back from JSON) has keys that are no fields of the
    dataclass `cls` (`what` names it in the message, e.g. "DVT config"): a record of another version."""
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}")


def write_json_atomically(data: Any, path: Path | str, indent: int | None = 2) -> None:
    """Serialise `data` as JSON into `path` whole or not at all; the parent directory is created if needed."""
    path = Path(path)
    payload = json_bytes(data, indent)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, payload)


def write_files_atomically(files: Mapping[Path, bytes | Callable[[IO[bytes]], None]]) -> None:
    """Write several files that belong together: all temporaries first, then all renames.

    Each value is the file's bytes, or a function writing them to a binary file
    object. If writing any temporary fails, none of the targets is touched and
    no temporary remains. Only a failure between the renames (rare: they are
    metadata operations in one directory) can leave some files new and some old.
    """
    blocked = [str(path) for path in files if Path(path).is_dir()]
    if blocked:  # checked before the first rename: a directory in the way would stop the renames half done
        raise IsADirectoryError(f"cannot write {', '.join(blocked)}: a directory is in the way; move it")
    written: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            temporary = _temporary_path(path)
            written.append((temporary, path))
            with open(temporary, "xb") as handle:
                if callable(content):
                    content(handle)
                else:
                    handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        for temporary, path in written:
            os.replace(temporary, path)
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)


def check_output_dir(path: Path | str, files: Iterable[str] = (), option: str = "--out") -> None:
    """Check, before any long work, that `path` is or can become a writable directory for `files`.

    Creates nothing that stays (a probe file is created and removed). Raises ValueError naming the problem and the fix when
    `path` is an existing file, when a parent on the way is a file, when the
    directory (or the nearest existing parent) is not writable, or when one of
    the expected `files` exists there as a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} exists and is not a directory; choose a directory path")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{option} {path} is a link to nothing ({os.readlink(path)}); remove it or choose another "
                         "path")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a directory; choose another path")
    what = "directory" if existing == path else f"parent directory {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the {what} is not writable; choose a writable location")
    probe = _temporary_path(existing / "write-probe")
    try:  # os.access says yes to root even on read-only file systems: try for real
        probe.open("xb").close()
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write in the {what} ({error.strerror}); "
                         "choose a writable location") from error
    probe.unlink(missing_ok=True)
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{option} {path}: {path / name} is a directory, so the {name} file cannot be "
                             "written; remove it or choose another directory")
