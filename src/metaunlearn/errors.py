"""One exception type for everything a user can fix: the CLI prints its message
on one line and exits non-zero, without a traceback."""


class MetaunlearnError(Exception):
    """A problem with the user's input or environment, stated in one sentence."""


class ModelError(MetaunlearnError):
    """A model path or hub id that does not load as a supported pipeline."""


class ConfigError(MetaunlearnError):
    """A study configuration that does not validate."""


class TrainingError(MetaunlearnError):
    """A run that cannot go on (e.g. a NaN loss); its last good checkpoint is kept."""
