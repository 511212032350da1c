"""Exceptions for user errors: the CLI prints them as one line and exits non-zero."""


class JaxcifarError(Exception):
    """A problem with the user's input (flags, data, workdir), not a bug in jaxcifar."""


class ConfigError(JaxcifarError, ValueError):
    """A configuration value is out of its allowed range or set."""


class DataError(JaxcifarError):
    """The data could not be found, read or understood."""


class CheckpointError(JaxcifarError):
    """A workdir or checkpoint cannot be used for the requested run."""


class RunFileError(JaxcifarError):
    """A run file could not be written or read (full disk, no permission, garbage content)."""


class DivergedError(JaxcifarError):
    """Training produced a non-finite loss; the run stopped at its last good checkpoint."""
