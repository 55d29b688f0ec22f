"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad config, path or data set. The message names the key or file and what would be valid."""


def find_user_error(exc: BaseException | None, depth: int = 0) -> UserError | None:
    """The UserError inside Ray's wrappers, if any: task errors (`cause`), Train's per-worker failures, Tune's
    trial errors, chained exceptions."""
    if exc is None or depth > 8:
        return None
    # inner errors first: Ray's `RayTaskError(UserError)` is a UserError too, but its text is the whole traceback
    inner = [getattr(exc, "cause", None), getattr(exc, "_base_exc", None), exc.__cause__]
    inner += list((getattr(exc, "worker_failures", None) or {}).values())
    for candidate in inner:
        found = find_user_error(candidate, depth + 1)
        if found is not None:
            return found
    return exc if isinstance(exc, UserError) else None


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """What a one-line error quotes of a library's exception: its message's first line, up to `limit` characters
    (its type's name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
