"""Thread settings made before torch loads: bounded spinning unless the environment chose, and
a server's learner child running with the server's settings."""

from __future__ import annotations

import subprocess
import sys

from chatbot import threads


def test_spinning_is_bounded_unless_the_environment_chose():
    environ: dict[str, str] = {}
    assert threads.bound_spinning(environ) == str(threads.SPIN_COUNT)
    assert environ == {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(chosen)
        assert threads.bound_spinning(environ) is None and environ == chosen


def test_the_entry_points_settle_the_environment_before_torch_loads():
    # libgomp reads its variables once, when torch loads it: app.py and the learner must not
    # import torch before their main() has set them.
    for module in ("app", "learner.__main__"):
        check = f"import sys, {module}; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                             check=True, cwd=threads.__file__.rsplit("/chatbot/", 1)[0])
        assert out.stdout.strip() == "False", f"importing {module} loads torch"
