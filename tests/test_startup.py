"""gkd.startup.xla_defaults: what it adds to XLA_FLAGS, and that it runs in time."""

import os
import subprocess
import sys

from gkd import startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_xla_defaults_append_but_never_override(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  startup.xla_defaults()
  assert os.environ["XLA_FLAGS"].split() == list(startup.XLA_DEFAULTS)
  startup.xla_defaults()  # idempotent
  assert os.environ["XLA_FLAGS"].split() == list(startup.XLA_DEFAULTS)
  name = startup.XLA_DEFAULTS[0].split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {name}=false")
  startup.xla_defaults()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {name}=false"


def test_no_entry_point_starts_the_jax_backend_on_import():
  """XLA reads XLA_FLAGS when the backend starts: importing the command lines and the
  bench scripts must not start it, or xla_defaults() would come too late."""
  code = ("import sys; sys.path.insert(0, 'bench')\n"
          "import gkd.main, gkd.demo, gkd.convert, gkd.vocab\n"
          "import decode, gkd_vs_trl, scaling, roofline, methods, losses, cross_tokenizer\n"
          "from jax._src import xla_bridge\n"
          "print(sorted(xla_bridge._backends))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
