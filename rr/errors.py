"""The one exception type rr raises for bad input: it always names what was wrong and what to do."""


class RRError(Exception):
    """Bad input (config, data, path, cluster answer): the message names the culprit and the fix."""
