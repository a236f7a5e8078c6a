"""Smoke test of an installed trainact wheel: what a user gets from ``pip install trainact``.

    python -m venv env && env/bin/pip install torch==2.13.0 "dist/trainact-*.whl[experiments]"
    cd /somewhere/else && /path/to/env/bin/python tools/smoke_wheel.py

Run it from outside the repository with the environment's Python: it refuses a trainact
imported from a source tree, then checks the licence and ``py.typed``, one TrAct step against
the float64 reference, and the ``trainact`` command.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import torch

import trainact
from trainact.testing import reference_tract_grad, relative_error


def check_installed() -> None:
    """The package is the installed wheel's, with its version, licence and py.typed."""
    location = Path(trainact.__file__).resolve()
    if "site-packages" not in location.parts:
        sys.exit(f"trainact imported from {location}, not from an installed wheel")
    version = metadata.version("trainact")
    if trainact.__version__ != version:
        sys.exit(f"trainact.__version__ is {trainact.__version__}, the wheel says {version}")
    files = [str(f) for f in metadata.files("trainact") or []]
    if not any(f.endswith("licenses/LICENSE") for f in files):
        sys.exit(f"no LICENSE in the wheel's metadata: {files}")
    if not resources.files("trainact").joinpath("py.typed").is_file():
        sys.exit("no py.typed in the installed package")
    harness = [f for f in files if f.startswith("testing/")]
    if harness:  # the repository-root test harness stays out of the wheel
        sys.exit(f"the wheel ships the test harness: {harness}")
    if "trainact.experiments" in sys.modules:
        sys.exit("import trainact.testing imported trainact.experiments")
    print(f"trainact {version} from {location.parent} (LICENSE, py.typed)")


def check_one_step(lam: float = 0.1) -> None:
    """One backward through a Conv2d with TrAct gives G·(XᵀX/n + λI)⁻¹ (float64 reference)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    plain = copy.deepcopy(conv)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2.0 + 0.5
    plain(x).square().sum().backward()

    assert trainact.apply(conv, lam=lam) == ""
    conv(x).square().sum().backward()
    expected = reference_tract_grad(conv, x, plain.weight.grad, lam)
    error = relative_error(conv.weight.grad, expected)
    if not error < 1e-10:
        sys.exit(f"TrAct's gradient is off the reference by {error:.2e} (relative)")
    if not relative_error(plain.weight.grad, expected) > 1e-3:
        sys.exit("the reference equals the plain gradient: the check would not catch a no-op")
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    trainact.remove(conv)
    print(f"one TrAct step on a Conv2d: relative error {error:.1e} against the reference")


def check_command() -> None:
    """The console script starts and prints its subcommands."""
    script = Path(sys.executable).with_name("trainact")
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or "compare" not in run.stdout:
        sys.exit(f"trainact --help failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    print(f"{script.name} --help: {run.stdout.splitlines()[0]}")


if __name__ == "__main__":
    check_installed()
    check_one_step()
    check_command()
    print("wheel smoke test passed")
