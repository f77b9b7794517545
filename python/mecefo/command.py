"""What every mecefo command shares, below all of them: exit codes and an argument parser whose errors are
one line. Nothing here imports the rest of the package, so any module may import it."""

from __future__ import annotations

import argparse

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
