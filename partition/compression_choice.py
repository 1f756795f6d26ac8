"""What compressing a cut or a layer's weights does to the model's outputs, measured.

Torch runs here and nowhere else in the choice of compression: the search
(:mod:`partition.choice_tables`) only sees the numbers this module measures. The model runs
layer by layer on calibration inputs; an option's error is measured *alone* (only that cut
encoded with :func:`partition.compression.roundtrip`, or only that layer's weights in a
:class:`~partition.quantize.WeightFormat`, everything else float32), starting from the
float32 activations at that point. The error figure is the largest absolute difference of
any output over the largest absolute float32 output (``Accuracy.max_rel_error``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from partition.compression import LinkEncoding, codec_seconds, encoded_bytes, roundtrip
from partition.cost_builder import stage_memory_matrix
from partition.costs import LinkChoices, WeightChoices
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.modules import RangeModule, build_range_module
from partition.plan import Accuracy
from partition.quantize import WeightFormat, quantized_range_module

Inputs = tuple[torch.Tensor, ...]
Alter = Callable[[torch.Tensor], torch.Tensor]


def calibration_inputs(model: LoadedModel, count: int, seed: int = 0) -> list[Inputs]:
    """``count`` inputs shaped like the model's: normal floats, and the model's own example
    for integer inputs (token ids or masks cannot be made up safely)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(t.shape, generator=generator).to(t.dtype) if t.is_floating_point()
              else t.clone() for t in model.example_inputs)
        for _ in range(count)
    ]


class ErrorMeter:
    """Runs a model layer by layer on calibration inputs against its float32 outputs."""

    def __init__(self, layer_graph: LayerGraph, inputs: list[Inputs]) -> None:
        self._graph = layer_graph
        self._names = [tuple(t.name for t in layer_graph.boundary_tensors(b))
                       for b in range(layer_graph.num_layers + 1)]
        self._layers = [build_range_module(layer_graph, k, k + 1)
                        for k in range(layer_graph.num_layers)]
        self._live: list[list[dict[str, torch.Tensor]]] = []
        self._reference: list[tuple[torch.Tensor, ...]] = []
        self._formats: dict[tuple[int, WeightFormat], RangeModule] = {}
        for item in inputs:
            env = dict(zip(layer_graph.user_inputs, item, strict=True))
            live = []
            with torch.no_grad():
                for k, layer in enumerate(self._layers):
                    live.append(self._at(k, env))
                    env.update(layer(env))
            live.append(self._at(len(self._layers), env))
            self._live.append(live)
            self._reference.append(self._outputs(env))
        floats = [t.abs().max() for out in self._reference for t in out
                  if t.is_floating_point() and t.numel()]
        self._scale = float(max(floats)) if floats and float(max(floats)) > 0 else 1.0
        self.integer_inputs = any(not t.is_floating_point() for t in inputs[0])

    @property
    def inputs(self) -> int:
        return len(self._live)

    def link_error(self, boundary: int, roundtrip: Alter) -> float:
        """The error of altering only boundary ``boundary``'s tensors with ``roundtrip``."""
        return max(
            self._difference(k, self._run(k, boundary, {boundary: roundtrip}, {}))[1]
            for k in range(self.inputs)
        )

    def layer_error(self, layer: int, fmt: WeightFormat) -> float:
        """The error of storing only layer ``layer``'s weights in ``fmt``."""
        changed = {layer: self._quantized(layer, fmt)}
        return max(self._difference(k, self._run(k, layer, {}, changed))[1]
                   for k in range(self.inputs))

    def accuracy(
        self, links: Mapping[int, Alter], layers: Mapping[int, WeightFormat],
        error_bound: float, max_error: float,
    ) -> Accuracy:
        """Every input run with all of ``links`` (boundary -> roundtrip) and ``layers``
        (layer -> weight format) at once, against float32."""
        changed = {k: self._quantized(k, fmt) for k, fmt in layers.items()}
        worst, agree, total, kind = 0.0, 0, 0, None
        for k in range(self.inputs):
            outputs = self._run(k, 0, links, changed)
            worst = max(worst, self._difference(k, outputs)[0])
            kind, same, count = self._agreement(self._reference[k], outputs)
            agree, total = agree + same, total + count
        share = agree / total if total else None
        return Accuracy(
            inputs=self.inputs, max_abs_error=worst, max_rel_error=worst / self._scale,
            error_bound=error_bound, max_error=max_error,
            top1_agreement=share if kind == "top1" else None,
            next_token_agreement=share if kind == "next_token" else None,
        )

    def _quantized(self, layer: int, fmt: WeightFormat) -> RangeModule:
        """Layer ``layer`` with its weights in ``fmt`` (built once per format)."""
        key = (layer, fmt)
        if key not in self._formats:
            self._formats[key] = quantized_range_module(self._graph, layer, layer + 1, fmt)
        return self._formats[key]

    def _at(self, boundary: int, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: env[name] for name in self._names[boundary]}

    def _outputs(self, env: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(env[name] for name in self._graph.user_outputs)

    def _run(
        self, index: int, start: int, links: Mapping[int, Alter],
        changed: Mapping[int, RangeModule],
    ) -> tuple[torch.Tensor, ...]:
        """Input ``index`` from boundary ``start`` (its float32 activations there), with the
        ``links`` boundaries altered and the ``changed`` layers in place of the originals."""
        env = dict(self._live[index][start])
        with torch.no_grad():
            for k in range(start, len(self._layers) + 1):
                if k in links:
                    env.update({n: links[k](t) for n, t in self._at(k, env).items()})
                if k < len(self._layers):
                    env.update(changed.get(k, self._layers[k])(env))
        return self._outputs(env)

    def _difference(self, index: int, outputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """Largest absolute difference from float32, and it over the reference scale."""
        worst = max((float((a.double() - b.double()).abs().max())
                     for a, b in zip(self._reference[index], outputs, strict=True)
                     if a.is_floating_point() and a.numel()), default=0.0)
        return worst, worst / self._scale

    def _agreement(
        self, reference: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]
    ) -> tuple[str | None, int, int]:
        """Matching argmaxes of the first float output: per row of a classifier's
        ``(batch, classes)``, per position of a language model's ``(batch, tokens, vocab)``
        (a model with integer inputs)."""
        for a, b in zip(reference, outputs, strict=True):
            if not a.is_floating_point():
                continue
            if a.dim() == 2 and a.shape[1] > 1:
                kind = "top1"
            elif a.dim() == 3 and a.shape[2] > 1 and self.integer_inputs:
                kind = "next_token"
            else:
                return None, 0, 0
            same = a.argmax(dim=-1) == b.argmax(dim=-1)
            return kind, int(same.sum()), same.numel()
        return None, 0, 0


def link_choices(
    meter: ErrorMeter, layer_graph: LayerGraph, encodings: tuple[LinkEncoding, ...], raw: bool,
) -> LinkChoices:
    """Bytes (:func:`~partition.compression.encoded_bytes`), codec seconds on this machine
    (:func:`~partition.compression.codec_seconds`) and error alone of each encoding at every
    boundary. With ``raw`` offered too, an encoding that saves no bytes at a boundary is
    withheld there."""
    shape = (layer_graph.num_layers + 1, len(encodings))
    nbytes, encode, decode, error = (np.zeros(shape) for _ in range(4))
    raw_bytes = layer_graph.boundary_bytes()
    for b in range(shape[0]):
        specs = layer_graph.boundary_tensors(b)
        for k, encoding in enumerate(encodings):
            nbytes[b, k] = sum(encoded_bytes(spec, encoding) for spec in specs)
            if raw and nbytes[b, k] >= raw_bytes[b]:
                nbytes[b, k] = np.inf
                continue
            seconds = codec_seconds(specs, encoding)
            encode[b, k], decode[b, k] = seconds.encode_s, seconds.decode_s
            error[b, k] = meter.link_error(b, lambda t, e=encoding: roundtrip(t, e))
    return LinkChoices(tuple(e.value for e in encodings), nbytes, encode, decode, error, raw)


@dataclass(frozen=True)
class WeightOffer:
    """Weight formats to choose from for each stage, priced as
    :class:`~partition.costs.WeightChoices` does: ``layer_seconds`` ``(W, N, L)``,
    ``stage_memory_bytes`` ``(W, L+1, L+1)``."""

    formats: tuple[WeightFormat, ...]
    layer_seconds: np.ndarray
    stage_memory_bytes: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(fmt.value for fmt in self.formats)


def weight_offer(
    layer_graph: LayerGraph, layer_seconds: Mapping[WeightFormat, np.ndarray]
) -> WeightOffer:
    """The formats of ``layer_seconds`` (each ``(N, L)``: every node's layer times in that
    format), their stage memory as :func:`~partition.cost_builder.stage_memory_matrix`
    prices a stage stored so."""
    formats = tuple(layer_seconds)
    return WeightOffer(
        formats, np.stack([layer_seconds[fmt] for fmt in formats]),
        np.stack([stage_memory_matrix(layer_graph, fmt) for fmt in formats]),
    )


def weight_choices(meter: ErrorMeter, offer: WeightOffer) -> WeightChoices:
    """``offer`` with the error of each format at each layer alone."""
    layers = offer.layer_seconds.shape[2]
    error = np.array([[meter.layer_error(k, fmt) for k in range(layers)]
                      for fmt in offer.formats]).reshape(len(offer.formats), layers)
    return WeightChoices(offer.names, offer.layer_seconds, offer.stage_memory_bytes, error)
