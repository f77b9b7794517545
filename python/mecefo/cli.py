"""The console scripts ``mecefo-train`` and ``mecefo-demo``: :mod:`mecefo.launch`'s entry points, imported
here so that a Ctrl-C while torch is still importing (seconds on a busy machine) ends as quietly as one
during the run: one line, exit 130, no traceback. And the commands' argument parser, whose errors are
one line (:class:`OneLineErrors`)."""

from __future__ import annotations

import argparse
import sys

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), however far the command got
EXIT_USAGE = 2  # bad input (as argparse)


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose errors are one line, ``PROG: error: MESSAGE`` (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def config_error(self, error: ValueError):
        """A rejected value: one line naming the option when the error names its field."""
        field = getattr(error, "field", None)
        if field is None:
            self.error(str(error))
        option = next((a.option_strings[0] for a in self._actions if a.dest == field and a.option_strings),
                      "--" + field.replace("_", "-"))
        text = str(error)
        if text.startswith(f"{option} "):  # the message names the option already
            self.error(text)
        text = text[len(field) + 1:] if text.startswith(f"{field} ") else text
        self.error(f"argument {option}: {text}")


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
