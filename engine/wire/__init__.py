"""The wire: frames, the session rules, and trio connections that carry them.

Bottom up (each module imports only those before it):

==============  ========  ================================================
module          sans-IO?  holds
==============  ========  ================================================
``frames``      yes       header, kinds, dtypes, error codes, limits;
                          encode a frame, decode and validate a header
``decoder``     yes       :class:`FrameDecoder`: bytes in, frames out
``secret``      yes       the shared secret and its length rule
``session``     yes       handshake messages and proofs, which kinds may
                          come when, the CLOSE exchange
``reply``       yes       what request handlers return (:class:`Reply`)
``admission``   yes       caps on unauthenticated connections; log
                          rate limits
``sockio``      no        the only module that touches sockets
``connection``  no        :class:`Connection`: frames over a trio stream
``handshake``   no        the handshake over a connection
``channel``     no        :class:`Channel`: requests and replies
``endpoints``   no        :func:`connect`, :func:`open_connection`, :func:`serve`
``peers``       no        :class:`Peers`: a pool of channels
==============  ========  ================================================

Names are imported on first use, so the sans-IO modules import without trio.
"""

from .._lazy import lazy

_EXPORTS = {
    **dict.fromkeys(
        [
            "MAGIC",
            "PROTOCOL_VERSION",
            "HEADER_SIZE",
            "MAX_NDIM",
            "NONCE_SIZE",
            "MAX_ERROR_TEXT",
            "MessageKind",
            "TENSOR_KINDS",
            "DType",
            "BFLOAT16",
            "ErrorCode",
            "Limits",
            "DEFAULT_LIMITS",
            "HANDSHAKE_LIMITS",
            "Header",
            "Frame",
            "decode_header",
            "parse_meta",
            "payload_view",
            "encode_frame",
            "error_frame",
        ],
        ".frames",
    ),
    "FrameDecoder": ".decoder",
    **dict.fromkeys(["MIN_SECRET_BYTES", "load_secret"], ".secret"),
    "auth_mac": ".session",
    **dict.fromkeys(["DEFER", "Handler", "InlineHandler", "Reply"], ".reply"),
    "Connection": ".connection",
    **dict.fromkeys(["client_handshake", "server_handshake"], ".handshake"),
    "Channel": ".channel",
    **dict.fromkeys(["connect", "open_connection", "serve"], ".endpoints"),
    **dict.fromkeys(["Address", "Peers"], ".peers"),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
