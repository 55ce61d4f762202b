"""Run a test script in a subprocess on N fake CPU devices and read back its result.

XLA fixes the device count when the process starts, so the tests that need a
mesh of 8 devices run their body as a script (``--xla_force_host_platform_device_count``)
that prints one ``RESULT <json>`` line; the tests then check what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, devices: int = 8, timeout: float = 600) -> dict:
  """The JSON after the last ``RESULT `` line ``script`` prints; fails the test if the script fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                     timeout=timeout)
  assert p.returncode == 0, p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])
