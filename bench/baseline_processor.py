"""A plain grpc.aio ext_proc processor with fixed routing: the floor a Python processor
on grpc.aio can reach on this set-up, run as its own process.

    python -m bench.baseline_processor --port 9102 --destination 127.0.0.1:8000

It answers each phase Envoy waits for with a pre-built response: the request body with
the destination headers, metadata and clear_route_cache, everything else with an empty
CONTINUE; the observer filter's frames (observability mode) are read and not answered.
No parsing, no registry, no accounting, no logs. With `--end-after-routing` it ends the
routing stream (status OK) right after its routing answer, as the product does in the
two-filter shape (so a processor restart cuts no response): the floor for that shape.
The overhead benchmark runs it next to the product so that what the product adds on top
of grpc.aio is measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"


def routed_body(destination: str) -> ext.ProcessingResponse:
    metadata = struct_pb2.Struct()
    metadata.get_or_create_struct("envoy.lb")[DESTINATION_HEADER] = destination
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    headers = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, raw_value=destination.encode()),
            append_action=overwrite,
        )
        for name in (DESTINATION_HEADER, "target-pod")
    ]
    common = ext.CommonResponse(
        header_mutation=ext.HeaderMutation(set_headers=headers), clear_route_cache=True
    )
    return ext.ProcessingResponse(
        request_body=ext.BodyResponse(response=common), dynamic_metadata=metadata
    )


class FixedRouting(ext_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str, end_after_routing: bool = False) -> None:
        self._end_after_routing = end_after_routing
        self._answers = {
            "request_headers": ext.ProcessingResponse(request_headers=ext.HeadersResponse()),
            "request_body": routed_body(destination),
            "response_headers": ext.ProcessingResponse(response_headers=ext.HeadersResponse()),
            "response_body": ext.ProcessingResponse(response_body=ext.BodyResponse()),
            "request_trailers": ext.ProcessingResponse(request_trailers=ext.TrailersResponse()),
            "response_trailers": ext.ProcessingResponse(response_trailers=ext.TrailersResponse()),
        }

    async def Process(  # the gRPC method name, as Envoy calls it
        self,
        request_iterator: AsyncIterator[ext.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext.ProcessingResponse]:
        answers = self._answers
        async for frame in request_iterator:
            kind = frame.WhichOneof("request")
            # Envoy expects no answer from an observer stream (observability mode).
            if kind is not None and not frame.observability_mode:
                yield answers[kind]
                if kind == "request_body" and self._end_after_routing:
                    return


async def serve(port: int, destination: str, end_after_routing: bool = False) -> None:
    server = grpc.aio.server()
    servicer = FixedRouting(destination, end_after_routing)
    ext_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--destination", required=True, help="ip:port every request goes to")
    parser.add_argument(
        "--end-after-routing",
        action="store_true",
        help="end the routing stream right after the routing answer (the product's shape)",
    )
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.destination, args.end_after_routing))


if __name__ == "__main__":
    main()
