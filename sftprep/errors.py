"""What the user can fix, told apart from bugs.

    UserError                 the CLIs print its message on one line and exit 2
      ConfigError  (ValueError)    a setting is wrong: names the YAML key / flag and the fix
      InputError   (ValueError)    an input file or build folder is not what it should be
      RecordError  (ValueError)    a bad record under `on_error: fail` (message starts with file:line)
      BuildError   (RuntimeError)  the build ran but its result must not be used
      MissingExtra (ImportError)   an optional dependency is not installed: names the extra

Everything else (a plain `ValueError`, `KeyError`, ...) is a bug in sftprep / sfttrain and keeps its
traceback. `FileNotFoundError` and `PermissionError` are user errors too: the path is in the message.
Both packages (and both command lines) use these classes.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message says what, the value involved, and how."""


class ConfigError(UserError, ValueError):
    """A setting is wrong; the message lists every problem and how to fix it."""

    @classmethod
    def listing(cls, what: str, problems: list[str]) -> "ConfigError":
        """One error for every problem found in `what` ("build config"): one line for one problem, else
        one line per problem."""
        if len(problems) == 1:
            return cls(f"invalid {what}: {problems[0]}")
        return cls(f"invalid {what}:\n  - " + "\n  - ".join(problems))


class InputError(UserError, ValueError):
    """An input file, shard or build folder is unreadable or not what the command expects."""


class RecordError(UserError, ValueError):
    """A bad record under `--on-error fail`: the message starts with file:line."""


class BuildError(UserError, RuntimeError):
    """The build ran but its result must not be used (e.g. too many rejected records)."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is missing; the message names the `pip install` that adds it."""


USER_ERRORS = (UserError, FileNotFoundError, PermissionError)
"""What a command line prints as one line (exit 2); anything else is a bug and keeps its traceback."""
