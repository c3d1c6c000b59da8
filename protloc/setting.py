"""A run setting declared once: a dataclass field that holds its default, what its command-line
flag says about it and what the flag accepts; `protloc pretrain` builds its flags from these
fields (PretrainConfig, MultiCropConfig) and adds each recipe's value to the help."""

import dataclasses


def setting(default, help: str, **flag) -> dataclasses.Field:
    """A field with a flag. `help`: what the setting does (the command adds its default). `flag`:
    choices; min, max (min_open, max_open: excluded), as click's ranges; metavar; flag, the flag's
    name when not --FIELD-NAME (a bool: "--a/--no-b" sets either value, "--no-x" only False);
    zero_is_none: the flag's 0 sets None."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})
