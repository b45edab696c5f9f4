"""Exceptions with messages meant for the person at the terminal."""


class MergestreamError(Exception):
    """Base class: anything the command line reports as a plain error, without a traceback."""


class CheckpointError(MergestreamError):
    """A checkpoint cannot be read, or does not match the base."""


class StateError(MergestreamError):
    """A merge state is missing, locked, corrupt or incompatible."""


class ConfigError(MergestreamError):
    """A method name or parameter is unknown or invalid."""
