"""`vagrant validate` of vagrant/Vagrantfile (the VM matrix for hosts with KVM).

Host-side and slow to set up (vagrant + vagrant-libvirt from Debian), so the normal run skips it:
set VELO_MATRIX=1 (`make matrix` runs the same check and records it in docs/matrix.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("VELO_MATRIX") != "1", reason="VM matrix check: set VELO_MATRIX=1"
)

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrant_validate() -> None:
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed (apt-get install vagrant vagrant-libvirt)")
    env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt"}
    proc = subprocess.run(
        ["vagrant", "validate"], cwd=VAGRANT_DIR, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_vagrantfile_lists_every_local_box() -> None:
    """The Vagrantfile mirrors tools/matrix/boxes.py: every qemu box has a Vagrant twin."""
    import sys

    sys.path.insert(0, str(VAGRANT_DIR.parent / "tools" / "matrix"))
    from boxes import BOXES  # type: ignore[import-not-found]

    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    for b in BOXES:
        assert f'"{b.name}" =>' in text, b.name
