"""``coordinator plan --calibration FILE``: the inputs compression errors are measured on."""

from __future__ import annotations

from coordinator.tensor_file import read_tensor_file
from partition.compression_choice import Inputs
from partition.errors import EdgesplitError, TensorSpecError
from partition.loader import LoadedModel

HINT = "save a list of inputs (tensors or tuples of tensors) with torch.save"


def read_calibration(path: str, model: LoadedModel) -> list[Inputs]:
    """Calibration inputs from ``torch.save`` of a list of inputs, each a tensor or a tuple
    of tensors in the model's input order.

    Raises
    ------
    EdgesplitError
        The file is unreadable, not such a list, or an input does not match the model.
    """
    value = read_tensor_file(path, "--calibration", HINT)
    if not isinstance(value, list | tuple) or not value:
        raise EdgesplitError(f"--calibration '{path}' must hold a non-empty list; {HINT}")
    inputs = [tuple(item) if isinstance(item, list | tuple) else (item,) for item in value]
    for k, item in enumerate(inputs):
        try:
            if len(item) != len(model.input_specs):
                raise TensorSpecError(f"it has {len(item)} tensors, the model takes "
                                      f"{len(model.input_specs)}")
            for spec, tensor in zip(model.input_specs, item, strict=True):
                spec.check(tensor)
        except TensorSpecError as err:
            raise EdgesplitError(f"--calibration '{path}' input [{k}] does not fit the model "
                                 f"({err}); save inputs of the model's signature") from None
    return inputs
