"""The errors a user can act on. The CLI prints each as one message and exits 2; anything
else is a bug in difftune and keeps its traceback. This module imports nothing heavy, so
`except UserError` costs nothing on the fast paths (a config typo never imports torch)."""


class UserError(Exception):
    """Something the user can fix (a config key, a file, a flag, the disk); its message
    names what and how."""


class InputError(UserError, ValueError):
    """A path or argument given on the command line that cannot be used."""


class DataError(UserError, ValueError):
    """A dataset problem, naming the dataset, column, row or file."""
