"""Stand-in pyarrow (see bench/trl_shim/README.md)."""

from _missing import placeholder


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder("pyarrow", name)
