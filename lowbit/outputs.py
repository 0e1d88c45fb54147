"""Every file and directory lowbit writes: checked before any work, written whole or not at all.

Two rules, in one place:
- `check_new_directory` / `check_output_file` say, before any slow work starts, whether an
  output location can be written (its parent exists or can be created, is a directory and
  takes a new file; a directory output does not exist yet; a file output is not a
  directory), with a one-line error that names the flag.
- `new_directory` / `new_file` write into a temporary sibling and rename it into place at
  the end, so an error or an interruption leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_parent(path: Path, what: str) -> None:
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise LowbitError(f"{what} {path}: {ancestor} is a file, not a directory; choose another path")
    try:  # the only reliable test of "can I create a file here" (root passes os.access on /proc)
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=ancestor)
    except OSError as err:
        raise LowbitError(f"{what} {path}: cannot write in {ancestor} ({err.strerror}); choose another path") from None
    os.close(fd)
    os.unlink(probe)


def check_new_directory(path: str | Path, what: str = "output directory") -> Path:
    """``path`` must not exist and must be creatable; ``what`` names it (e.g. "--out")."""
    path = Path(path)
    if path.exists():
        raise LowbitError(f"{what} {path} already exists; choose another or remove it")
    _check_parent(path, what)
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """``path`` may exist (it is replaced) but must not be a directory, and must be writable."""
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"{what} {path} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise LowbitError(f"{what} {path} is not writable; choose another path")
    _check_parent(path, what)
    return path


@contextmanager
def new_directory(path: str | Path, what: str = "output directory") -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to fill; it becomes ``path`` when the block
    ends without error (with the usual permissions: readable by others unless the umask says
    otherwise), and is removed otherwise. ``path`` must not exist."""
    path = check_new_directory(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, path: Path) -> None:
    """Rename the filled directory ``tmp`` to ``path`` (which must not exist), with the usual
    permissions: readable by others unless the umask says otherwise."""
    mask = _umask()  # mkdtemp makes the directory private, and some writers (safetensors) their files
    tmp.chmod(0o777 & ~mask)
    for file in tmp.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)
    tmp.rename(path)


@contextmanager
def new_file(path: str | Path, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block
    ends without error, and is removed otherwise."""
    path = check_output_file(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # created by the writer, with the usual mode
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG at ``path``, through `new_file`."""
    path = Path(path)
    with new_file(path, "chart") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
