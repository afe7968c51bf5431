"""The one exception type the CLI turns into a clean message instead of a traceback."""


class DataPrepError(Exception):
    """Bad user input or environment: the message names the file/flag and what to change."""
