"""``quantad top``: a live view of the daemon, redrawn every ``--interval`` seconds with curses (stdlib).

Each refresh asks the daemon three questions over the agent socket (``stats``, ``workers``,
``ps``) and draws ``views.top_screen``; ``q`` quits.  ``--once`` prints that screen once and
``--json`` the raw answers, for scripts.
"""

from __future__ import annotations

import curses
import json
import shutil
import sys
from typing import Any

from console import views
from ipc import protocol as P
from ipc.client import Client, ClientError

QUIT_KEYS = {ord("q"), ord("Q")}


def snapshot(client: Client, timeout: float = 5.0) -> dict[str, Any]:
    return {
        "stats": client.call(P.OP_STATS, timeout),
        "workers": client.call(P.OP_WORKERS, timeout)["workers"],
        "ps": client.call(P.OP_PS, timeout),
    }


def run(endpoint: str | None, interval: float, once: bool = False, as_json: bool = False) -> int:
    with Client(endpoint) as client:
        if as_json or once:
            snap = snapshot(client)  # no daemon: TimeoutError, reported by the CLI (exit 3)
            if as_json:
                print(json.dumps(snap, indent=2))
            else:
                print("\n".join(views.top_screen(snap, shutil.get_terminal_size((160, 40)).columns)))
            return 0
        if not sys.stdout.isatty() or not sys.stdin.isatty():
            print("quantad top: needs a terminal; use --once or --json for a snapshot", file=sys.stderr)
            return 2
        return curses.wrapper(_loop, client, interval)


def _loop(screen: curses.window, client: Client, interval: float) -> int:
    try:
        curses.curs_set(0)
    except curses.error:  # some terminals cannot hide the cursor
        pass
    screen.timeout(max(50, int(interval * 1000)))  # getch waits this long for a key: the refresh period
    footer = f"q: quit   refresh every {interval:g} s"
    wait = min(5.0, max(1.0, 2 * interval))  # a daemon gone quiet must not freeze the screen for long
    while True:
        try:
            snap, error = snapshot(client, wait), None
        except (TimeoutError, ClientError) as exc:
            snap, error = None, str(exc)
        height, width = screen.getmaxyx()
        screen.erase()
        for y, line in enumerate(views.top_screen(snap, width - 1, height, error, footer)[:height]):
            try:
                screen.addstr(y, 0, line)
            except curses.error:  # the last cell of the screen, or a resize in between
                pass
        screen.refresh()
        if screen.getch() in QUIT_KEYS:
            return 0
