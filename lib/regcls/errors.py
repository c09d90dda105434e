"""The one exception the library raises for bad input: its message is a single line that says what to do."""


class RegclsError(Exception):
    """A user-facing error; the CLI prints ``error: <message>`` and exits with status 2."""
