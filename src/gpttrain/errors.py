"""The project's error types: each carries one message a user can act on."""


class GpttrainError(Exception):
    """A refusal with a message that names the thing (file, flag, value) and what to do.

    The CLI prints it as one line on stderr and exits with status 2, without a traceback.
    """


class ConfigError(GpttrainError):
    """A bad preset, TOML file, flag or value."""


class TokenizerError(GpttrainError):
    """A tokenizer that cannot be built or loaded."""


class DataError(GpttrainError):
    """Missing, corrupt or unsuitable data."""
