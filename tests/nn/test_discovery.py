"""First-layer discovery: the rule on small hand-made models (through torch.fx and through one
forward run on example inputs), and Hugging Face models built from small configs."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainact
from testing.harness import model_step_error
from trainact.nn import compat
from trainact.nn.discovery import find_first_layer

# ---- hand-made models: each first meets its input in one particular way ------------------------


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


class FunctionalStem(Plain):
    def forward(self, x):
        return self.head(F.conv2d(x, self.stem.weight, self.stem.bias).mean((2, 3)))


class MatmulFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(x @ self.w)


class AttentionFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


class EmbeddingFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.emb(x))


class LSTMFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class NormFirst(nn.Module):
    """Audio models often normalize the waveform before the first conv: the norm is no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(1, 1), nn.Conv1d(1, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(self.norm(x[:, None])).mean(-1))


class MaskedViT(nn.Module):
    """timm's ViT signature: ``forward(x, attn_mask=None, is_causal=False)``. The mask meets the
    attention output, whose projection must not count as a first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, attn_mask=None, is_causal=False):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1)  # reads only x's shape
        q, k, v = self.qkv(h).chunk(3, -1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.head(self.proj(a)[:, 0])


class SubclassStem(nn.Module):
    """fx would trace into a subclass's forward and see only ``conv2d``: it is kept whole."""

    class MyConv(nn.Conv2d):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = self.MyConv(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


class WrittenIntoBuffer(Plain):
    """The input reaches the stem only by being copied into another tensor."""

    def forward(self, x):
        buf = x.new_zeros(x.shape)  # only x's shape
        buf.copy_(x)
        return super().forward(buf)


class AssignedIntoBuffer(Plain):
    """Item assignment, or a write into a view (fx cannot trace either; a run can)."""

    def __init__(self, through_view: bool) -> None:
        super().__init__()
        self.through_view = through_view

    def forward(self, x):
        buf = torch.zeros(x.shape)
        if self.through_view:
            buf.narrow(0, 0, x.shape[0]).copy_(x)
        else:
            buf[:] = x
        return super().forward(buf)


class ShapeOnlyToHead(nn.Module):
    """The head also receives a tensor built from the input's shape alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        zeros = torch.zeros_like(x)[:, :1, 0, 0, None] + x.new_zeros(x.shape[0], 4)
        return self.head(self.stem(x).mean((2, 3)) + zeros)


class Branchy(Plain):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return super().forward(x)


class TwoArgs(Plain):
    def forward(self, x, scale):
        return super().forward(x * scale)


IMAGES = torch.randn(2, 3, 8, 8)
FOUND = [
    (Plain, IMAGES, "stem"),
    (NormFirst, torch.randn(2, 16), "conv"),
    (MaskedViT, IMAGES, "patch"),
    (SubclassStem, IMAGES, "stem"),
    (WrittenIntoBuffer, IMAGES, "stem"),
    (ShapeOnlyToHead, IMAGES, "stem"),
]
REFUSED = [  # (model, input, words the error must contain)
    (FunctionalStem, IMAGES, ["stem (Conv2d)", "called functionally", "F.conv2d"]),
    (MatmulFirst, torch.randn(2, 8), ["matmul with weight w", "cannot precondition"]),
    (AttentionFirst, torch.randn(2, 5, 8), ["attn (nn.MultiheadAttention)", "does not support"]),
    (EmbeddingFirst, torch.randint(0, 10, (2, 5)), ["emb (nn.Embedding)", "does not support"]),
    (LSTMFirst, torch.randn(2, 5, 8), ["rnn (nn.LSTM)", "does not support"]),
]


@pytest.mark.parametrize("run", [False, True], ids=["fx", "run"])
@pytest.mark.parametrize(("cls", "x", "expected"), FOUND, ids=[c[0].__name__ for c in FOUND])
def test_first_layer_found(cls, x, expected, run):
    if cls is MaskedViT and not run and compat.torch_version() < (2, 11):
        pytest.skip("torch.fx passes is_causal= to attention as a Proxy (seen on 2.4 and 2.8)")
    assert find_first_layer(cls(), x if run else None) == expected


@pytest.mark.parametrize("run", [False, True], ids=["fx", "run"])
@pytest.mark.parametrize(("cls", "x", "words"), REFUSED, ids=[c[0].__name__ for c in REFUSED])
def test_input_first_meeting_an_unsupported_weight_raises(cls, x, words, run):
    """Never the Linear after it: the error names what the input meets first."""
    with pytest.raises(ValueError) as info:
        trainact.apply(cls(), example_inputs=x if run else None)
    for word in words:
        assert word in str(info.value)
    assert not re.search(r"\bhead\b", str(info.value))


def test_untraceable_model_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs=") as info:
        trainact.apply(Branchy())
    assert "stem, head" in str(info.value) and str(info.value).count("\n") <= 2
    model = Branchy()
    assert trainact.apply(model, example_inputs=IMAGES) == "stem"
    assert trainact.is_enabled(model.stem) and not trainact.is_enabled(model.head)


def test_untraceable_model_with_one_layer_and_no_other_weight():
    class OneConv(nn.Module):
        def __init__(self, extra: nn.Module) -> None:
            super().__init__()
            self.extra, self.conv = extra, nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.conv(self.extra(x))

    assert find_first_layer(OneConv(nn.BatchNorm2d(3))) == "conv"
    with pytest.raises(ValueError, match="example_inputs="):  # the norm could be a stem
        find_first_layer(OneConv(nn.ConvTranspose2d(3, 3, 1)))


@pytest.mark.parametrize("through_view", [False, True])
def test_the_run_follows_item_assignment_and_writes_into_views(through_view):
    assert find_first_layer(AssignedIntoBuffer(through_view), IMAGES) == "stem"


def test_example_inputs_as_tensor_tuple_and_dict():
    scale = torch.tensor(2.0)
    assert find_first_layer(Plain(), IMAGES) == "stem"
    assert find_first_layer(TwoArgs(), (IMAGES, scale)) == "stem"
    assert find_first_layer(TwoArgs(), {"x": IMAGES, "scale": scale}) == "stem"
    with pytest.raises(TypeError, match="list"):
        find_first_layer(Plain(), [IMAGES])
    with pytest.raises(ValueError, match="no tensor"):
        find_first_layer(TwoArgs(), (1.0, 2.0))
    with pytest.raises(ValueError, match="not both"):
        trainact.apply(Plain(), layer="stem", example_inputs=IMAGES)


def test_two_inputs_each_reaching_a_layer_cannot_be_decided():
    class TwoTowers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    for inputs in (None, (torch.randn(2, 3), torch.randn(2, 5))):
        with pytest.raises(ValueError, match="several layers first: a, b"):
            find_first_layer(TwoTowers(), inputs)


def test_the_run_restores_modes_and_leaves_no_hook_or_gradient():
    model = Plain().train()
    model.head.eval()
    find_first_layer(model, IMAGES.requires_grad_())
    assert model.training and model.stem.training and not model.head.training
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert all(p.grad is None for p in model.parameters())


# ---- Hugging Face models from small configs (no download) --------------------------------------

VIT = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "image_size": 16,
    "patch_size": 8,
}
WAV2VEC2 = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "conv_dim": (8, 8),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    # no randomness in training mode, so a plain and a TrAct copy see the same forward
    "hidden_dropout": 0.0,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "layerdrop": 0.0,
    "mask_time_prob": 0.0,
}


def _hf_model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """(model, example inputs, the first layer) for a tiny Hugging Face model."""
    t = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    images = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if name == "vit":
        return t.ViTModel(t.ViTConfig(**VIT)), images, "embeddings.patch_embeddings.projection"
    if name == "deit":
        return t.DeiTModel(t.DeiTConfig(**VIT)), images, "embeddings.patch_embeddings.projection"
    if name == "convnext":
        config = t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        return t.ConvNextModel(config), images, "embeddings.patch_embeddings"
    if name == "resnet":
        config = t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
        return t.ResNetModel(config), images, "embedder.embedder.convolution"
    if name == "swin":
        config = t.SwinConfig(
            image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=2
        )
        return t.SwinModel(config), images, "embeddings.patch_embeddings.projection"
    if name == "wav2vec2":
        audio = {"input_values": torch.randn(2, 400, generator=g)}
        model = t.Wav2Vec2Model(t.Wav2Vec2Config(**WAV2VEC2))
        return model, audio, "feature_extractor.conv_layers.0.conv"
    if name == "whisper":
        config = t.WhisperConfig(
            d_model=16,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=16,
            num_mel_bins=8,
            max_source_positions=16,
        )
        features = {"input_features": torch.randn(2, 8, 32, generator=g)}
        return t.WhisperForAudioClassification(config), features, "encoder.conv1"
    if name == "patchtst":
        config = t.PatchTSTConfig(
            num_input_channels=3,
            context_length=32,
            patch_length=8,
            patch_stride=8,
            d_model=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=16,
        )
        series = {"past_values": torch.randn(2, 32, 3, generator=g)}
        return t.PatchTSTModel(config), series, "encoder.embedder.input_embedding"
    raise AssertionError(name)


HF_MODELS = ["vit", "deit", "convnext", "resnet", "swin", "wav2vec2", "whisper", "patchtst"]


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_models(name):
    model, inputs, expected = _hf_model(name)
    with pytest.raises(ValueError, match="torch.fx cannot trace") as info:
        trainact.apply(model)  # fx cannot trace them: a short error that says what to do
    message = str(info.value)
    assert message.count("\n") <= 2 and len(message) < 600, message
    assert f"example_inputs={{'{model.main_input_name}': batch}}" in message
    assert expected in message
    assert trainact.apply(model, example_inputs=inputs) == expected
    assert [n for n, _ in trainact.enabled_layers(model)] == [expected]


def test_bert_first_layer_is_an_embedding():
    t = pytest.importorskip("transformers")
    config = t.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"embeddings.word_embeddings \(nn.Embedding\)"):
        trainact.apply(t.BertModel(config), example_inputs=inputs)


def test_a_padding_mask_is_no_input_to_the_attention():
    """A boolean mask selects values, it does not supply them: Wav2Vec2 zeroes padded frames
    with ``hidden[~mask] = 0`` and masks attention, and its layers must not become candidates."""
    model, inputs, expected = _hf_model("wav2vec2")
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 300:] = 0
    assert find_first_layer(model, {**inputs, "attention_mask": mask}) == expected


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_training_step_gets_the_tract_gradient(device64, name):
    """After ``apply(model, example_inputs=...)`` the chosen layer's weight gradient in a
    training step is G·(XᵀX/n + λI)⁻¹ of the input it saw, as the float64 reference says."""
    model, inputs, _ = _hf_model(name)
    model.to(device64, torch.float64).train()
    inputs = {k: v.to(device64, torch.float64) for k, v in inputs.items()}
    layer_name = trainact.apply(model, lam=0.1, example_inputs=inputs)
    plain = trainact.remove(copy.deepcopy(model))
    assert model_step_error(model, layer_name, kwargs=inputs, plain=plain) < 1e-9
    grad = model.get_submodule(layer_name).weight.grad
    plain_grad = plain.get_submodule(layer_name).weight.grad
    assert (grad - plain_grad).norm() > 0.1 * plain_grad.norm()  # TrAct changed it
