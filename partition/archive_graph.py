"""Checking an exported program's JSON before torch deserializes it.

torch resolves op targets by walking attributes from a name, evaluates symbolic shape
expressions with ``sympy.sympify`` (Python ``eval``), imports the module an enum in a pytree
context names, rebuilds custom (torchbind) objects from pickles, and turns guard strings
into Python code. :func:`check_program` admits only what plain exported models use: ATen
ops and a few known others, shape expressions of sympy arithmetic, pytree types that are
registered or come from ``transformers``, and no custom objects or guard code.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from collections.abc import Iterator
from typing import Any

from torch.utils import _pytree as pytree

from partition.errors import ModelLoadError

MARKER_OP = "torch.ops.pippy._pipe_split.default"
_ATEN_OP = re.compile(r"torch\.ops\.aten\.(\w+)\.\w+")
_REFUSED_ATEN = frozenset({"from_file", "_print"})  # they read files or print
_OTHER_OPS = frozenset({
    MARKER_OP,
    "torch.ops.higher_order.wrap_with_set_grad_enabled",
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul",
    "_operator.floordiv", "_operator.truediv", "_operator.mod", "_operator.neg",
    "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt",
    "_operator.ge", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float",
    "torch.sym_int",
})
_SYMPY_CALLS = frozenset({
    "Integer", "Float", "Rational", "Add", "Mul", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
    "TruncToInt", "IntTrueDiv", "FloatTrueDiv", "ToFloat",
})
_SYMBOL_ASSUMPTIONS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite"}
)
_SYMBOL = re.compile(r"[a-z]+\d+")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)
_CONTAINER_TYPES = frozenset({
    "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
    "collections.namedtuple", "torch.fx.immutable_collections.immutable_list",
    "torch.fx.immutable_collections.immutable_dict",
})
_TRANSFORMERS_TYPE = re.compile(r"(transformers(?:\.[A-Za-z_]\w*)+)\.[A-Za-z_]\w*")
_REEXPORT = "export the model again with torch.export.save"


def check_program(program: dict[str, Any], origin: str) -> None:
    """Refuse the program JSON unless deserializing it can only build a plain graph.

    Imports the ``transformers`` modules whose output types the program returns, so that
    torch finds them registered.

    Raises
    ------
    ModelLoadError
        Naming the op, expression, type or field that is not admitted.
    """
    if program.get("guards_code"):
        raise ModelLoadError(
            f"{origin} carries guards_code, which torch would run as Python; {_REEXPORT}"
        )
    for key, value in _items(program):
        if key in ("target", "as_operator"):
            _check_op(value, origin)
        elif key == "expr_str":
            _check_expr(value, origin)
        elif key in ("in_spec", "out_spec"):
            _check_treespec(value, origin)
        elif key in ("as_custom_obj", "custom_obj") or (key == "custom_obj_values" and value):
            raise ModelLoadError(
                f"{origin} holds custom objects ({key}), which load by running code from the "
                f"file; {_REEXPORT} from a model without torchbind or script objects"
            )


def uses_marker_op(program: dict[str, Any]) -> bool:
    """Whether the program calls ``pipe_split()`` markers (``pippy::_pipe_split``)."""
    return any(key == "target" and value == MARKER_OP for key, value in _items(program))


def _items(document: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` pair of every JSON object nested in ``document``."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_op(target: Any, origin: str) -> None:
    aten = _ATEN_OP.fullmatch(target) if isinstance(target, str) else None
    if target in _OTHER_OPS or (aten is not None and aten.group(1) not in _REFUSED_ATEN):
        return
    raise ModelLoadError(
        f"{origin} calls {target!r}, which is not an ATen op edgesplit runs; {_REEXPORT}"
    )


def _check_expr(text: Any, origin: str) -> None:
    """Admit a shape expression only if it is sympy arithmetic on symbols and numbers."""
    try:
        tree = ast.parse(text, mode="eval") if isinstance(text, str) else None
    except (SyntaxError, ValueError, RecursionError):
        tree = None
    if tree is None or not _plain_expr(tree.body):
        raise ModelLoadError(
            f"{origin} holds the shape expression {str(text)[:80]!r}, which is not plain "
            f"sympy arithmetic and would run as Python; {_REEXPORT}"
        )


def _plain_expr(node: ast.AST) -> bool:
    match node:
        case ast.Constant(value=bool() | float()):
            return True
        case ast.Constant(value=int() as number):
            return abs(number) < 2**63
        case ast.Name(id=name):
            return _SYMBOL.fullmatch(name) is not None
        case ast.UnaryOp(op=ast.USub | ast.UAdd, operand=operand):
            return _plain_expr(operand)
        case ast.BinOp(left=left, op=op, right=right):
            return isinstance(op, _ARITHMETIC) and _plain_expr(left) and _plain_expr(right)
        case ast.Call(func=ast.Name(id="Symbol"), args=[ast.Constant(value=str() as name)]):
            return _SYMBOL.fullmatch(name) is not None and all(
                keyword.arg in _SYMBOL_ASSUMPTIONS
                and isinstance(keyword.value, ast.Constant)
                and isinstance(keyword.value.value, bool)
                for keyword in node.keywords
            )
        case ast.Call(func=ast.Name(id=function), args=args, keywords=[]):
            return function in _SYMPY_CALLS and all(_plain_expr(arg) for arg in args)
    return False


def _check_treespec(spec: Any, origin: str) -> None:
    """Admit a serialized pytree spec whose types are known and whose contexts are plain."""
    try:
        protocol, root = json.loads(spec)
    except (TypeError, ValueError, RecursionError):
        raise ModelLoadError(f"{origin} is a damaged torch.export archive; save it again") from None
    if protocol != 1:
        raise ModelLoadError(f"{origin} holds a pytree spec of protocol {protocol!r}; {_REEXPORT}")
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("children_spec"), list):
            raise ModelLoadError(f"{origin} is a damaged torch.export archive; save it again")
        _admit_pytree_type(node.get("type"), origin)
        _check_context(node.get("context"), origin)
        stack.extend(node["children_spec"])


def _admit_pytree_type(name: Any, origin: str) -> None:
    """Accept a plain container, or a ``transformers`` output type (imported to register it)."""
    if name is None or name in _CONTAINER_TYPES:
        return
    found = _TRANSFORMERS_TYPE.fullmatch(name) if isinstance(name, str) else None
    if found is None:
        raise ModelLoadError(
            f"{origin} returns the pytree type {name!r}, which edgesplit does not import; "
            "export a model that returns plain tensors, tuples or transformers outputs"
        )
    module = found.group(1)
    try:
        importlib.import_module(module)  # registers the module's ModelOutput types
    except ImportError as err:
        raise ModelLoadError(
            f"{origin} returns a pytree type from {module!r}, which cannot be imported here; "
            "install it, or export a model that returns plain tensors or tuples"
        ) from err
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        raise ModelLoadError(
            f"{origin} returns the pytree type {name!r}, which {module!r} does not register; "
            "export a model that returns plain tensors or tuples"
        )


def _check_context(context: Any, origin: str) -> None:
    """Refuse a pytree context holding JSON objects: torch imports the module they name."""
    try:
        decoded = json.loads(context) if isinstance(context, str) else context
    except (ValueError, RecursionError):
        return  # a type name (namedtuple), looked up in torch's registry only
    if _holds_object(decoded):
        raise ModelLoadError(
            f"{origin} holds a pytree context with a JSON object, from which torch would "
            f"import a module; {_REEXPORT}"
        )


def _holds_object(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and any(_holds_object(item) for item in value)
