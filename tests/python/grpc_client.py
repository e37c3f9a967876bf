"""A sequencer speaking to the publisher over its gRPC back-end with grpcio.

Opens one ``transport.v1.FrameService/Session`` bidirectional stream, sends
the Go-mode handshake request as the first ``FrameBatch``, checks the
response, then takes part in one vote round (wire.VoteRound), one frame per
batch. Exits 0 once the publisher has decided commit on our request, 1 with
the reason on stderr otherwise; the whole run is bounded by ``--timeout``.

    PUBLISHER_TRANSPORT_CLIENT_KEY=<64 hex> python grpc_client.py 127.0.0.1:50051 \
        [--ca-file server.pem] [--client-id seq-py] [--expect-identity seq-py]
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep tests/python free of __pycache__

import argparse  # noqa: E402
import queue  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from coincurve import PrivateKey  # noqa: E402
from google.protobuf.message import Message as Proto  # noqa: E402

import wire  # noqa: E402

# Ends the request stream (half-close).
END = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="the publisher's gRPC address, host:port")
    parser.add_argument("--ca-file", type=Path, help="PEM certificate to trust: dial with TLS")
    parser.add_argument("--client-id", default="seq-py", help="client_id in the handshake")
    parser.add_argument("--expect-identity", help="identity the session id must start with")
    parser.add_argument("--chain-id", type=int, default=7, help="our chain id")
    parser.add_argument("--timeout", type=float, default=20.0, help="bound on the whole run, s")
    return parser.parse_args(argv)


def open_channel(addr: str, ca_file: Path | None) -> grpc.Channel:
    """A plain HTTP/2 channel, or TLS trusting exactly the given certificate."""
    if ca_file is None:
        return grpc.insecure_channel(addr)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    return grpc.secure_channel(addr, credentials)


def batches(outbox: queue.Queue[bytes | None], protos: wire.Protos) -> Iterator[Proto]:
    """The request stream: one FrameBatch per queued body, until END."""
    while (body := outbox.get()) is not END:
        yield protos.transport.FrameBatch(frames=[body])


def frames_of(responses: Iterator[Proto]) -> Iterator[bytes]:
    """The frame bodies of the response stream, batch after batch, length-checked."""
    limit = wire.HANDSHAKE_MAX_FRAME_SIZE
    for batch in responses:
        for body in batch.frames:
            wire.check_length(len(body), limit)
            limit = wire.MAX_FRAME_SIZE
            yield body


def run(args: argparse.Namespace) -> None:
    """Handshake and vote round; raises on any failure."""
    deadline = time.monotonic() + args.timeout
    protos = wire.compile_protos()
    wire.self_test(protos)
    key = wire.key_from_env()
    outbox: queue.Queue[bytes | None] = queue.Queue()
    with open_channel(args.addr, args.ca_file) as channel:
        stub = protos.transport_grpc.FrameServiceStub(channel)
        call = stub.Session(
            batches(outbox, protos),
            timeout=deadline - time.monotonic(),
            metadata=[("x-client-id", args.client_id)],
        )
        inbox = frames_of(call)
        try:
            session(protos, key, args, outbox, inbox)
        except BaseException:
            outbox.put(END)
            call.cancel()
            raise
        outbox.put(END)
        drain(inbox)


def drain(inbox: Iterator[bytes]) -> None:
    """Waits for the server to end the stream after our Disconnect."""
    try:
        for _ in inbox:
            pass
    except grpc.RpcError as err:
        # The round is done; how the server closes is not this test's concern.
        say(f"stream closed: {err.code().name}")


def session(
    protos: wire.Protos,
    key: PrivateKey,
    args: argparse.Namespace,
    outbox: queue.Queue[bytes | None],
    inbox: Iterator[bytes],
) -> None:
    """The protocol over the stream: handshake, then the round."""
    outbox.put(wire.handshake_request(protos, key, args.client_id))
    session_id = wire.accept_response(protos, next_frame(inbox, "the handshake response"))
    say(f"handshake accepted: session {session_id}")
    if args.expect_identity and not session_id.startswith(f"{args.expect_identity}-"):
        raise wire.ProtocolFailure(f"session id {session_id!r} is not {args.expect_identity}'s")
    round_ = wire.VoteRound(protos, args.client_id, wire.chain_id_bytes(args.chain_id))
    outbox.put(round_.opening())
    say(f"sent XTRequest {round_.xt_id.hex()}")
    while not round_.decided:
        for reply in round_.on_frame(next_frame(inbox, "StartSC / Decided")):
            outbox.put(reply)
    say(f"decided commit on {round_.xt_id.hex()}")
    outbox.put(round_.closing())


def next_frame(inbox: Iterator[bytes], waiting_for: str) -> bytes:
    """The next frame body, or a failure saying what was awaited."""
    try:
        return next(inbox)
    except StopIteration:
        raise wire.ProtocolFailure(f"stream ended while waiting for {waiting_for}") from None


def say(line: str) -> None:
    """Progress on stdout, flushed at once."""
    print(line, flush=True)


def describe(err: grpc.RpcError) -> str:
    """A gRPC failure with the transport's disconnect trailers, if any."""
    text = f"gRPC {err.code().name}: {err.details()}"
    trailers = dict(err.trailing_metadata() or ())
    if "x-disconnect-reason" in trailers:
        text += f" (disconnect: {trailers['x-disconnect-reason']})"
    return text


def main(argv: list[str]) -> int:
    """Entry point: 0 on a completed round, 1 otherwise."""
    args = parse_args(argv)
    try:
        run(args)
    except grpc.RpcError as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1
    except (wire.ProtocolFailure, AssertionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    say("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
