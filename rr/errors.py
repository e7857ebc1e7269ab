"""The one exception type rr raises for bad input: it always names what was wrong and what to do."""


class RRError(Exception):
    """Bad input (config, data, path, cluster answer): the message names the culprit and the fix."""


class ConfigError(RRError):
    """A job config (a file, a flag, or a job directory's saved config.yaml) that rr refuses: the message names the
    file and the field."""


class JobDirError(RRError):
    """A job directory rr cannot use safely (not ours, readable by others, or holding something else)."""


class RegistryError(RRError):
    """The model registry (an MLflow tracking URI) is malformed, unreachable or answered with an error."""
