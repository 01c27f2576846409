"""The one exception family the CLI turns into a one-line message and exit status 2.

Everything a user can cause by what they typed or pointed at (a bad config value, a missing model,
prompt file or weight file) raises a `UserError` subclass. Anything else is a bug and keeps its
traceback: the CLI never catches it.
"""


class UserError(Exception):
    """Bad input: printed as `shortft: error: <message>` with exit status 2."""


class ConfigError(UserError, ValueError):
    """A bad config key or value (unknown key, wrong type, not one of the choices, non-finite)."""


class MissingFileError(UserError, FileNotFoundError):
    """A model, prompt file, LoRA file, run folder or reward weight file that is not there."""


class RewardError(UserError):
    """A reward returned something training cannot use: not a (B,) float tensor, or no gradient."""


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal, or too many non-finite steps) after saving a checkpoint.
    The CLI prints the message (which names the command to resume) and exits with `status`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
