"""Command-line options shared by every command that takes a model file."""

from __future__ import annotations

import argparse

from partition.layers import AUTO, MARKERS, LayerGraph, build_layer_graph
from partition.loader import LoadedModel, load_model, parse_input_shape


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a torch.export archive (torch.export.save)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a whole pickled nn.Module (torch.save(model)); this runs code from the file",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="SHAPE[:DTYPE]",
        help="shape of each input of a pickled module, e.g. 1x3x224x224 or 1x128:int64",
    )
    parser.add_argument(
        "--granularity",
        default=AUTO,
        help="'auto', or the nn_module_stack depth that makes a layer (1 = top-level modules)",
    )
    parser.add_argument(
        "--split-at",
        choices=["layers", "markers"],
        default="layers",
        help="'markers': split only at torch.distributed.pipelining pipe_split() calls",
    )


def load_from_arguments(args: argparse.Namespace) -> tuple[LoadedModel, LayerGraph]:
    """Load the model and group it into layers as the options say."""
    shapes = tuple(parse_input_shape(text) for text in args.input_shape)
    model = load_model(args.model, allow_pickle=args.allow_pickle, input_shapes=shapes)
    granularity = MARKERS if args.split_at == "markers" else args.granularity
    return model, build_layer_graph(model.program, granularity)
