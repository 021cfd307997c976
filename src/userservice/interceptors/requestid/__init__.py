"""The request id sent back to the caller: its valid ``x-request-id``, or a fresh one.

Every call gets it in its trailers, which ride with the status at no cost (initial metadata
would be a batch of its own on every unary call). A stream also gets it in its initial
metadata as it opens: its client learns the call is established before the first message (a
watch may have none for long), for one batch per stream rather than per message. Choosing
the id is ``userservice.rpc_context.request_id``; the access log layer calls these.
"""

from __future__ import annotations

from userservice.rpc_context import REQUEST_ID_KEY, Context


def echo_request_id(context: Context, correlation: str) -> None:
    """Put the request id in the call's trailers (an abort keeps it: see with_request_id)."""
    context.set_trailing_metadata(((REQUEST_ID_KEY, correlation),))


async def announce_request_id(context: Context, correlation: str) -> None:
    """Send a stream's initial metadata now, with the request id."""
    await context.send_initial_metadata(((REQUEST_ID_KEY, correlation),))
