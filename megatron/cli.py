"""The one help format of the project's commands: the description as written (examples keep their line
breaks), and each option's default appended where it has one that its help text does not already state."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.required or not action.option_strings \
                or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """Bad command-line input is one line on stderr, ``<tool>: error: ... (--help lists the options)``, and exit
    status 2, like every other bad input of the project's tools (argparse prints a usage block first)."""

    def __init__(self, *args, tool: str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.tool = tool

    def error(self, message):
        import sys

        print(f"{self.tool}: error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
