"""A sequencer speaking to the publisher over its QUIC back-end with aioquic.

Connects with ALPN ``publisher-transport/1``, verifying the server's
certificate against the PEM file given with ``--ca-file`` (a self-signed
certificate is its own trust anchor; its subject alternative names must cover
the host dialled, e.g. the IP address 127.0.0.1). Opens one bidirectional
stream and speaks exactly the TCP framing on it: the Go-mode handshake, then
one vote round (wire.VoteRound). Exits 0 once the publisher has decided commit
on our request, 1 with the reason on stderr otherwise; the whole run is
bounded by ``--timeout``.

    PUBLISHER_TRANSPORT_CLIENT_KEY=<64 hex> python quic_client.py 127.0.0.1:4433 \
        --ca-file server.pem [--client-id seq-py] [--expect-identity seq-py]
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep tests/python free of __pycache__

import argparse  # noqa: E402
import asyncio  # noqa: E402
import ssl  # noqa: E402
from pathlib import Path  # noqa: E402

from aioquic.asyncio import QuicConnectionProtocol, connect  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.events import HandshakeCompleted, QuicEvent  # noqa: E402
from coincurve import PrivateKey  # noqa: E402

import wire  # noqa: E402

ALPN = "publisher-transport/1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="the publisher's QUIC address, host:port")
    parser.add_argument("--ca-file", type=Path, required=True, help="PEM certificate to trust")
    parser.add_argument("--client-id", default="seq-py", help="client_id in the handshake")
    parser.add_argument("--expect-identity", help="identity the session id must start with")
    parser.add_argument("--chain-id", type=int, default=7, help="our chain id")
    parser.add_argument("--timeout", type=float, default=20.0, help="bound on the whole run, s")
    return parser.parse_args(argv)


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def configuration(ca_file: Path, server_name: str) -> QuicConfiguration:
    """A client configuration offering our ALPN and verifying the server by ``ca_file``."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        verify_mode=ssl.CERT_REQUIRED,
        server_name=server_name,
    )
    config.load_verify_locations(cafile=str(ca_file))
    return config


class Protocol(QuicConnectionProtocol):
    """aioquic's stream-based protocol, remembering the negotiated ALPN."""

    alpn: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        """Notes the ALPN on handshake completion; the base class does the rest."""
        if isinstance(event, HandshakeCompleted):
            self.alpn = event.alpn_protocol
        super().quic_event_received(event)


class FramedStream:
    """One QUIC stream carrying §1 frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.limit = wire.HANDSHAKE_MAX_FRAME_SIZE

    async def send(self, body: bytes) -> None:
        """Writes one frame."""
        self.writer.write(wire.frame(body))
        await self.writer.drain()

    async def recv(self, waiting_for: str) -> bytes:
        """Reads one frame body; the first (the handshake response) is held to 16 KiB."""
        try:
            prefix = await self.reader.readexactly(wire.LENGTH_PREFIX.size)
            (length,) = wire.LENGTH_PREFIX.unpack(prefix)
            wire.check_length(length, self.limit)
            body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise wire.ProtocolFailure(f"stream ended while waiting for {waiting_for}") from None
        self.limit = wire.MAX_FRAME_SIZE
        return body


async def session(
    protos: wire.Protos, key: PrivateKey, args: argparse.Namespace, stream: FramedStream
) -> None:
    """The protocol over the stream: handshake, then the round, then Disconnect."""
    await stream.send(wire.handshake_request(protos, key, args.client_id))
    session_id = wire.accept_response(protos, await stream.recv("the handshake response"))
    say(f"handshake accepted: session {session_id}")
    if args.expect_identity and not session_id.startswith(f"{args.expect_identity}-"):
        raise wire.ProtocolFailure(f"session id {session_id!r} is not {args.expect_identity}'s")
    round_ = wire.VoteRound(protos, args.client_id, wire.chain_id_bytes(args.chain_id))
    await stream.send(round_.opening())
    say(f"sent XTRequest {round_.xt_id.hex()}")
    while not round_.decided:
        for reply in round_.on_frame(await stream.recv("StartSC / Decided")):
            await stream.send(reply)
    say(f"decided commit on {round_.xt_id.hex()}")
    await stream.send(round_.closing())
    stream.writer.write_eof()


async def run(args: argparse.Namespace) -> None:
    """Connects, checks the negotiated ALPN and runs the session."""
    protos = wire.compile_protos()
    wire.self_test(protos)
    key = wire.key_from_env()
    host, port = split_addr(args.addr)
    config = configuration(args.ca_file, host)
    async with connect(host, port, configuration=config, create_protocol=Protocol) as client:
        assert isinstance(client, Protocol)
        if client.alpn != ALPN:
            raise wire.ProtocolFailure(f"server negotiated ALPN {client.alpn!r}, not {ALPN!r}")
        say(f"QUIC connected, ALPN {client.alpn}")
        reader, writer = await client.create_stream()
        await session(protos, key, args, FramedStream(reader, writer))
        # Let the Disconnect and the stream's end leave before closing.
        await writer.drain()
        await asyncio.sleep(0.05)


def say(line: str) -> None:
    """Progress on stdout, flushed at once."""
    print(line, flush=True)


def main(argv: list[str]) -> int:
    """Entry point: 0 on a completed round, 1 otherwise."""
    args = parse_args(argv)
    try:
        asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except TimeoutError:
        print(f"error: no decision within {args.timeout} s", file=sys.stderr)
        return 1
    except ConnectionError as err:
        # aioquic logs the TLS alert (e.g. a certificate it does not trust) above.
        print(f"error: QUIC connection failed: {err or 'handshake refused'}", file=sys.stderr)
        return 1
    except (wire.ProtocolFailure, AssertionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    say("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
