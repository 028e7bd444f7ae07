"""Files stepd writes for itself: owner-only (0600) whatever the umask.

The database holds the webhook outbox with live approve links, and the other files
are secrets (token hash, signing keys), so no other user of the machine may read them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

PRIVATE = 0o600
log = logging.getLogger("stepd")


def tighten(path: str | os.PathLike[str]) -> None:
    """Make an existing file 0600; a missing file is left missing."""
    try:
        os.chmod(path, PRIVATE)
    except FileNotFoundError:
        pass
    except PermissionError:  # another user's file: say so, but it need not stop stepd
        log.warning("cannot make %s readable by its owner only (not ours)", path)


def create_private(path: str | os.PathLike[str]) -> None:
    """Make sure `path` exists and is 0600: created empty if missing, tightened if looser."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE)
    try:
        # The umask only ever removes bits; set the mode anyway, for an existing file.
        os.fchmod(fd, PRIVATE)
    except PermissionError:
        log.warning("cannot make %s readable by its owner only (not ours)", path)
    finally:
        os.close(fd)


def write_private(path: Path, text: str, *, keep_existing: bool = False) -> bool:
    """Write `text` to `path` as a 0600 file, atomically (a reader sees old or new).

    With `keep_existing`, a file that is already there wins (another process made it
    first) and False is returned.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), PRIVATE)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if not keep_existing:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists: never overwrite it
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)
