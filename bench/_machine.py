"""The line every benchmark's JSON carries about where it ran."""

import platform

import psutil
import torch


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}{gpu}")
