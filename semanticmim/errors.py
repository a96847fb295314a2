"""The one exception type for bad user input: its message is a single line naming what was wrong."""


class InputError(ValueError):
    """Bad input (argument, file, key, layout). The CLI prints it as one line and exits with code 2."""
