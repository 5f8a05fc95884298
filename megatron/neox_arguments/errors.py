"""The single exception type raised for bad configuration input."""


class ConfigError(ValueError):
    """A configuration problem found before (or while) starting a run.

    The message always names the offending key, file, host or value, so that the user can fix the
    input without reading a traceback.
    """
