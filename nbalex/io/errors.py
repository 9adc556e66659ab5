"""Errors raised by the data pipeline."""


class DataError(ValueError):
    """A data source or dataset file that cannot be used; the message is one line saying why."""
