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
