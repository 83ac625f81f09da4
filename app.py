#!/usr/bin/env python
"""SPLAM Studio: `python app.py` serves the comparison studio on http://127.0.0.1:7860 with the embedded Shapes models.

A front door for a checkout and a Hugging Face Space; the studio is `python -m splam_studio.studio`
(splam_studio/studio/app.py).
"""
import sys

from splam_studio.studio.app import main, parse_args  # noqa: F401  (tests read the parser)

if __name__ == "__main__":
    sys.exit(main())
