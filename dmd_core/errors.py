"""The one exception type the command line turns into a short message and a non-zero exit."""


class InputError(Exception):
    """Bad or missing input: the message names the problem and the fix."""



def shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters: user input (a prompt, a config value,
    a path) can be megabytes or a YAML alias bomb, and one line must stay one readable line. reprlib bounds
    the work as well as the text (it never walks more than a few items per level)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
