"""Devices and precision: the one place that turns `train.device` and `train.precision` into torch objects.

    resolve_device("auto")                 -> cuda when one is visible, else cpu
    autocast_dtype_for("bf16")             -> torch.bfloat16; "fp32" -> None (no autocast)
    autocast_dtype_for("auto", device)     -> bf16 where the hardware has fast bf16, else None
    with autocast(device, dtype): ...      # torch.autocast, off when dtype is None
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


class DeviceError(RuntimeError):
    """A device setting this machine cannot honour; the message names the setting and the fix."""


def resolve_device(name: str | torch.device, setting: str = "train.device") -> torch.device:
    """`auto` -> cuda when a CUDA device is visible, else cpu; a CUDA device without CUDA is a
    `DeviceError` naming `setting`."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{setting}={name} but no CUDA device is visible: use {setting}=cpu or auto")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` has fast bf16 matrix products (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    for fn in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, fn, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # private API: never fail because of it
            pass
    return False


def autocast_dtype_for(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision setting: "bf16" -> bfloat16, "fp32" -> None (full precision),
    "auto" -> bfloat16 where `device` supports it fast (`bf16_supported`), else None."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device is None:
            raise ValueError("autocast_dtype_for('auto') needs the device")
        return torch.bfloat16 if bf16_supported(torch.device(device)) else None
    if precision == "fp32":
        return None
    raise ValueError(f"unknown precision {precision!r}: use bf16, fp32 or auto")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` in `dtype`; disabled (full precision) when `dtype` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


__all__ = ["DeviceError", "autocast", "autocast_dtype_for", "bf16_supported", "resolve_device"]
