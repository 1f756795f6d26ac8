"""gRPC plumbing of the data path: frames cross as raw ``Frame`` message bytes.

``encode_frame`` writes a ``Frame`` message's wire bytes in one copy, so a frame is never
rebuilt as a protobuf object on the way out (upb takes ~1.4 ms/MB to serialize a large
``bytes`` field), and ``read_frame`` splits received bytes into views instead of parsing
them into a protobuf object (which copies the payload). The generated stubs are used for
everything else.
"""

from __future__ import annotations

import grpc

from node.codec import WireFrame, read_frame
from node.errors import FrameError
from node.rpc import edgesplit_pb2 as pb

SERVICE = "edgesplit.v1.EdgeNode"


def submit_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """Open a ``Submit`` stream whose ``write`` takes a ``Frame``'s wire bytes."""
    method = channel.stream_stream(
        f"/{SERVICE}/Submit", request_serializer=None, response_deserializer=pb.Ack.FromString
    )
    return method()


def read_submitted_frame(data: bytes) -> WireFrame | FrameError:
    """``read_frame`` for the server: a malformed message is handed to the handler (which
    answers INVALID_ARGUMENT) instead of raising inside gRPC (which would answer INTERNAL)."""
    try:
        return read_frame(data)
    except FrameError as err:
        return err


def results_stream(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall:
    """Subscribe to ``Results``; each item read is a :class:`~node.codec.WireFrame`."""
    method = channel.unary_stream(
        f"/{SERVICE}/Results",
        request_serializer=pb.ResultsRequest.SerializeToString,
        response_deserializer=read_frame,
    )
    return method(pb.ResultsRequest())


def add_servicer(servicer: object, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_EdgeNodeServicer_to_server``, except
    that ``Results`` yields ``Frame`` wire bytes."""
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.NodeInfo.SerializeToString,
        ),
        "Profile": grpc.stream_unary_rpc_method_handler(
            servicer.Profile,
            request_deserializer=pb.ProfileChunk.FromString,
            response_serializer=pb.ProfileResult.SerializeToString,
        ),
        "LoadStage": grpc.stream_unary_rpc_method_handler(
            servicer.LoadStage,
            request_deserializer=pb.StageChunk.FromString,
            response_serializer=pb.LoadStageReply.SerializeToString,
        ),
        "Wire": grpc.unary_unary_rpc_method_handler(
            servicer.Wire,
            request_deserializer=pb.WireRequest.FromString,
            response_serializer=pb.WireReply.SerializeToString,
        ),
        "Submit": grpc.stream_stream_rpc_method_handler(
            servicer.Submit,
            request_deserializer=read_submitted_frame,
            response_serializer=pb.Ack.SerializeToString,
        ),
        "Results": grpc.unary_stream_rpc_method_handler(
            servicer.Results,
            request_deserializer=pb.ResultsRequest.FromString,
            response_serializer=None,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
