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


def filesystem_error(err: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do (finished work is kept)."""
    import errno

    advice = {errno.ENOSPC: "free some space or set output.dir on another disk",
              errno.EDQUOT: "free some space or set output.dir on another disk",
              errno.EACCES: "check the folder's permissions or set output.dir elsewhere",
              errno.EPERM: "check the folder's permissions or set output.dir elsewhere",
              errno.EROFS: "the disk is read-only; set output.dir elsewhere",
              errno.ENOTDIR: "a file stands where a folder should be; move it or choose another path",
              errno.ENOENT: "check the path (its parent folders must exist or be creatable)"}
    where = f" '{err.filename}'" if err.filename else ""
    reason = err.strerror or str(err)
    return f"{reason}:{where}; {advice.get(err.errno, 'check the path and try again')}; finished work is kept"
