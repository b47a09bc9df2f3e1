"""The one exception type of the data pipeline."""


class DataError(Exception):
    """Bad data input: a one-line message meant for the user, printed without a traceback."""
