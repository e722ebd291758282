"""Cutting a response off mid-body: what the app and the server agree on, with no imports, so
that the request log, the streamer and the protocol can all name it."""

# The ASGI scope extension our uvicorn protocol offers: `{"abort": <zero-arg callable>}`, which
# marks the response disconnected and aborts the transport.
ABORT_EXTENSION = "todo.abort_connection"


class ResponseAborted(Exception):
    """A response cut off after its first bytes, on purpose: raised out of the app when the
    server offers no `ABORT_EXTENSION`, so that the server drops the connection instead of
    ending the body. Never a clean end: a client must not take a cut list for a whole one."""
