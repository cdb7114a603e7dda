"""The one error type of bad input: what a user can fix.

Every deliberate check in jaxspec (a config value, a file, a shape, a checkpoint that does not fit) raises
`InputError` with a message that names the problem. The launch scripts print these as one line; any other
exception - a bug, or an error from inside JAX - keeps its traceback. It subclasses ValueError, so callers
that catch ValueError keep working.
"""


class InputError(ValueError):
    """Bad input; the message names the config key, the file or the shape, and what is allowed."""
