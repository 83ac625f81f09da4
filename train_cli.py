#!/usr/bin/env python
"""SPLAD distillation: `python train_cli.py --preset shapes --method splam`.

A front door for a checkout; the trainer is `python -m splam_studio.training` (splam_studio/training/cli.py).
"""
import sys

from splam_studio.training.cli import PRESETS, build_parser, main, resolve  # noqa: F401  (tests read the parser)

if __name__ == "__main__":
    sys.exit(main())
