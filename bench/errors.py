"""The one exception a benchmark raises for a bad command line."""


class BenchUsageError(Exception):
    """A user mistake with a known fix; the CLI prints it as one line, without a traceback.

    The message says what is wrong and how to fix it, e.g. which flag to pass.
    """
