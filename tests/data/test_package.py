from __future__ import annotations

import subprocess
import sys


def test_package_import_stays_light() -> None:
    """The reward server and the synthetic generator import this package; torch/transformers would cost seconds."""
    code = "import sys, lmmrl_megatron.data; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
