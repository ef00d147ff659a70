"""`--device` and `--dtype`: one parser, one validation and one report entry for every command.

Values are validated in the command's handler, before any long work, so a bad
one is a `ValueError` that `frugalvit.cli.main` prints as one line (exit code 2)
instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_HELP = "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)"


def add_device_arguments(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """Add `--device` and `--dtype` (default float32); `dtype_help` says what the dtype applies to."""
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="float32", metavar="{" + ",".join(sorted(DTYPES)) + "}",
                        help=f"{dtype_help} (default: %(default)s)")


def resolve_device(name: str | None) -> torch.device:
    """The requested torch device (default: cuda if available, else cpu); ValueError if it cannot be used."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype named by `--dtype`; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from `args.device` and `args.dtype`, both validated."""
    return resolve_device(args.device), resolve_dtype(args.dtype)


def device_name(device: torch.device) -> str:
    """The accelerator's name on CUDA (e.g. 'NVIDIA H100 80GB HBM3'), else the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def device_report(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The entries every JSON report carries: device, device_name, dtype and torch version."""
    return {"device": str(device), "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__}


def training_precision(dtype: torch.dtype) -> str:
    """How a training command runs in `dtype`: weights stay float32, half dtypes through torch.autocast."""
    return "float32" if dtype == torch.float32 else "mixed (torch.autocast), float32 weights"


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for the console, e.g. 'cpu (x86_64), bfloat16, torch 2.5.1'."""
    entries = device_report(device, dtype)
    return f"{entries['device']} ({entries['device_name']}), {entries['dtype']}, torch {entries['torch']}"
