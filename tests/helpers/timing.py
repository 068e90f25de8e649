"""Latency promises in tests, and the one knob for machines slower than the ones promised for.

A test that checks a promised bound (the shim's live view lags ≤ 1 s) asserts against
`bound(seconds)`: the promise itself, multiplied by VELO_TEST_TIME_SCALE when that is set. Only
`make matrix` sets it, for guests under qemu's software emulation (TCG), where Python runs about
15× slower than on the host (measured: importing the shim daemon takes 0.85–1.15 s there without
bytecode, against 0.05 s on the host). CI and real machines check the promise unscaled.
"""

from __future__ import annotations

import os


def bound(seconds: float) -> float:
    raw = os.environ.get("VELO_TEST_TIME_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"VELO_TEST_TIME_SCALE={raw!r} is not a number") from None
    if not scale >= 1:
        raise ValueError(f"VELO_TEST_TIME_SCALE={raw!r} must be ≥ 1 (it only loosens bounds)")
    return seconds * scale
