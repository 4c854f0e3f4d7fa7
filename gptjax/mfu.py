"""Model FLOPs utilisation: achieved training FLOP/s over the devices' dense bf16 peak."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, matched against `device_kind`. Unknown devices (CPUs
# included) get no MFU rather than a wrong one.
PEAK_FLOPS = (
    ("h100 pcie", None),  # lower clocks than the SXM part; its peak is not in this table
    ("h100 nvl", None),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6", 918e12),
)


def device_peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak  # None for the parts listed without a peak
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int | None = None) -> float | None:
    peak = device_peak_flops()
    if peak is None:
        return None
    return flops_per_token * tokens_per_sec / (peak * (num_devices or jax.device_count()))
