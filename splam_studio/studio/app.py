"""SPLAM Studio: `python -m splam_studio.studio` (or `python app.py` in a checkout) serves the comparison studio on http://127.0.0.1:7860 with the embedded Shapes models.

Parse flags, build `splam_studio.studio.logic.Studio` and its Gradio UI (`splam_studio.studio.ui`), launch.
Local folders (teacher, students, training data) are accepted here only, never from the web page.

Served to strangers (a Space, --host 0.0.0.0, --share) the studio sets its limits in one place (`serve_limits`):
the Host header must name this machine (DNS rebinding), request bodies and files are capped, the upload route is
closed (the page has no file input), and training from the page is off unless --allow-train; then each run belongs
to the browser session that started it, under a disk quota. Trainer children end with the studio (atexit, SIGTERM).
"""
from __future__ import annotations

import argparse
import atexit
import fnmatch
import logging
import os
import signal
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUEST_MB = 1.0  # a compare request is a few hundred bytes; the page sends no files
MAX_FILE_SIZE = "1mb"  # gradio's own cap on a file in a request (the upload route is closed besides)
SHARED_QUOTA_MB = 2048.0  # disk for the runs started from the page of a shared server, unless --train-quota-mb


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
                   help="an image folder, or a prompts file (.txt / .jsonl, one prompt a line), the Train tab may "
                        "use (repeat the flag); the page only sees NAME")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--no-train", dest="train", action="store_false", default=None,
                       help="hide the Train tab (default on Hugging Face Spaces, --host 0.0.0.0 and --share)")
    train.add_argument("--allow-train", "--train", dest="train", action="store_true",
                       help="show the Train tab on a shared server too (a Space, --host 0.0.0.0, --share): each run "
                            "belongs to the browser session that started it, one per visitor, under --train-quota-mb")
    p.add_argument("--train-quota-mb", type=float, help="disk that the runs started from the page may fill in all "
                   f"(default: {SHARED_QUOTA_MB:g} on a shared server, else no limit; 0 = no limit)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="a name this server is reached by, besides this machine's names and addresses (repeat; "
                        "'*.example.org' patterns; '*' turns the Host check off); other Host headers get 400")
    p.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB,
                   help="larger request bodies are refused (413)")
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


def shared_server(host: str, share: bool) -> bool:
    """Whether strangers can reach the studio: a Hugging Face Space, a public share link, a non-loopback bind."""
    return "SPACE_ID" in os.environ or share or host not in LOOPBACK


def page_training(args: argparse.Namespace) -> tuple[bool, float | None]:
    """(the Train tab is shown, the disk quota in MB of its runs or None): on a shared server off unless
    --allow-train, and then under SHARED_QUOTA_MB unless --train-quota-mb (0: none)."""
    shared = shared_server(args.host, args.share)
    train = args.train if args.train is not None else not shared  # strangers train only with --allow-train
    quota = args.train_quota_mb if args.train_quota_mb is not None else (SHARED_QUOTA_MB if shared else None)
    return train, (quota or None)


def allowed_hosts(host: str, extra: list[str], share: bool) -> list[str]:
    """Host header values this server answers: loopback names, this machine's names and interface addresses, the
    bound host, a Space's own host, the share tunnel's, and --allowed-host."""
    import socket

    names = {*LOOPBACK, host, socket.gethostname(), socket.getfqdn()}
    try:
        import psutil

        names |= {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family in (socket.AF_INET, socket.AF_INET6)}
    except Exception:  # noqa: BLE001 - an unreadable interface list leaves the names above
        pass
    if os.environ.get("SPACE_HOST"):
        names |= {os.environ["SPACE_HOST"], "*.hf.space"}
    if share:
        names.add("*.gradio.live")
    return sorted(n.lower() for n in names | set(extra) if n and n not in ("0.0.0.0", "::"))


def has_file_input(demo) -> bool:
    """Whether any event of the app takes a component that uploads files (an Image, File, Gallery, ... as input)."""
    for fn in demo.fns.values():
        for comp in fn.inputs:
            events = [getattr(e, "event_name", e) for e in getattr(comp, "EVENTS", [])]
            if "upload" in events and getattr(comp, "interactive", None) is not False:
                return True
    return False


class ServeLimits:
    """ASGI middleware, the studio's one place for request limits: a Host header that names this server (else 400),
    a request body of at most `max_body` bytes (else 413, counted as it streams in), the upload route closed (404)
    when the app has no file input."""

    def __init__(self, app, *, hosts: list[str], max_body: int, uploads: bool):
        self.app, self.hosts, self.max_body, self.uploads = app, hosts, max_body, uploads

    def host_ok(self, value: str) -> bool:
        if "*" in self.hosts:
            return True
        value = value.strip().lower()
        name = value[1:].split("]")[0] if value.startswith("[") else value.rsplit(":", 1)[0] if value.count(":") == 1 \
            else value
        return any(fnmatch.fnmatchcase(name, h) if "*" in h else name == h for h in self.hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.host_ok(headers.get("host", "")):
            return await _plain(send, scope, 400, b"Invalid host header")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.uploads and scope.get("path", "").rstrip("/").endswith("/upload"):
            return await _plain(send, scope, 404, b"Not found: this app takes no files")
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _plain(send, scope, 400, b"Invalid content-length")
        if declared > self.max_body:
            return await _plain(send, scope, 413, b"Request body too large")
        received, too_large, started = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    too_large = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer 413 below
            return message

        async def tracked_send(message):
            nonlocal started
            if too_large and not started:
                return  # the app's answer to the cut-off body is replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:  # noqa: BLE001 - a body cut off mid-read: the app may raise on the disconnect
            if not too_large:
                raise
        if too_large and not started:
            await _plain(send, scope, 413, b"Request body too large")


async def _plain(send, scope, status: int, body: bytes) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def outermost(middleware, **kwargs):
    """A lifespan that wraps the app's whole middleware stack in `middleware` at startup, before the first request:
    outside gradio's own CORS middleware too, so that a refused request gets no CORS headers (no echoed origin)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        app.middleware_stack = middleware(app.middleware_stack or app.build_middleware_stack(), **kwargs)
        yield

    return lifespan


def end_children_on_exit(trainer) -> None:
    """The trainer's children end with the studio: at interpreter exit, and on SIGTERM (which closes the server
    as Ctrl-C does, then exits)."""
    atexit.register(trainer.shutdown)

    def on_term(signum, frame):
        trainer.shutdown()
        raise KeyboardInterrupt  # gradio's launch loop closes the server on it; main() then returns

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (main() called from a thread): atexit still ends them
        pass


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
        if not (path.is_dir() or (path.is_file() and path.suffix in (".txt", ".jsonl"))):
            print(f"error: --data-dir {item!r} is neither a folder nor a prompts file (.txt, .jsonl)", file=sys.stderr)
            return 2
        data_dirs[name or path.name] = path
    shared = shared_server(args.host, args.share)
    train, quota = page_training(args)
    from splam_studio.models.model_sets import default_model_set

    try:
        studio = Studio.for_model_set(args.models or default_model_set(), args.weights_dir, teacher=teacher,
                                      splam=splam, lcm=lcm, local=local, data_dirs=data_dirs, device=args.device,
                                      allow_hub=not args.no_hub, train_shared=shared,
                                      train_quota_mb=quota)
    except (StudioError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    end_children_on_exit(studio.trainer)
    demo = build_ui(studio, train=train)
    demo.queue(default_concurrency_limit=2, max_size=args.max_queue)
    limits = outermost(ServeLimits, hosts=allowed_hosts(args.host, args.allowed_host, args.share),
                       max_body=int(args.max_request_mb * 2**20), uploads=has_file_input(demo))
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, css=CSS,
                    footer_links=["api", "settings"], max_file_size=MAX_FILE_SIZE,
                    app_kwargs={"lifespan": limits})
    except OSError as e:  # port taken, or no share tunnel offline
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
