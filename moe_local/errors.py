"""The one exception type for problems the user can fix (exit code 2, one line, no traceback)."""


class UserError(Exception):
    """Bad input: a missing file, an unsupported config, malformed data.

    The message is one sentence that names the file, key or value at fault.
    """


def first_non_finite(arrays) -> str | None:
    """The name of the first of ``arrays`` (name -> numpy array) holding a NaN or an infinite value."""
    import numpy as np

    return next((name for name, array in arrays.items() if not np.isfinite(array).all()), None)
