"""The one exception type the command line turns into a short message and a non-zero exit."""


class InputError(Exception):
    """Bad or missing input: the message names the problem and the fix."""
