"""The project's error types: each carries one message a user can act on."""


class GpttrainError(Exception):
    """A refusal with a message that names the thing (file, flag, value) and what to do.

    The CLI prints it as one line on stderr and exits with status 2, without a traceback. Under torchrun rank 0
    alone prints it: most are verdicts every rank shares (the same settings refused the same way, or one outcome
    given to every rank: `distributed.on_main`, `distributed.on_every`, which names a rank that failed alone). One
    that no agreement can reach (its GPU ran out of memory mid-step, its LOCAL_RANK has no GPU before the process
    group exists) is made with `rank_local(...)`: the rank that raised it prints it, naming itself.
    """

    rank_local = False


def shown(value: object) -> str:
    """`repr(value)` for a message, also for an int too long for Python to print (over 4300 digits by default,
    which `repr` refuses with a ValueError that would replace the message)."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
        return type(value).__name__


def rank_local(error: GpttrainError) -> GpttrainError:
    """`error`, marked as possibly this rank's alone (see GpttrainError): `raise rank_local(DataError(...))`."""
    error.rank_local = True
    return error


class ConfigError(GpttrainError):
    """A bad preset, TOML file, flag or value."""


class TokenizerError(GpttrainError):
    """A tokenizer that cannot be built or loaded."""


class DataError(GpttrainError):
    """Missing, corrupt or unsuitable data."""
