"""Bearer-token authentication and optional TLS for the learner's gRPC service.

Every RPC except gRPC health checking (``/grpc.health.v1.Health/*``) and server reflection must
carry ``authorization: Bearer <token>`` metadata; :class:`BearerTokenInterceptor` answers anything
else with ``UNAUTHENTICATED`` (tokens are compared in constant time). The token comes from an
environment variable or a file (:func:`load_token`) and is never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from l2o.io.secrets import secret_from_env

#: Method prefixes that need no token.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class TokenError(ValueError):
    """A token source is set but unusable (missing or empty file)."""


def load_token(env_var: str = "L2O_TOKEN", token_file: str | os.PathLike | None = None
               ) -> str | None:
    """The bearer token from ``token_file`` (if given), else ``$env_var``, else the file named by
    ``$env_var_FILE`` (``L2O_TOKEN_FILE``); None if none is set.

    Surrounding whitespace is stripped. A named file that does not exist or is empty raises
    :class:`TokenError`.
    """
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise TokenError(f"token file {path} does not exist")
        token = path.read_text().strip()
        if not token:
            raise TokenError(f"token file {path} is empty")
        return token
    try:
        return secret_from_env(env_var)
    except ValueError as e:
        raise TokenError(f"${env_var}_FILE: {e}") from None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC but health checks and reflection unless it carries the bearer token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty bearer token")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        """Pass authorized (or open) calls on; answer the rest with UNAUTHENTICATED."""
        method = handler_call_details.method or ""
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value
                break
        if given is None:
            return _abort_handler(handler, "missing bearer token (authorization metadata)")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if not hmac.compare_digest(given_bytes, self._expected):
            return _abort_handler(handler, "invalid bearer token")
        return handler


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike
                       ) -> grpc.ServerCredentials:
    """TLS server credentials from a PEM certificate chain and private key."""
    cert, key = Path(cert_file), Path(key_file)
    for p in (cert, key):
        if not p.is_file():
            raise FileNotFoundError(f"TLS file {p} does not exist")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def channel_credentials(root_cert: str | os.PathLike | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting ``root_cert`` (PEM), or the system roots when None."""
    if root_cert is None:
        return grpc.ssl_channel_credentials()
    path = Path(root_cert)
    if not path.is_file():
        raise FileNotFoundError(f"root certificate {path} does not exist")
    return grpc.ssl_channel_credentials(root_certificates=path.read_bytes())
