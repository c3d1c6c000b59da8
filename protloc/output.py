"""Writing outputs safely: never half a file at the destination, never a surprise overwrite.

Every file protloc writes goes to a temporary name in the destination's folder and is renamed
over the destination only when complete (a rename within a folder is atomic on POSIX), so a
crash, Ctrl-C or error leaves either the old file or nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from protloc.errors import ProtlocError


def check_destination(path, force: bool) -> None:
    """Refuse to overwrite an existing file without `force`, and to write into a missing folder."""
    path = Path(path)
    if path.exists() and not force:
        raise ProtlocError(f"{path}: already exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise ProtlocError(f"{path}: folder {path.parent} does not exist")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """atomic_path for a folder output (a .zarr store): yield an empty temporary folder beside `path`;
    on success it takes `path`'s place (an old folder there is moved aside, then removed), on error
    it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield str(tmp)
        for root, _dirs, names in os.walk(tmp):  # data on disk before the rename makes it visible
            for name in names:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result gets a new folder's usual mode
        if path.is_dir():  # a rename cannot replace a folder that holds files: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():  # put the old folder back
            os.replace(old / path.name, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
