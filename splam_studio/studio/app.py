"""SPLAM Studio: `python -m splam_studio.studio` (or `python app.py` in a checkout) serves the comparison studio on http://127.0.0.1:7860 with the embedded Shapes models.

Parse flags, build `splam_studio.studio.logic.Studio` and its Gradio UI (`splam_studio.studio.ui`), launch.
Local folders (teacher, students, training data) are accepted here only, never from the web page.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, and only when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from splam_studio.models.model_sets import MODEL_SETS  # a table only: no torch, no CUDA

    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--weights-dir", help="folder of runs (default: $SPLAM_WEIGHTS_DIR, else weights/ of the checkout, "
                                          "else ./weights: store.runs.weights_dir)")
    p.add_argument("--models", choices=sorted(MODEL_SETS), help="model set shown first (splam_studio/models/model_sets.py; "
                   "default: dreamshaper7 on a Hugging Face Space with a GPU, else shapes); --teacher / --splam / "
                   "--lcm replace its members")
    p.add_argument("--teacher", help="teacher: a run name under weights/, a hub id, or a local diffusers folder")
    p.add_argument("--splam", help="SPLAM student: a run name, a hub id (e.g. alimama-creative/slam-sd1.5) or a folder")
    p.add_argument("--lcm", help="LCM student: a run name, a hub id (e.g. SimianLuo/LCM_Dreamshaper_v7) or a folder")
    p.add_argument("--data-dir", action="append", default=[], metavar="[NAME=]PATH",
                   help="an image folder the Train tab may use (repeat the flag); the page only sees NAME")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--no-train", dest="train", action="store_false", default=None,
                       help="hide the Train tab (default on Hugging Face Spaces)")
    train.add_argument("--train", dest="train", action="store_true", help="show the Train tab even on Spaces")
    p.add_argument("--no-hub", action="store_true", help="refuse hub ids typed into the page")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond this are turned away")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="where models run")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores the machine's load leaves idle, at least 1; "
                   "or SPLAM_THREADS)")
    return p.parse_args(argv)


def _split_local(value: str | None, role: str, local: dict[str, Path]) -> str | None:
    """A flag value that is an existing path is registered as `local:<folder name>`; names pass through."""
    if value and Path(value).expanduser().exists():
        path = Path(value).expanduser().resolve()
        name = f"local:{path.name}" if f"local:{path.name}" not in local else f"local:{role}-{path.name}"
        local[name] = path
        return name
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from splam_studio.training.quiet import quiet_libraries

    quiet_libraries()  # only the warnings a user can act on
    from splam_studio.training.device import configure_threads

    configure_threads(args.threads)  # also inherited by the Train tab's trainer (SPLAM_THREADS)
    from splam_studio.studio.logic import Studio, StudioError
    from splam_studio.studio.ui import CSS, build_ui

    local: dict[str, Path] = {}
    teacher, splam, lcm = (_split_local(getattr(args, r), r, local) for r in ("teacher", "splam", "lcm"))
    data_dirs = {}
    for item in args.data_dir:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path).expanduser()
        if not path.is_dir():
            print(f"error: --data-dir {item!r} is not a folder", file=sys.stderr)
            return 2
        data_dirs[name or path.name] = path
    train = args.train if args.train is not None else "SPACE_ID" not in os.environ
    from splam_studio.models.model_sets import default_model_set

    try:
        studio = Studio.for_model_set(args.models or default_model_set(), args.weights_dir, teacher=teacher,
                                      splam=splam, lcm=lcm, local=local, data_dirs=data_dirs, device=args.device,
                                      allow_hub=not args.no_hub)
    except (StudioError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_ui(studio, train=train)
    demo.queue(default_concurrency_limit=2, max_size=args.max_queue)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, css=CSS,
                    footer_links=["api", "settings"])
    except OSError as e:  # port taken, or no share tunnel offline
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
