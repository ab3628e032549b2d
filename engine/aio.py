"""Small helpers for structured concurrency with trio."""

import trio


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside ``exc``: trio's nurseries wrap what their
    tasks raise in exception groups, and the one that matters to a user is
    the first leaf that is not a cancellation it caused."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_error(inner)
            if not isinstance(found, (trio.Cancelled, BaseExceptionGroup)):
                return found
    return exc
