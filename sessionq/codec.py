"""msgpack encoding of arguments, results and envelopes, with a size limit. Never pickle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from .errors import ConfigurationError, SerializationError

DEFAULT_MAX_PAYLOAD_SIZE = 1024 * 1024


class Codec:
    """Turns activity arguments and results into bytes and back, with msgpack; never pickle,
    so a message read from Redis cannot run code.

    Handles bytes, str, int, float, bool, None, lists/tuples and dicts out of the box
    (tuples, sets and frozensets arrive as lists); teach it more types with `register`.
    Every worker and client of a task queue must be taught the same types: pass the same
    Codec as ``Client(codec=...)`` and ``Worker(codec=...)``.

    Args:
        max_payload_size: the largest encoded message, in bytes (default 1 MiB): an
            activity's arguments with its options, or its result. A bigger one raises
            SerializationError before anything is sent, since every payload sits in Redis'
            memory until it is read; pass large data by reference (a file, object storage).
    """

    def __init__(self, max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> None:
        if (
            isinstance(max_payload_size, bool)
            or not isinstance(max_payload_size, int)
            or max_payload_size <= 0
        ):
            raise ConfigurationError("max_payload_size", f"must be a positive int, got {max_payload_size!r}")
        self.max_payload_size = max_payload_size
        self._encoders: dict[type, tuple[int, Callable[[Any], bytes]]] = {}
        self._decoders: dict[int, Callable[[bytes], Any]] = {}

    def register(
        self, cls: type, code: int, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]
    ) -> None:
        """Teach the codec a type, as a msgpack extension type.

        Args:
            cls: the type; its subclasses are encoded the same way, unless registered too.
            code: the extension type code, 0-127, unique in this codec; it is what travels,
                so every process must register the type under the same code.
            encode: ``encode(obj) -> bytes``.
            decode: ``decode(bytes) -> obj``.

        Raises:
            ConfigurationError: the code is outside 0-127 or already registered.
        """
        if not 0 <= code <= 127:
            raise ConfigurationError("code", f"must be 0..127, got {code}")
        if code in self._decoders:
            raise ConfigurationError("code", f"{code} is already registered")
        self._encoders[cls] = (code, encode)
        self._decoders[code] = decode

    def _default(self, obj: Any) -> Any:
        entry = self._encoders.get(type(obj))
        if entry is None:
            for cls, candidate in self._encoders.items():
                if isinstance(obj, cls):
                    entry = candidate
                    break
        if entry is None:
            if isinstance(obj, (set, frozenset)):
                return list(obj)
            raise TypeError(f"cannot encode object of type {type(obj).__qualname__}")
        code, encode = entry
        return msgpack.ExtType(code, encode(obj))

    def _ext_hook(self, code: int, data: bytes) -> Any:
        decode = self._decoders.get(code)
        if decode is None:
            raise SerializationError(
                f"received a value of extension type {code} that this process's codec was not "
                "taught; register the same types on every client and worker"
            )
        return decode(data)

    def dumps(self, value: Any, what: str = "value") -> bytes:
        """Encode `value`; `what` names it in the error ("the arguments of activity 'process'").

        Raises:
            SerializationError: a value msgpack cannot encode (a type the codec was not
                taught, an int over 64 bits), or over ``max_payload_size``.
        """
        try:
            data: bytes = msgpack.packb(value, default=self._default, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"{what} cannot be encoded with msgpack: {exc}. Pass bytes, str, int, float, "
                "bool, None, lists and dicts, or teach the codec the type with Codec.register()"
            ) from None
        if len(data) > self.max_payload_size:
            raise SerializationError(
                f"{what} is {len(data):,} bytes encoded, over the {self.max_payload_size:,}-byte "
                "limit; store large data elsewhere (a file, object storage) and pass a reference, "
                "or raise max_payload_size"
            )
        return data

    def loads(self, data: bytes) -> Any:
        """Decode bytes produced by `dumps`.

        Raises:
            SerializationError: an extension type this codec was not taught.
            ValueError: the bytes are not msgpack (msgpack's own errors derive from it).
        """
        return msgpack.unpackb(data, raw=False, ext_hook=self._ext_hook, strict_map_key=False)


default_codec = Codec()
