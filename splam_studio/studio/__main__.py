"""`python -m splam_studio.studio ...`: serve the studio (flags: splam_studio/studio/app.py)."""
import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
