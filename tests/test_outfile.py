"""fp4jax.outfile: outputs checked before any work, written whole or not at all, with open()'s permissions."""

import os
import stat

import numpy as np
import pytest

from fp4jax import checkpoints, outfile


def test_check_output_names_the_path_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "d").mkdir()
  (tmp_path / "f").write_bytes(b"")
  os.symlink("f", tmp_path / "link")
  cases = {
      "d": "d is a directory, not a file: give the output file's name",
      "d/": "d/ is a directory, not a file: give the output file's name",
      "no/such/out.bin": "cannot write no/such/out.bin: directory 'no/such' does not exist",
      "f/out.bin": "cannot write f/out.bin: 'f' is not a directory",
  }
  for path, message in cases.items():
    with pytest.raises(ValueError) as e:
      outfile.check_output(path)
    assert str(e.value) == message
  with pytest.raises(ValueError, match=r"^the output link is the input file \(through a link: it is f\)"):
    outfile.check_output("link", inputs=["f"])
  outfile.check_output("f")  # an existing file is the caller's to refuse
  outfile.check_output("no/such/out.bin", create_dirs=True)  # "." is writable
  with pytest.raises(ValueError, match="'f' is not a directory"):
    outfile.check_output("f/x/out.bin", create_dirs=True)


def test_atomic_output_appears_only_complete(tmp_path):
  path = tmp_path / "out.bin"
  path.write_bytes(b"old")
  with pytest.raises(KeyboardInterrupt):
    with outfile.AtomicOutput(path) as f:
      f.write(b"partial")
      assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["out.bin"] and path.read_bytes() == b"old"
  with outfile.AtomicOutput(path) as f:
    f.write(b"new")
  assert os.listdir(tmp_path) == ["out.bin"] and path.read_bytes() == b"new"


def test_remove_pending_deletes_unfinished_temporary_files(tmp_path):
  out = outfile.AtomicOutput(tmp_path / "x")
  f = out.__enter__()
  f.write(b"a")
  outfile.remove_pending()  # what a signal handler that cannot unwind calls
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_are_what_open_gives(tmp_path, umask):
  old = os.umask(umask)
  try:
    with outfile.AtomicOutput(tmp_path / "new") as f:
      f.write(b"x")
    checkpoints.save(tmp_path / "x.safetensors", {"a": np.ones(3, np.float32)})
    (tmp_path / "kept").write_bytes(b"")
    os.chmod(tmp_path / "kept", 0o604)
    with outfile.AtomicOutput(tmp_path / "kept") as f:  # replacing a file keeps its mode, as open() does
      f.write(b"y")
  finally:
    os.umask(old)
  for name in ("new", "x.safetensors"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
  assert stat.S_IMODE(os.stat(tmp_path / "kept").st_mode) == 0o604


def test_errors_name_the_destination_never_the_temporary_file(tmp_path):
  with pytest.raises(ValueError, match="cannot write .*missing/x.safetensors: directory .* does not exist"):
    checkpoints.save(tmp_path / "missing" / "x.safetensors", {"a": np.ones(3, np.float32)})
  (tmp_path / "d").mkdir()
  with pytest.raises(ValueError, match=r"d is a directory"):
    checkpoints.save(tmp_path / "d", {"a": np.ones(3, np.float32)})
  assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_convert_refuses_its_input_and_bad_patterns_before_any_work(tmp_path):
  src = tmp_path / "m.safetensors"
  checkpoints.save(src, {"w": np.ones((4, 64), np.float32)})
  before = src.read_bytes()
  os.symlink("m.safetensors", tmp_path / "link.safetensors")
  for dst in (src, tmp_path / "link.safetensors"):
    with pytest.raises(ValueError, match="is the input file"):
      checkpoints.convert(src, dst, "mxfp4")
  with pytest.raises(ValueError, match=r"^exclude '\[a-' is not a valid regular expression: "):
    checkpoints.convert(src, tmp_path / "o.safetensors", "mxfp4", exclude="[a-")
  assert src.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["link.safetensors", "m.safetensors"]
