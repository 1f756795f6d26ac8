"""Model loading: every wrong file gets one clear sentence and the right exception."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import model_zoo
import pytest
import torch

from coordinator.cli import main
from coordinator.samples import SkipDag
from partition.artifact import ProgramRunner
from partition.errors import EdgesplitError, ExportError, ModelLoadError
from partition.layers import build_layer_graph
from partition.loader import load_model, parse_input_shape
from partition.modules import build_range_module
from partition.spec import TensorSpec

REPO = Path(__file__).resolve().parents[2]


def _higher_order_ops(program: torch.export.ExportedProgram) -> list[str]:
    return [
        str(n.target)
        for n in program.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
    ]


def _run_layers(program: torch.export.ExportedProgram, inputs: tuple) -> list[torch.Tensor]:
    """Run the program's layers one after another, as the pipeline would."""
    layer_graph = build_layer_graph(program)
    env = dict(zip(layer_graph.user_inputs, inputs, strict=True))
    with torch.no_grad():
        for i in range(layer_graph.num_layers):
            env.update(build_range_module(layer_graph, i, i + 1)(env))
    return [env[name] for name in layer_graph.user_outputs]


def _export_archive(module: torch.nn.Module, inputs: tuple, path: Path) -> Path:
    with torch.no_grad():
        torch.export.save(torch.export.export(module.eval(), inputs), path)
    return path


def _skip_dag_archive(directory: Path) -> bytes:
    torch.manual_seed(0)
    path = _export_archive(SkipDag(), (torch.randn(4, 64),), directory / "skip.pt2")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Files that are not a model edgesplit can load: (maker, words the message must contain)

def _missing(d: Path) -> Path:
    return d / "no-such-model.pt2"


def _random_bytes(d: Path) -> Path:
    path = d / "noise.pt2"
    path.write_bytes(b"\x00" + random.Random(0).randbytes(4095))
    return path


def _text_file(d: Path) -> Path:
    path = d / "notes.pt2"
    path.write_text("this is a text file, not a model\n")
    return path


def _legacy_pickle(d: Path) -> Path:
    path = d / "legacy.pt"
    torch.save(SkipDag().state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def _truncated_archive(d: Path) -> Path:
    data = _skip_dag_archive(d)
    path = d / "truncated.pt2"
    path.write_bytes(data[: len(data) // 2])
    return path


def _damaged_archive(d: Path) -> Path:
    """A well-formed zip whose exported program's JSON is garbage."""
    data = _skip_dag_archive(d)
    path = d / "damaged.pt2"
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            body = src.read(name)
            dst.writestr(name, b"{not json" if name.endswith("models/model.json") else body)
    return path


def _foreign_zip(d: Path) -> Path:
    path = d / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "holiday photos")
        archive.writestr("img/1.jpg", b"\xff\xd8\xff")
    return path


def _state_dict(d: Path) -> Path:
    path = d / "weights.pt"
    torch.save(SkipDag().state_dict(), path)
    return path


def _scripted(d: Path) -> Path:
    path = d / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), path)
    return path


def _traced(d: Path) -> Path:
    path = d / "traced.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 4), torch.randn(1, 4)), path)
    return path


def _pickled_module(d: Path) -> Path:
    path = d / "whole.pt"
    torch.save(SkipDag(), path)
    return path


def _pickled_dict(d: Path) -> Path:
    path = d / "settings.pt"
    torch.save({"epochs": 3, "name": "run-1"}, path)
    return path


BAD_FILES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing": (_missing, ("does not exist", "no-such-model.pt2")),
    "random-bytes": (_random_bytes, ("is not a PyTorch file", "torch.export.save")),
    "text-file": (_text_file, ("is not a PyTorch file", "torch.export.save")),
    "legacy-format": (_legacy_pickle, ("legacy", "re-save")),
    "truncated-archive": (_truncated_archive, ("truncated or corrupt",)),
    "damaged-archive": (_damaged_archive, ("damaged torch.export archive",)),
    "foreign-zip": (_foreign_zip, ("zip file but not a PyTorch model", "torch.export.save")),
    "state-dict": (_state_dict, ("state_dict", "torch.export.save", "torch.save(model, path)",
                                 "--allow-pickle")),
    "torchscript-script": (_scripted, ("TorchScript archive", "torch.export.save")),
    "torchscript-trace": (_traced, ("TorchScript archive", "torch.export.save")),
    "pickled-module": (_pickled_module, ("pickled nn.Module", "runs code", "--allow-pickle")),
    "pickled-dict": (_pickled_dict, ("holds a dict, not a model",)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_one_clear_sentence(case: str, tmp_path: Path) -> None:
    maker, words = BAD_FILES[case]
    path = maker(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert not isinstance(caught.value, ExportError)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_cli_shows_bad_file_as_one_error_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    maker, words = BAD_FILES[case]
    path = maker(tmp_path)
    assert main(["profile", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coordinator: error: ")
    assert words[0] in lines[0]
    assert "Traceback" not in out + err


def test_loading_a_pickle_without_opt_in_runs_none_of_its_code(tmp_path: Path) -> None:
    path = tmp_path / "tripwire.pt"
    torch.save(model_zoo.Tripwire(), path)
    model_zoo.UNPICKLED.clear()
    with pytest.raises(ModelLoadError, match="runs code"):
        load_model(path)
    assert model_zoo.UNPICKLED == []
    # The same file with the opt-in does unpickle it: the tripwire works.
    load_model(path, allow_pickle=True, input_shapes=(parse_input_shape("2x8"),))
    assert model_zoo.UNPICKLED == ["Tripwire"]


def test_pickled_module_needs_input_shapes(tmp_path: Path) -> None:
    path = _pickled_module(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, allow_pickle=True)
    message = str(caught.value)
    assert "no recorded inputs" in message and "--input-shape" in message
    assert "\n" not in message


def test_pickled_module_with_shapes_loads_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SkipDag().eval()
    path = tmp_path / "whole.pt"
    torch.save(module, path)
    loaded = load_model(path, allow_pickle=True, input_shapes=(parse_input_shape("4x64"),))
    assert [tuple(t.shape) for t in loaded.example_inputs] == [(4, 64)]
    assert loaded.input_specs[0].shape == (4, 64)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    (got,) = ProgramRunner(loaded.program)(*loaded.example_inputs)
    with torch.no_grad():
        want = module(*loaded.example_inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pickled_module_that_cannot_export_names_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "branchy.pt"
    torch.save(model_zoo.DataDependent(), path)
    with pytest.raises(ExportError) as caught:
        load_model(path, allow_pickle=True, input_shapes=(parse_input_shape("2x8"),))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"torch.export could not trace {path}")
    cause = caught.value.__cause__
    assert cause is not None and type(cause).__name__ in message
    assert "data-dependent" in message or "data dependent" in message.lower()


def test_pickled_object_that_is_not_a_module(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save(model_zoo.NotAModule(), path)
    with pytest.raises(ModelLoadError, match="holds a NotAModule, not an nn.Module"):
        load_model(path, allow_pickle=True, input_shapes=(parse_input_shape("2x8"),))


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("1x3x64x64", TensorSpec("input", "float32", (1, 3, 64, 64))),
        ("4x64", TensorSpec("input", "float32", (4, 64))),
        ("1x128:int64", TensorSpec("input", "int64", (1, 128))),
        (" 8:float16 ", TensorSpec("input", "float16", (8,))),
    ],
)
def test_parse_input_shape(text: str, spec: TensorSpec) -> None:
    assert parse_input_shape(text) == spec


@pytest.mark.parametrize("text", ["", "1x", "x3", "1,3,64", "1x3.5", "-1x3", "1 x 3", "abc"])
def test_parse_input_shape_rejects_non_shapes(text: str) -> None:
    with pytest.raises(ModelLoadError, match="is not a shape"):
        parse_input_shape(text)


def test_parse_input_shape_rejects_unknown_dtype() -> None:
    # An unknown dtype raises TensorSpecError (an EdgesplitError the CLI shows as one line).
    with pytest.raises(EdgesplitError, match="unknown dtype 'float99'"):
        parse_input_shape("1x3:float99")


def _fresh_python(script: str) -> str:
    """Run ``script`` in a new interpreter (nothing imported yet) and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_archive_returning_a_model_output_loads_in_a_fresh_process(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    path = _export_archive(
        GPT2Model(config), (torch.zeros(1, 8, dtype=torch.int64),), tmp_path / "gpt2.pt2"
    )
    out = _fresh_python(f"""
        import sys
        from partition.loader import load_model
        assert "transformers" not in sys.modules
        model = load_model({str(path)!r})
        print(model.program.call_spec.out_spec.type.__name__)
        print("transformers.modeling_outputs" in sys.modules)
    """)
    assert out.split() == ["BaseModelOutputWithPastAndCrossAttentions", "True"]


def test_archive_with_pipe_split_markers_loads_in_a_fresh_process(tmp_path: Path) -> None:
    path = _export_archive(model_zoo.PipeSplit(), (torch.randn(2, 16),), tmp_path / "pipe.pt2")
    out = _fresh_python(f"""
        from partition.layers import build_layer_graph
        from partition.loader import load_model
        model = load_model({str(path)!r})
        print(build_layer_graph(model.program, "markers").num_layers)
    """)
    assert out.split() == ["3"]  # two pipe_split() calls make three layers


def test_grad_enabled_export_has_its_sub_graphs_flattened(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = model_zoo.GradRegion().eval()
    inputs = (torch.randn(2, 8),)
    program = torch.export.export(module, inputs)  # gradients enabled on purpose
    assert _higher_order_ops(program) == ["wrap_with_set_grad_enabled"]
    path = tmp_path / "grad.pt2"
    torch.export.save(program, path)
    loaded = load_model(path)
    assert _higher_order_ops(loaded.program) == []
    with torch.no_grad():
        want = module(*inputs)
    (got,) = _run_layers(loaded.program, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model_llama() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, use_cache=False,
    )
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    return LlamaModel(config).eval(), (ids,)


@pytest.mark.parametrize("grad", [True, False], ids=["grad-enabled", "no-grad"])
def test_rotary_model_loads_flat_and_its_layers_reproduce_it(
    grad: bool, model_llama: tuple, tmp_path: Path
) -> None:
    module, inputs = model_llama
    with torch.set_grad_enabled(grad):
        program = torch.export.export(module, inputs)
    # With torch 2.13 and transformers 5 the rotary embedding no longer runs under
    # @torch.no_grad(), so even a grad-enabled export has no wrap_with_set_grad_enabled
    # sub-graph (GradRegion above covers that path); whatever the export holds, the
    # loaded program must be flat.
    assert _higher_order_ops(program) == []
    path = tmp_path / "llama.pt2"
    torch.export.save(program, path)
    loaded = load_model(path)
    assert _higher_order_ops(loaded.program) == []
    with torch.no_grad():
        want = module(*inputs).last_hidden_state
    (got,) = _run_layers(loaded.program, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cli_shows_an_export_failure_as_one_error_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "branchy.pt"
    torch.save(model_zoo.DataDependent(), path)
    code = main(["profile", str(path), "--allow-pickle", "--input-shape", "2x8"])
    out, err = capfd.readouterr()
    assert code == 2
    # Only the error, and perhaps the warning that unpickling runs code: no partial graph
    # printed by torch.export, no traceback.
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if "runs code from the file" not in line] == lines[-1:]
    assert lines[-1].startswith("coordinator: error: torch.export could not trace")
    assert "def forward" not in out + err and "Traceback" not in out + err
