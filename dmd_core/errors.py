"""The one exception type the command line turns into a short message and a non-zero exit."""


class InputError(Exception):
    """Bad or missing input: the message names the problem and the fix."""


def shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters: user input (a prompt, a config value,
    a path) can be megabytes, and one line must stay one readable line."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(str(value)):,} chars)"
