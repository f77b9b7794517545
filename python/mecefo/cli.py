"""The console scripts ``mecefo-train`` and ``mecefo-demo``: :mod:`mecefo.launch`'s entry points, imported
here so that a Ctrl-C while torch is still importing (seconds on a busy machine) ends as quietly as one
during the run: one line, exit 130, no traceback. (The commands' one-line-error parser and exit codes
live in :mod:`mecefo.command`, below every module.)"""

from __future__ import annotations

import sys

from .command import EXIT_INTERRUPTED


def _run(prog: str, entry: str) -> int:
    try:
        from . import launch

        return getattr(launch, entry)()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED


def train_main() -> int:
    return _run("mecefo-train", "train_main")


def demo_main() -> int:
    return _run("mecefo-demo", "demo_main")
