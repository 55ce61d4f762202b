"""Output files as a user expects them: checked before any work, written whole or not at all.

:func:`check_output` finds what would stop a file from being written (its
directory is missing or not writable, the path is a directory, it is one of
the inputs, through links too) and says so with the path as the caller gave
it, before any work is done. :class:`AtomicOutput` writes a temporary file
next to the destination and renames it over the destination only when the
write is complete; on any exception it removes the temporary file, so the
destination is either the old file (or absent) or the complete new one.

The new file gets the permissions ``open()`` would give it: those of the file
it replaces, or ``0o666`` less the process umask for a new file (``mkstemp``'s
``0o600`` does not leak through the rename). A symlink at the destination is
replaced by the new file; its target is left alone.

A process killed outright (``SIGKILL``, the OOM killer) runs no cleanup: it
leaves the destination as it was plus a ``.NAME.PID-XXXXXXXX.tmp`` file beside
it. Other signals are the caller's to turn into exceptions (the ``fp4jax``
command does); :func:`remove_pending` deletes every temporary file this
process still has open, for a signal handler that cannot unwind.
"""

from __future__ import annotations

import os
import secrets
import stat

__all__ = ["check_output", "new_file_mode", "AtomicOutput", "remove_pending"]

# Temporary files created and not yet renamed or removed, by absolute path.
_PENDING: set[str] = set()


def _directory(path: str) -> str:
  return os.path.dirname(path) or os.curdir


def _describe_dir(d: str) -> str:
  return "the current directory" if d == os.curdir else f"directory {d!r}"


def check_output(path, *, inputs=(), create_dirs: bool = False) -> None:
  """Raises ValueError, naming ``path`` as given, if a file cannot be written there.

  Args:
    path: the destination file.
    inputs: paths the same run reads; ``path`` must not be one of them (the
      same file by ``os.path.samefile``: through symlinks and hard links too).
    create_dirs: the writer creates missing directories (then the nearest
      existing one must be a writable directory).

  An existing ``path`` is allowed (it will be replaced); refusing it is the
  caller's choice.
  """
  path = os.fspath(path)
  if path == "" or path.endswith(os.sep) or os.path.isdir(path):
    raise ValueError(f"{path or repr(path)} is a directory, not a file: give the output file's name")
  for src in inputs:
    src = os.fspath(src)
    if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
      same = "" if os.path.abspath(path) == os.path.abspath(src) else f" (through a link: it is {src})"
      raise ValueError(f"the output {path} is the input file{same}: writing it would destroy the input; "
                       "choose another output path")
  d = _directory(path)
  if create_dirs:
    while not os.path.lexists(d) and _directory(d) != d:
      d = _directory(d)
  if not os.path.exists(d):
    raise ValueError(f"cannot write {path}: {_describe_dir(d)} does not exist")
  if not os.path.isdir(d):
    raise ValueError(f"cannot write {path}: {d!r} is not a directory")
  if not os.access(d, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write {path}: no permission to create files in {_describe_dir(d)}")


def _umask() -> int:
  # The only portable way to read the umask sets it; another thread creating a file in between
  # would get 0o022 for that instant.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def new_file_mode(path) -> int:
  """The permission bits ``open(path, "w")`` would leave: an existing regular file's, else 0o666 & ~umask."""
  try:
    st = os.lstat(path)
  except OSError:
    st = None
  if st is not None and stat.S_ISREG(st.st_mode):
    return stat.S_IMODE(st.st_mode)
  return 0o666 & ~_umask()


class AtomicOutput:
  """A binary file at ``path`` that appears only complete: ``with AtomicOutput(path) as f: f.write(...)``.

  Inside the ``with`` block ``f`` is a temporary file in ``path``'s
  directory; a clean exit flushes it to disk and renames it onto ``path``, any
  exception (``KeyboardInterrupt`` included) deletes it. An ``OSError``'s
  message names ``path``, never the temporary file.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self.tmp = None
    self.file = None

  def __enter__(self):
    d = _directory(self.path)
    tmp = os.path.abspath(os.path.join(d, f".{os.path.basename(self.path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp"))
    mode = new_file_mode(self.path)
    _PENDING.add(tmp)  # before it exists: a signal handler may run right after os.open
    self.tmp = tmp
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
      _PENDING.discard(tmp)
      raise OSError(e.errno, f"cannot write {self.path}: {e.strerror}") from None
    try:
      self.file = os.fdopen(fd, "wb")  # owns fd from here on
      if hasattr(os, "fchmod"):
        os.fchmod(self.file.fileno(), mode)
      else:  # Windows
        os.chmod(tmp, mode)
    except BaseException:
      if self.file is None:
        _close_quietly(lambda: os.close(fd))
      self._discard()
      raise
    return self.file

  def _discard(self):
    """Closes and deletes the temporary file; never raises (it runs while another exception is on its way)."""
    if self.file is not None:
      _close_quietly(self.file.close)
    try:
      os.unlink(self.tmp)
    except OSError:
      pass
    _PENDING.discard(self.tmp)

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self._discard()
      return
    try:
      self.file.flush()
      os.fsync(self.file.fileno())
      self.file.close()
      os.replace(self.tmp, self.path)
    except OSError as e:
      self._discard()
      raise OSError(e.errno, f"cannot write {self.path}: {e.strerror}") from None
    except BaseException:
      self._discard()
      raise
    _PENDING.discard(self.tmp)


def _close_quietly(close) -> None:
  try:
    close()
  except OSError:
    pass


def remove_pending() -> None:
  """Deletes every temporary file of an :class:`AtomicOutput` this process has not finished."""
  for tmp in list(_PENDING):
    try:
      os.unlink(tmp)
    except OSError:
      pass
    _PENDING.discard(tmp)
