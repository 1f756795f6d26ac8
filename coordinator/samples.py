"""Small sample models built from ``transformers`` configs with random weights (no downloads)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from partition.loader import export_module

SampleBuilder = Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]


def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def gpt2(layers: int = 4, width: int = 128, batch: int = 1, seq: int = 32) -> SampleBuilder:
    def build():
        from transformers import GPT2Config, GPT2Model

        _quiet_transformers()
        config = GPT2Config(
            n_layer=layers, n_embd=width, n_head=max(width // 64, 2), vocab_size=1024,
            n_positions=max(seq, 64), use_cache=False, bos_token_id=0, eos_token_id=0,
        )
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=_gen())
        return GPT2Model(config), (ids,)

    return build


def bert(layers: int = 4, width: int = 128, batch: int = 1, seq: int = 32) -> SampleBuilder:
    def build():
        from transformers import BertConfig, BertModel

        _quiet_transformers()
        config = BertConfig(
            num_hidden_layers=layers, hidden_size=width, num_attention_heads=max(width // 64, 2),
            intermediate_size=4 * width, vocab_size=1024, max_position_embeddings=max(seq, 64),
        )
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=_gen())
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[:, seq * 3 // 4 :] = 0
        return _Positional(BertModel(config)), (ids, mask)

    return build


def vit(layers: int = 4, width: int = 128, image: int = 64, batch: int = 1) -> SampleBuilder:
    def build():
        from transformers import ViTConfig, ViTModel

        _quiet_transformers()
        config = ViTConfig(
            num_hidden_layers=layers, hidden_size=width, num_attention_heads=max(width // 64, 2),
            intermediate_size=4 * width, image_size=image, patch_size=8,
        )
        return ViTModel(config), (torch.randn(batch, 3, image, image, generator=_gen()),)

    return build


def resnet(image: int = 64, batch: int = 1) -> SampleBuilder:
    def build():
        from transformers import ResNetConfig, ResNetModel

        _quiet_transformers()
        config = ResNetConfig(
            embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1]
        )
        return ResNetModel(config), (torch.randn(batch, 3, image, image, generator=_gen()),)

    return build


def mobilenet_v2(image: int = 64, batch: int = 1) -> SampleBuilder:
    def build():
        from transformers import MobileNetV2Config, MobileNetV2Model

        _quiet_transformers()
        config = MobileNetV2Config(image_size=image)
        return MobileNetV2Model(config), (torch.randn(batch, 3, image, image, generator=_gen()),)

    return build


class SkipDag(torch.nn.Module):
    """A hand-written DAG: the stem's output skips over three blocks to the head."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(width, width)
        self.block1 = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
        self.block3 = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
        self.head = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        y = self.block3(self.block2(self.block1(skip)))
        return self.head(y + skip)


def skip_dag(width: int = 64, batch: int = 4) -> SampleBuilder:
    def build():
        return SkipDag(width), (torch.randn(batch, width, generator=_gen()),)

    return build


class _Positional(torch.nn.Module):
    """Call a model with ``(input_ids, attention_mask)`` as positional arguments."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


SAMPLES: dict[str, SampleBuilder] = {
    "gpt2": gpt2(),
    "bert": bert(),
    "vit": vit(),
    "resnet": resnet(),
    "mobilenet_v2": mobilenet_v2(),
    "skip_dag": skip_dag(),
}


def build_sample(builder: SampleBuilder) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Build a sample with a fixed seed so its weights are the same every time."""
    torch.manual_seed(0)
    model, inputs = builder()
    return model.eval(), inputs


def write_sample(builder: SampleBuilder, path: str | Path) -> Path:
    """Export a sample model and save it as a ``torch.export`` archive at ``path``."""
    model, inputs = build_sample(builder)
    program = export_module(model, inputs, origin="sample model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        torch.export.save(program, file)
    return path
