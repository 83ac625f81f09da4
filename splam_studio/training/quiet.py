"""Library chatter a user cannot act on, filtered out of the command-line tools (the trainer and the studio).

Only messages matched by NOISE are dropped; every other warning of diffusers, transformers, torch and accelerate
still prints. `quiet_libraries()` is called once by each entry point, before the libraries are imported.
"""
from __future__ import annotations

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
    try:
        from diffusers.utils import logging as dlog

        dlog.get_logger("diffusers")  # creates the library's handler
        for h in logging.getLogger("diffusers").handlers:
            h.addFilter(drop)
        if not progress_bars:
            dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.get_logger("transformers")
        for h in logging.getLogger("transformers").handlers:
            h.addFilter(drop)
        if not progress_bars:
            tlog.disable_progress_bar()
    except ImportError:
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "0" if progress_bars else "1")
