"""The command line never loses data and ends every way with one line: convert's output rules, signals, extras.

Subprocesses run ``python -m fp4jax`` on files the tests write; in-process
``cli.main`` calls cover what needs no process of its own.
"""

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fp4jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("FP4JAX_TRACEBACK", None)


def run(*args, cwd=None, umask=None, block=(), check=False):
  """``python -m fp4jax ARGS``; ``block`` names modules made unimportable, as if not installed."""
  code = (f"import os, sys\nfor m in {list(block)!r}: sys.modules[m] = None\n"
          + (f"os.umask({umask})\n" if umask is not None else "")  # not preexec_fn: fork after JAX's threads
          + "from fp4jax.cli import main\nsys.exit(main())")
  p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                     cwd=cwd, timeout=300)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def one_line(p, rc=2):
  """The process exited ``rc`` with exactly one line on stderr (no traceback); returns the line."""
  lines = p.stderr.strip().splitlines()
  assert p.returncode == rc, p.stderr
  assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
  return lines[0]


@pytest.fixture
def src(tmp_path):
  path = tmp_path / "model.safetensors"
  rng = np.random.default_rng(0)
  save_file({"w": rng.standard_normal((16, 64)).astype(np.float32), "b": np.zeros(16, np.float32)}, str(path))
  return path


def state(directory):
  """Every file in ``directory`` with its bytes: what a refused or stopped command must leave as it was."""
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
          if (directory / name).is_file()}


# ---- convert's output: never the input, never silently over a file, normal permissions ----------


def test_convert_refuses_to_write_onto_its_input(src, tmp_path):
  os.symlink(src.name, tmp_path / "link.safetensors")
  os.link(src, tmp_path / "hard.safetensors")
  before = state(tmp_path)
  p = run("convert", src, src, "--format", "mxfp4", "--overwrite")
  assert one_line(p) == (f"fp4jax convert: error: the output {src} is the input file: writing it would destroy "
                         "the input; choose another output path")
  for same in ("link.safetensors", "hard.safetensors", f"./{src.name}"):
    p = run("convert", src.name, same, "--format", "mxfp4", "--overwrite", cwd=tmp_path)
    assert one_line(p).startswith(f"fp4jax convert: error: the output {same} is the input file"), same
  assert state(tmp_path) == before


def test_convert_replaces_an_existing_output_only_with_overwrite(src, tmp_path):
  dst = tmp_path / "out.safetensors"
  dst.write_bytes(b"precious")
  os.chmod(dst, 0o640)
  p = run("convert", src, dst, "--format", "mxfp4", "--no-progress")
  assert one_line(p) == f"fp4jax convert: error: {dst} exists; pass --overwrite to replace it"
  assert dst.read_bytes() == b"precious"
  run("convert", src, dst, "--format", "mxfp4", "--no-progress", "--overwrite", check=True)
  assert sorted(load_file(str(dst))) == ["b", "w_blocks", "w_scales"]
  assert stat.S_IMODE(os.stat(dst).st_mode) == 0o640  # as open() would leave the file it replaces
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "out.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_outputs_get_the_umask_permissions(src, tmp_path, umask):
  dst = tmp_path / "out.safetensors"
  run("convert", src, dst, "--format", "nvfp4", "--no-progress", umask=umask, check=True)
  assert stat.S_IMODE(os.stat(dst).st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_output_problems_are_one_line_before_any_work(src, tmp_path, capsys, monkeypatch):
  (tmp_path / "adir").mkdir()
  (tmp_path / "afile").write_bytes(b"x")
  monkeypatch.chdir(tmp_path)
  cases = {
      "missing/out.safetensors": "cannot write missing/out.safetensors: directory 'missing' does not exist",
      "adir": "adir is a directory, not a file: give the output file's name",
      "adir/": "adir/ is a directory, not a file: give the output file's name",
      "afile/out.safetensors": "cannot write afile/out.safetensors: 'afile' is not a directory",
  }
  for dst, message in cases.items():
    assert cli.main(["convert", src.name, dst, "--format", "mxfp4"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fp4jax convert: error: {message}\n", dst  # no progress bar: nothing ran
    assert captured.out == ""
  # As root every directory is writable; pretend it is not (the check is os.access).
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == "adir" else real_access(p, mode))
  assert cli.main(["convert", src.name, "adir/out.safetensors", "--format", "mxfp4"]) == 2
  assert capsys.readouterr().err == ("fp4jax convert: error: cannot write adir/out.safetensors: no permission "
                                     "to create files in directory 'adir'\n")
  assert sorted(os.listdir(tmp_path)) == ["adir", "afile", "model.safetensors"] and not os.listdir("adir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_unwritable_directory_for_real(src, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  try:
    p = run("convert", src, locked / "out.safetensors", "--format", "mxfp4")
    assert "no permission to create files in directory" in one_line(p)
  finally:
    os.chmod(locked, 0o755)


def test_bad_patterns_and_rules_are_one_line(src, tmp_path, capsys):
  dst = str(tmp_path / "o.safetensors")
  for flag, pattern in (("--include", "("), ("--exclude", "[a-")):
    assert cli.main(["convert", str(src), dst, "--format", "mxfp4", flag, pattern]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fp4jax convert: error: {flag} {pattern!r} is not a valid regular expression: ")
    assert err.count("\n") == 1
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# ---- every way a run ends --------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
  """Enough tensors that a convert runs for seconds."""
  path = tmp_path_factory.mktemp("big") / "big.safetensors"
  x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
  save_file({f"layers.{i}.w": x for i in range(400)}, str(path))
  return path


SIGNALS = {signal.SIGINT: (130, "interrupted (Ctrl-C)"), signal.SIGTERM: (143, "stopped by SIGTERM"),
           signal.SIGHUP: (129, "stopped by SIGHUP")}


@pytest.mark.parametrize("sig,existing,moment", [
    (signal.SIGINT, False, "created"), (signal.SIGINT, True, "writing"),
    (signal.SIGTERM, True, "created"), (signal.SIGTERM, False, "writing"),
    (signal.SIGHUP, False, "created"), (signal.SIGHUP, True, "writing")])
def test_a_signal_mid_convert_leaves_no_trace(big, tmp_path, sig, existing, moment):
  """The signal arrives as the temporary file appears, or once a megabyte is in it."""
  rc, words = SIGNALS[sig]
  dst = tmp_path / "out.safetensors"
  if existing:
    dst.write_bytes(b"the previous output")
  code = "import sys\nfrom fp4jax.cli import main\nsys.exit(main())"
  p = subprocess.Popen([sys.executable, "-c", code, "convert", str(big), str(dst), "--format", "nvfp4",
                        "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

  def temp_size():
    sizes = [os.stat(tmp_path / n).st_size for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    return sizes[0] if sizes else -1

  deadline = time.monotonic() + 240
  while temp_size() < (0 if moment == "created" else 1 << 20):
    assert p.poll() is None, p.communicate()[1]
    assert time.monotonic() < deadline
    time.sleep(0.005)
  p.send_signal(sig)
  _, err = p.communicate(timeout=120)
  assert p.returncode == rc, err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == (f"fp4jax convert: {words}: {dst} was not written "
                                          "(an existing file is unchanged)")
  assert os.listdir(tmp_path) == (["out.safetensors"] if existing else [])
  if existing:
    assert dst.read_bytes() == b"the previous output"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_exception_python_swallowed_still_stops_the_convert(src, tmp_path, capsys, monkeypatch, sig):
  """Python drops the exception a signal handler raises inside a garbage-collection callback or a
  __del__ ("Exception ignored in ..."): seen once in CI, where SIGTERM hit jax's GC callback and the
  convert went on to write its output. The signal is recorded and raised again at the next tensor."""
  from fp4jax.checkpoints import _safetensors

  dst = tmp_path / "out.safetensors"
  dst.write_bytes(b"the previous output")
  real_write = _safetensors.Writer.write
  swallowed = []

  def write(self, name, array):
    real_write(self, name, array)
    if not swallowed:
      swallowed.append(sig)
      try:  # the handler as Python runs it inside a GC callback: the exception goes nowhere
        cli._raise_signal(sig, None)
      except BaseException:  # noqa: BLE001
        pass

  monkeypatch.setattr(_safetensors.Writer, "write", write)
  rc, words = SIGNALS[sig]
  assert cli.main(["convert", str(src), str(dst), "--format", "mxfp4", "--no-progress", "--overwrite"]) == rc
  assert swallowed == [sig]
  assert capsys.readouterr().err.splitlines()[-1] == (f"fp4jax convert: {words}: {dst} was not written "
                                                       "(an existing file is unchanged)")
  assert dst.read_bytes() == b"the previous output"
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "out.safetensors"]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() put Python's back


def _convert_signalled_inside(arm, src, tmp_path, capsys, monkeypatch, sig):
  """``fp4jax convert`` with ``arm(deliver)`` run after each tensor is written, where ``deliver()`` does what
  Python does when ``sig`` arrives in the calling frame (at the first call only). The convert must stop with
  the signal's status and one line, print nothing as unraisable or as a traceback, write nothing, and put
  sys.unraisablehook back."""
  from fp4jax.checkpoints import _safetensors

  dst = tmp_path / "out.safetensors"
  real_write = _safetensors.Writer.write
  delivered = []

  def deliver():
    if not delivered:
      delivered.append(sig)
      cli._raise_signal(sig, sys._getframe())

  def write(self, name, array):
    real_write(self, name, array)
    arm(deliver)

  monkeypatch.setattr(_safetensors.Writer, "write", write)
  unraisable = []  # what Python would print as "Exception ignored in ..." with a traceback
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  rc, words = SIGNALS[sig]
  assert cli.main(["convert", str(src), str(dst), "--format", "mxfp4", "--no-progress"]) == rc
  assert delivered == [sig]
  assert unraisable == []
  assert sys.unraisablehook == unraisable.append  # main() put the hook back
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert err.splitlines()[-1] == f"fp4jax convert: {words}: {dst} was not written (an existing file is unchanged)"
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_gc_callback_prints_no_traceback_and_stops_the_convert(src, tmp_path, capsys,
                                                                                  monkeypatch, sig):
  """Seen on the H200: SIGINT landed in jax's GC callback; Python printed "Exception ignored" and a
  traceback. There the handler only records the signal; the convert stops at the next tensor."""
  import gc

  def arm(deliver):
    def in_gc_callback(phase, info):
      if phase == "start":
        deliver()

    gc.callbacks.append(in_gc_callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(in_gc_callback)

  _convert_signalled_inside(arm, src, tmp_path, capsys, monkeypatch, sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_weakref_callback_prints_no_traceback_and_stops_the_convert(src, tmp_path, capsys,
                                                                                       monkeypatch, sig):
  """Seen in CI: SIGINT landed in weakref.py's callback of a WeakValueDictionary, which no frame test
  recognises; Python printed "Exception ignored" and a traceback. main's unraisable hook drops it; the
  convert stops at the next tensor."""
  import weakref

  class Thing:
    pass

  def arm(deliver):
    thing = Thing()
    ref = weakref.ref(thing, lambda _: deliver())
    del thing  # the callback runs now, and what it raises goes to sys.unraisablehook
    assert ref() is None

  _convert_signalled_inside(arm, src, tmp_path, capsys, monkeypatch, sig)


def test_other_swallowed_exceptions_still_reach_the_unraisable_hook(src, tmp_path, monkeypatch):
  """Only a recorded signal's exception is dropped: a __del__ that fails for its own reasons is reported."""
  from fp4jax.checkpoints import _safetensors

  real_write = _safetensors.Writer.write

  class Broken:
    def __del__(self):
      raise RuntimeError("a finaliser's own bug")

  def write(self, name, array):
    real_write(self, name, array)
    Broken()

  monkeypatch.setattr(_safetensors.Writer, "write", write)
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  assert cli.main(["convert", str(src), str(tmp_path / "out.safetensors"), "--format", "mxfp4",
                   "--no-progress"]) == 0
  assert unraisable and all(isinstance(u.exc_value, RuntimeError) for u in unraisable)


def test_an_error_mid_convert_is_one_line_and_leaves_no_trace(src, tmp_path, capsys, monkeypatch):
  from fp4jax.checkpoints import _safetensors

  dst = tmp_path / "out.safetensors"
  calls = []

  def write(self, name, array):
    calls.append(name)
    if len(calls) == 2:
      raise RuntimeError("a bug")
    real_write(self, name, array)

  real_write = _safetensors.Writer.write
  monkeypatch.setattr(_safetensors.Writer, "write", write)
  assert cli.main(["convert", str(src), str(dst), "--format", "mxfp4", "--no-progress"]) == 1
  err = capsys.readouterr().err
  assert err == ("fp4jax convert: internal error: RuntimeError: a bug (FP4JAX_TRACEBACK=1 shows where; "
                 "please report it)\n")
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]

  def full(self, name, array):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(_safetensors.Writer, "write", full)
  assert cli.main(["convert", str(src), str(dst), "--format", "mxfp4", "--no-progress"]) == 2
  assert capsys.readouterr().err == "fp4jax convert: error: No space left on device\n"
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_a_closed_stdout_is_not_a_traceback(src):
  code = "import sys\nfrom fp4jax.cli import main\nsys.exit(main())"
  for args in (["report", "--no-plot", "--size", "512"], ["inspect", str(src)]):
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    p.stdout.close()  # `| head` that has read all it wants
    err = p.stderr.read()
    p.wait(timeout=300)
    assert p.returncode == 141 and err == "", (args, err)


# ---- extras ----------------------------------------------------------------------------------


def test_each_command_names_the_extra_it_needs(src, tmp_path):
  fix = "pip install 'fp4jax[cli]'"
  p = run("convert", src, tmp_path / "o.safetensors", "--format", "mxfp4", block=["tqdm"])
  assert one_line(p) == f"fp4jax convert: error: needs tqdm, which is not installed: {fix}"
  p = run("inspect", src, block=["safetensors"])
  assert one_line(p) == f"fp4jax inspect: error: needs safetensors, which is not installed: {fix}"
  p = run("convert", src, tmp_path / "o.safetensors", "--format", "mxfp4", block=["safetensors", "tqdm"])
  assert one_line(p) == f"fp4jax convert: error: needs safetensors and tqdm, which are not installed: {fix}"
  start = time.monotonic()
  p = run("report", "--out", tmp_path / "r.png", block=["matplotlib"])
  assert one_line(p) == (f"fp4jax report: error: the plot needs matplotlib, which is not installed: {fix} "
                         "(or pass --no-plot for the tables alone)")
  assert time.monotonic() - start < 60  # refused before the table (minutes at the default size on a slow CPU)
  p = run("report", "--no-plot", "--size", "512", block=["matplotlib"], check=True)
  assert "gaussian" in p.stdout
  p = run("--help", block=["matplotlib", "tqdm"], check=True)
  assert "The commands need the cli extra: pip install 'fp4jax[cli]'." in p.stdout
  assert "Not installed here: matplotlib, tqdm." in p.stdout
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
