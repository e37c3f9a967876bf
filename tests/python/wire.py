"""The publisher transport's wire protocol, written independently of the crate.

What a third-party sequencer needs (docs/PROTOCOL.md):

- §1 framing: ``u32be(len(body)) || body``;
- §2 the Go-mode handshake: a bare ``rollup.v1.HandshakeRequest`` signed with
  secp256k1 (coincurve) over ``Keccak-256(u64be(timestamp) || nonce)``
  (pycryptodome), and the server's bare ``HandshakeResponse``;
- §5 a cross-chain vote round: XTRequest → StartSC → Vote → Decided, answering
  ``Ping`` with ``Pong`` on the way.

The protobuf classes are generated at run time from the crate's ``proto/``
files with grpcio-tools, so nothing generated is kept in the repository.

This module is named ``wire`` rather than ``transport`` because the generated
code lives in a package called ``transport`` (from ``transport/v1/*.proto``).
Running it directly (``python wire.py``) runs the self-test against the worked
example of PROTOCOL.md Appendix A.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from coincurve import PrivateKey
from Crypto.Hash import keccak
from google.protobuf.message import Message as Proto

# Byte layouts of §1 and §2.
LENGTH_PREFIX = struct.Struct(">I")
TIMESTAMP = struct.Struct(">Q")
NONCE_LEN = 16
SIGNATURE_LEN = 65
# §1: what a client accepts as the handshake response.
HANDSHAKE_MAX_FRAME_SIZE = 16 * 1024
# §1: the default maximum after the handshake.
MAX_FRAME_SIZE = 10 * 1024 * 1024

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILES = ("rollup/v1/messages.proto", "transport/v1/transport.proto")


class ProtocolFailure(Exception):
    """The peer broke the protocol, refused us, or the round went wrong."""


# ---------------------------------------------------------------------------
# Generated protobuf code
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Protos:
    """The generated modules this client uses."""

    rollup: ModuleType  # rollup.v1.messages_pb2
    transport: ModuleType  # transport.v1.transport_pb2
    transport_grpc: ModuleType  # transport.v1.transport_pb2_grpc


def compile_protos(proto_dir: Path = PROTO_DIR) -> Protos:
    """Compiles the crate's .proto files with grpcio-tools and imports them.

    The code goes to a temporary directory that is put first on ``sys.path``
    while importing (with ``__init__.py`` files, so these packages win over
    any namesake) and removed afterwards: the modules stay loaded.
    """
    from grpc_tools import protoc  # imported here: only needed once

    with tempfile.TemporaryDirectory(prefix="pt-proto-") as out:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}: {' '.join(args)}")
        for package in ("rollup", "rollup/v1", "transport", "transport/v1"):
            (Path(out) / package / "__init__.py").touch()
        sys.path.insert(0, out)
        try:
            return Protos(
                rollup=importlib.import_module("rollup.v1.messages_pb2"),
                transport=importlib.import_module("transport.v1.transport_pb2"),
                transport_grpc=importlib.import_module("transport.v1.transport_pb2_grpc"),
            )
        finally:
            sys.path.remove(out)


# ---------------------------------------------------------------------------
# §1 Framing
# ---------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """One frame: the body's length as 4 big-endian bytes, then the body."""
    if not body:
        raise ValueError("empty message: a frame body is never empty")
    return LENGTH_PREFIX.pack(len(body)) + body


def check_length(length: int, limit: int) -> None:
    """Refuses a zero or oversize length, as §1 requires of a reader."""
    if length == 0:
        raise ProtocolFailure("empty message")
    if length > limit:
        raise ProtocolFailure(f"message size {length} exceeds max {limit}")


# ---------------------------------------------------------------------------
# §2 Go-mode handshake
# ---------------------------------------------------------------------------


def keccak256(data: bytes) -> bytes:
    """Ethereum's Keccak-256 (padding 0x01), not NIST SHA3-256."""
    return keccak.new(digest_bits=256, data=data).digest()


def handshake_digest(timestamp: int, nonce: bytes) -> bytes:
    """Keccak-256(u64be(timestamp as u64) || nonce): what the request signs."""
    return keccak256(TIMESTAMP.pack(timestamp % 2**64) + nonce)


def sign_digest(key: PrivateKey, digest: bytes) -> bytes:
    """Sign a digest as ``r || s || v``: v in {0, 1}, low s, RFC 6979 (libsecp256k1's)."""
    signature = key.sign_recoverable(digest, hasher=None)
    if len(signature) != SIGNATURE_LEN or signature[64] not in (0, 1):
        raise AssertionError(f"unexpected signature layout: {signature.hex()}")
    return signature


def handshake_request(
    protos: Protos,
    key: PrivateKey,
    client_id: str,
    timestamp: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The body of a Go-mode HandshakeRequest (bare, not inside a Message)."""
    timestamp = time.time_ns() if timestamp is None else timestamp
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    request = protos.rollup.HandshakeRequest(
        timestamp=timestamp,
        public_key=key.public_key.format(compressed=True),
        signature=sign_digest(key, handshake_digest(timestamp, nonce)),
        client_id=client_id,
        nonce=nonce,
    )
    return request.SerializeToString(deterministic=True)


def refusal_of(protos: Protos, body: bytes) -> str | None:
    """The text of a ``Message{Disconnect}`` sent in place of a response, if it is one."""
    message = protos.rollup.Message()
    try:
        message.ParseFromString(body)
    except Exception:  # noqa: BLE001 - any parse failure means "not a Message"
        return None
    if message.WhichOneof("payload") != "disconnect":
        return None
    reason = protos.rollup.DisconnectMessage.Reason.Name(message.disconnect.reason)
    return f"refused by server: {reason}: {message.disconnect.details}"


def accept_response(protos: Protos, body: bytes) -> str:
    """Checks the server's handshake answer; returns the session id."""
    refusal = refusal_of(protos, body)
    if refusal is not None:
        raise ProtocolFailure(refusal)
    response = protos.rollup.HandshakeResponse()
    try:
        response.ParseFromString(body)
    except Exception as err:  # noqa: BLE001
        raise ProtocolFailure(f"malformed handshake response: {err}") from err
    if not response.accepted:
        raise ProtocolFailure(f"handshake rejected by server: {response.error}")
    if not response.session_id:
        raise ProtocolFailure("accepted without a session id")
    return response.session_id


# ---------------------------------------------------------------------------
# §5 A vote round
# ---------------------------------------------------------------------------


def xt_id_of(request: Proto) -> bytes:
    """SHA-256 of an XTRequest's protobuf encoding: the round's id."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


@dataclass
class VoteRound:
    """One cross-chain round as a sequencer, without I/O.

    ``opening()`` is the first message to send; every received frame body goes
    to ``on_frame()``, which returns the bodies to send back. ``decided`` turns
    true once the publisher's commit for our request has arrived.
    """

    protos: Protos
    client_id: str
    chain_id: bytes
    transactions: list[bytes] = field(default_factory=lambda: [os.urandom(32)])
    voted: bool = False
    decided: bool = False

    def __post_init__(self) -> None:
        pb = self.protos.rollup
        self.request = pb.XTRequest(
            transactions=[
                pb.TransactionRequest(chain_id=self.chain_id, transaction=self.transactions)
            ]
        )
        self.xt_id = xt_id_of(self.request)

    def _message(self, **payload: object) -> bytes:
        message = self.protos.rollup.Message(sender_id=self.client_id, **payload)
        return message.SerializeToString(deterministic=True)

    def opening(self) -> bytes:
        """Message{xt_request}: asks the publisher to start the round."""
        return self._message(xt_request=self.request)

    def closing(self) -> bytes:
        """Message{Disconnect{REQUESTED}}: the last frame before closing on purpose."""
        pb = self.protos.rollup
        return pb.Message(
            disconnect=pb.DisconnectMessage(
                reason=pb.DisconnectMessage.REQUESTED, details="round complete"
            )
        ).SerializeToString(deterministic=True)

    def on_frame(self, body: bytes) -> list[bytes]:
        """Handle one frame from the publisher; return the replies to send."""
        message = self.protos.rollup.Message()
        try:
            message.ParseFromString(body)
        except Exception as err:  # noqa: BLE001
            raise ProtocolFailure(f"undecodable frame from the server: {err}") from err
        kind = message.WhichOneof("payload")
        if kind == "ping":
            pong = self.protos.rollup.Pong(timestamp=message.ping.timestamp)
            return [self.protos.rollup.Message(pong=pong).SerializeToString()]
        if kind == "disconnect":
            raise ProtocolFailure(f"server disconnected: {refusal_of(self.protos, body)}")
        if kind == "start_sc":
            return self._on_start(message.start_sc)
        if kind == "decided":
            self._on_decided(message.decided)
        return []

    def _on_start(self, start: Proto) -> list[bytes]:
        if start.xt_id != self.xt_id:
            return []  # another sequencer's round
        if xt_id_of(start.xt_request) != self.xt_id:
            raise ProtocolFailure("StartSC's xt_request does not hash to its xt_id")
        if self.voted:
            raise ProtocolFailure("a second StartSC for our round")
        self.voted = True
        vote = self.protos.rollup.Vote(
            sender_chain_id=self.chain_id,
            xt_id=self.protos.rollup.XtID(hash=self.xt_id),
            vote=True,
        )
        return [self._message(vote=vote)]

    def _on_decided(self, decided: Proto) -> None:
        if decided.xt_id.hash != self.xt_id:
            return
        if not self.voted:
            raise ProtocolFailure("Decided for our round before its StartSC")
        if not decided.decision:
            raise ProtocolFailure("the publisher decided abort although we voted commit")
        self.decided = True


# ---------------------------------------------------------------------------
# Shared by the clients
# ---------------------------------------------------------------------------


def load_key(hex_key: str) -> PrivateKey:
    """A secret key from 64 hex digits (optional 0x)."""
    text = hex_key.strip().removeprefix("0x")
    if len(text) != 64:
        raise ValueError("the secret key must be 64 hex digits")
    return PrivateKey(bytes.fromhex(text))


def key_from_env(variable: str = "PUBLISHER_TRANSPORT_CLIENT_KEY") -> PrivateKey:
    """The client's secret key from the environment (kept off the command line)."""
    value = os.environ.get(variable)
    if not value:
        raise SystemExit(f"error: set {variable} to the client's secret key (64 hex digits)")
    return load_key(value)


def chain_id_bytes(number: int) -> bytes:
    """A chain id as the examples put it on the wire: 8 big-endian bytes."""
    return number.to_bytes(8, "big")


# ---------------------------------------------------------------------------
# Self-test: PROTOCOL.md Appendix A
# ---------------------------------------------------------------------------

APPENDIX_A_TIMESTAMP = 1_700_000_000_000_000_000
APPENDIX_A_NONCE = bytes(range(16))
APPENDIX_A_DIGEST = "cccd22ce478ccd43e68f4a89f5bca5b0938c3b9e281879086d31aff0f8f9c3d8"
APPENDIX_A_BODY = (
    "088080a8b1e39fe7cb17"
    "12210279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    "1a4112a4d5d2d5f72589e544f6bb4ab9dfacd0172316735cf8d54a94a7c21454dadf"
    "57d7614cead0caa2f314a8b1f86229b44e1f7199c8e2e0a749a9c297232defb301"
    "22057365712d61"
    "2a10000102030405060708090a0b0c0d0e0f"
)
KECCAK_EMPTY = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


def self_test(protos: Protos) -> None:
    """Checks hashing, signing and encoding against PROTOCOL.md Appendix A.

    Raises AssertionError on any mismatch, so a client never talks to a
    server with a handshake the document disagrees with.
    """
    expect(keccak256(b"").hex(), KECCAK_EMPTY, "Keccak-256 of the empty string")
    digest = handshake_digest(APPENDIX_A_TIMESTAMP, APPENDIX_A_NONCE)
    expect(digest.hex(), APPENDIX_A_DIGEST, "Appendix A handshake digest")
    key = PrivateKey((1).to_bytes(32, "big"))
    body = handshake_request(protos, key, "seq-a", APPENDIX_A_TIMESTAMP, APPENDIX_A_NONCE)
    expect(body.hex(), APPENDIX_A_BODY, "Appendix A Go-mode request body")
    expect(frame(body)[:4].hex(), "00000089", "Appendix A frame prefix")


def expect(got: str, want: str, what: str) -> None:
    """Asserts equality with a message naming both values."""
    if got != want:
        raise AssertionError(f"self-test: {what} differs\n  got  {got}\n  want {want}")


def main() -> int:
    """Runs the self-test."""
    self_test(compile_protos())
    print("wire self-test passed (PROTOCOL.md Appendix A)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
