"""The one exception type for problems the user can fix (exit code 2, one line, no traceback)."""


class UserError(Exception):
    """Bad input: a missing file, an unsupported config, malformed data.

    The message is one sentence that names the file, key or value at fault.
    """
