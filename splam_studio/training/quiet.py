"""Library chatter a user cannot act on, filtered out of the command-line tools (the trainer and the studio).

Only messages matched by NOISE are dropped; every other warning of diffusers, transformers, torch and accelerate
still prints. `quiet_libraries()` is called once by each entry point, before the libraries are imported.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import warnings

NOISE = re.compile(
    r"safety checker|safety_checker"  # the Shapes teacher has none, by design
    r"|should be kept in float32"  # diffusers' dtype notice, printed with an empty list
    r"|requires torchvision|torchvision is not available"  # image processors the project never uses
    r"|`torch_dtype` is deprecated"  # diffusers' rename; the project passes what the installed version takes
    r"|feature_extractor"
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not NOISE.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to judge
            return True


def quiet_libraries(progress_bars: bool = False) -> None:
    """Drop NOISE from the diffusers / transformers loggers and Python warnings; hide model-loading bars."""
    warnings.filterwarnings("ignore", message=NOISE.pattern)
    drop = _DropNoise()
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).addFilter(drop)
    for lib in ("diffusers", "transformers"):  # their own handlers: filter them, and their progress bars
        try:
            lib_logging = importlib.import_module(f"{lib}.utils.logging")
        except ImportError:
            continue
        lib_logging.get_logger(lib)  # creates the library's handler
        for h in logging.getLogger(lib).handlers:
            h.addFilter(drop)
        if not progress_bars:
            lib_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "0" if progress_bars else "1")
