"""Files and folders written whole or not at all: created exclusively by ``tempfile`` beside the
target as ``.NAME.lt-HOST-PID.RANDOM[.tmp]``, filled, and renamed into place. One left behind by
a killed process of this host is removed the next time NAME is written there. Stdlib only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO
from collections.abc import Callable

from lora_tune.errors import ConfigError

Content = bytes | str | Callable[[BinaryIO], None]
_TAG = "lt"
_NAME_CHARS = 80  # of the target's name in a temporary name (which must stay under NAME_MAX)


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _owner_prefix(name: str) -> str:
    return f".{name[:_NAME_CHARS]}.{_TAG}-{_host()}-"


def temp_prefix(name: str) -> str:
    """The start of this process's temporary names for a target called ``name``."""
    return f"{_owner_prefix(name)}{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale(folder: Path, name: str) -> list[str]:
    """Remove the temporary files and folders for ``name`` in ``folder`` that processes of this
    host which are gone left behind; returns their names."""
    if os.name != "posix":
        return []
    prefix = _owner_prefix(name)
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return []
    for entry in entries:
        pid, dot, rest = entry.name[len(prefix):].partition(".")
        if not (pid.isdigit() and dot and rest) or _alive(int(pid)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    return removed


def umask() -> int:
    try:  # Linux: read it without changing it (other threads may be creating files)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def stage_file(target: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` to a new temporary file beside ``target`` (mode as a new file's) and
    return its path; :func:`commit` puts it in place. Nothing is left behind on failure."""
    target = Path(target)
    folder = target.parent
    remove_stale(folder, target.name)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=folder)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, target: str | os.PathLike) -> bool:
    """Rename the staged ``tmp`` onto ``target`` (a symlink there is replaced, not followed);
    returns whether something was there before."""
    existed = os.path.lexists(target)
    os.replace(tmp, target)
    return existed


def write_atomic(target: str | os.PathLike, content: Content) -> bool:
    """Write ``target`` whole or not at all; returns whether it replaced an existing file."""
    tmp = stage_file(target, content)
    try:
        return commit(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def output_file(path: str | os.PathLike, field: str = "output") -> Path:
    """The regular file that writing ``path`` replaces (a symlink there is written through); a
    folder, a device or a missing folder is a ConfigError naming ``field``."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise ConfigError(field, str(path), "a file path (this is a directory)")
    if not target.parent.is_dir():
        raise ConfigError(field, str(path), "a file path in an existing directory")
    if os.path.lexists(target) and not target.is_file():  # never replace a device node or a FIFO
        raise ConfigError(field, str(path), "a regular file path (this is a device, FIFO or socket)")
    return target


def write_output(path: str | os.PathLike, content: Content, field: str = "output") -> tuple[Path, bool]:
    """Write the :func:`output_file` of ``path`` whole or not at all; it, and whether it replaced one."""
    target = output_file(path, field)
    try:
        return target, write_atomic(target, content)
    except OSError as exc:
        raise ConfigError(field, str(path), "a writable file path in an existing directory",
                          exc.strerror or str(exc)) from None


def stage_dir(target: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside ``target`` (stale ones of ``target`` removed)."""
    target = Path(target)
    remove_stale(target.parent, target.name)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))


def place_dir(staging: Path, target: str | os.PathLike, replace: bool = False) -> bool:
    """Rename the folder ``staging`` onto ``target`` (absent or empty; with ``replace``, a folder
    moved aside and put back if the rename fails, never a symlink); whether one was replaced."""
    target = Path(target)
    os.chmod(staging, 0o777 & ~umask())
    try:
        os.rename(staging, target)
        return False
    except OSError:
        if not replace or target.is_symlink() or not target.is_dir():
            raise
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    os.rename(target, aside)  # onto the empty folder just made
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return True


def output_dir(dest: str | os.PathLike, option: str, allowed: str,
               written_before: Callable[[Path, list[Path]], bool], parent_must_exist: bool = False) -> bool:
    """Check a folder an export writes (``option``: its command-line option): a new or an empty
    folder (False), or one an earlier export wrote (``written_before(path, entries)``: True, to be
    replaced); a symlink, a file, an unreadable folder or one holding other files is a ConfigError."""
    path = Path(dest)
    if path.name in ("", ".", ".."):
        raise ConfigError(option, str(dest), "a directory path ending in a folder name")
    if path.is_symlink():
        hint = (f"It is a symlink to {os.readlink(path)}" + ("" if path.exists() else ", which does not exist")
                + "; give the directory itself.")
        raise ConfigError(option, str(dest), allowed + " (not a symlink)", hint)
    if not os.path.lexists(path):
        if parent_must_exist and not path.parent.is_dir():
            raise ConfigError(option, str(dest), "a directory path whose parent folder exists")
        return False
    if not path.is_dir():
        raise ConfigError(option, str(dest), allowed, "It is not a directory.")
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise ConfigError(option, str(dest), allowed, exc.strerror or str(exc)) from None
    if not entries:
        return False
    if written_before(path, entries):
        return True
    shown = ", ".join(sorted(p.name for p in entries)[:5])
    raise ConfigError(option, str(dest), allowed, f"It holds other files: {shown}")
