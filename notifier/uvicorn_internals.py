"""What notifier's protocols (notifier.http_edge, notifier.ws_edge) take from uvicorn's private
internals, checked at import: :func:`require`."""

from __future__ import annotations

import uvicorn

# notifier.http_edge and notifier.ws_edge subclass uvicorn's protocols and use some of their
# private attributes and methods; require() checks at import that those still exist.
BUILT_AGAINST = "uvicorn 0.54.0, websockets 17.4, httptools 0.9.0"


def require(
    owner: type, methods: tuple[str, ...] = (), names: dict[str, tuple[str, ...]] | None = None
) -> None:
    """Fail at import, with one clear message, when uvicorn no longer has what we override or use.

    ``methods``: methods of ``owner`` we override or call; ``names``: for a method of ``owner``,
    the attribute names its code must still use (an attribute set in ``__init__`` or read by a
    method we replicate). An :class:`ImportError` (this module cannot be used with the uvicorn
    installed), which ``notifier serve`` reports as one line."""
    missing = [m for m in methods if not callable(getattr(owner, m, None))]
    for method, wanted in (names or {}).items():
        code = getattr(getattr(owner, method, None), "__code__", None)
        used = set(code.co_names) if code is not None else set()
        missing += [f"{method}() using .{name}" for name in wanted if name not in used]
    if missing:
        raise ImportError(
            f"notifier's protocols override internals of {owner.__module__}.{owner.__qualname__} that "
            f"uvicorn {uvicorn.__version__} no longer has: {', '.join(missing)}. They were built against "
            f"{BUILT_AGAINST}: install that, or adapt notifier/http_edge.py and notifier/ws_edge.py."
        )

