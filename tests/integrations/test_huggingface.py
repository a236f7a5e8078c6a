"""trainact.huggingface.TrActTrainer against the real transformers Trainer (CPU, float64)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

import trainact
from testing.tiny_task import N, make_data, make_net, reference

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (a dependency of transformers)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from trainact.huggingface import TrActTrainer  # noqa: E402

LR, MOMENTUM = 0.5, 0.9


class Classifier(nn.Module):
    """The tiny net behind the Trainer's interface: keyword inputs in, a dict with the loss out."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_net(seed)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def dataset() -> list[dict[str, torch.Tensor]]:
    x, y = make_data()
    return [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]


def arguments(out, epochs: int, accumulate: int = 1, **kwargs) -> transformers.TrainingArguments:
    """Every optimizer step takes all N samples, in N/accumulate per micro-batch."""
    options = {
        "optim": "sgd",
        "optim_args": f"momentum={MOMENTUM}",
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "save_strategy": "no",
    } | kwargs
    options = {
        "per_device_train_batch_size": N // accumulate,
        "gradient_accumulation_steps": accumulate,
    } | options
    return transformers.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        weight_decay=0.0,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **options,
    )


def ref(steps, **kwargs):
    x, y = make_data()
    return reference(make_net(0), x, y, steps, lr=LR, momentum=MOMENTUM, **kwargs)


def tiny_vit_config(**kwargs) -> transformers.ViTConfig:
    """A ViT of 6×6 images in 3×3 patches, one layer of width 8: a real model in milliseconds."""
    return transformers.ViTConfig(
        image_size=6,
        patch_size=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        **kwargs,
    )


def stem(model: Classifier) -> torch.Tensor:
    return model.net[0].weight.detach()


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_micro_batches_equal_one_big_batch_and_tract_comes_before_clipping(
    tmp_path, accumulate, clip
):
    model, epochs = Classifier(), 3
    args = arguments(tmp_path, epochs, accumulate, max_grad_norm=clip or 0.0)
    TrActTrainer(model=model, args=args, train_dataset=dataset(), tract_layer="net.0").train()
    steps = [slice(None)] * epochs
    expected, min_norm = ref(steps, clip=clip)
    torch.testing.assert_close(stem(model), expected[-1], rtol=1e-12, atol=1e-12)
    assert (stem(model) - ref(steps, clip=clip, order="plain")[0][-1]).abs().max() > 1e-3
    if clip is not None:
        assert min_norm > 2 * clip  # clipping binds at every step
        wrong_order = ref(steps, clip=clip, order="clip_then_tract")[0][-1]
        assert (stem(model) - wrong_order).abs().max() > 1e-3


def test_last_shorter_accumulation_of_an_epoch(tmp_path):
    """Micro-batches of 4, accumulating 3: each epoch steps on samples 0-11, then on 12-15."""
    model = Classifier()
    args = arguments(
        tmp_path,
        2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        train_sampling_strategy="sequential",
    )
    TrActTrainer(model=model, args=args, train_dataset=dataset(), tract_layer="net.0").train()
    expected, _ = ref([slice(0, 12), slice(12, N)] * 2)
    torch.testing.assert_close(stem(model), expected[-1], rtol=1e-12, atol=1e-12)


def test_default_optimizer_is_exact_with_accumulation(tmp_path):
    """The default optimizer (adamw_torch_fused, with a linear schedule and weight decay):
    4 micro-batches train like one batch of 4x; without TrAct the weights differ."""

    def train(trainer_class, accumulate: int, **kwargs) -> Classifier:
        model = Classifier()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=N // accumulate,
            gradient_accumulation_steps=accumulate,
            num_train_epochs=3,
            learning_rate=0.05,
            weight_decay=0.01,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = trainer_class(model=model, args=args, train_dataset=dataset(), **kwargs)
        trainer.train()
        assert trainer.args.optim == "adamw_torch_fused"
        assert trainer.optimizer.defaults["fused"]
        return model

    micro = train(TrActTrainer, 4, tract_layer="net.0")
    big = train(TrActTrainer, 1, tract_layer="net.0")
    torch.testing.assert_close(stem(micro), stem(big), rtol=1e-10, atol=1e-12)
    plain = train(transformers.Trainer, 1)
    assert (stem(big) - stem(plain)).abs().max() > 1e-3


def test_checkpoint_resume_continues_identically(tmp_path):
    """4 steps straight, or 2 steps, a checkpoint, and a new model and Trainer resuming."""
    straight = Classifier()
    args = arguments(tmp_path / "straight", 4, 2)
    TrActTrainer(model=straight, args=args, train_dataset=dataset(), tract_layer="net.0").train()

    out = tmp_path / "stopped"
    args = arguments(out, 4, 2, save_strategy="steps", save_steps=2)
    stopped = TrActTrainer(
        model=Classifier(), args=args, train_dataset=dataset(), tract_layer="net.0"
    )
    stopped.train()
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == Classifier().state_dict().keys()  # the plain model's keys

    resumed = Classifier(seed=5)  # other initial weights: the checkpoint must restore them
    trainer = TrActTrainer(model=resumed, args=args, train_dataset=dataset(), tract_layer="net.0")
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainact.is_enabled(resumed)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_init_gets_tract(tmp_path):
    trainer = TrActTrainer(
        model_init=lambda: Classifier(),
        args=arguments(tmp_path, 2),
        train_dataset=dataset(),
        tract_layer="net.0",
    )
    trainer.train()  # builds a second model with model_init
    assert trainact.is_enabled(trainer.model)
    expected, _ = ref([slice(None)] * 2)
    torch.testing.assert_close(stem(trainer.model), expected[-1], rtol=1e-12, atol=1e-12)


def test_untraceable_model_without_a_layer_is_refused(tmp_path):
    model = transformers.ViTForImageClassification(tiny_vit_config())
    with pytest.raises(ValueError, match="tract_example_inputs=") as raised:
        TrActTrainer(model=model, args=arguments(tmp_path, 1), train_dataset=dataset())
    assert "tract_layer=" in str(raised.value)  # the Trainer's keywords, not apply()'s
    assert not re.search(r"(?<!tract_)(example_inputs|layer)=", str(raised.value))
    assert not trainact.is_enabled(model)


def test_where_tract_runs_is_said_in_the_trainers_log(tmp_path):
    """One line, through the Trainer's own logger (a handler on it sees each record once,
    whatever else propagates or captures them)."""
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    trainer_logger = logging.getLogger("transformers.trainer")
    transformers.logging.set_verbosity_info()
    trainer_logger.addHandler(handler)
    try:
        trainer = TrActTrainer(
            model=Classifier(),
            args=arguments(tmp_path, 1),
            train_dataset=dataset(),
            tract_layer="net.0",
        )
        trainer.train()
    finally:
        trainer_logger.removeHandler(handler)
        transformers.logging.set_verbosity_warning()
    assert [line for line in seen if line.startswith("TrAct on net.0 (Conv2d)")] == [
        trainact.summary(trainer.model)
    ]


def test_already_enabled_model_is_refused(tmp_path):
    model = Classifier()
    trainact.apply(model, layer="net.0")
    with pytest.raises(RuntimeError, match="already enabled"):
        TrActTrainer(model=model, args=arguments(tmp_path, 1), train_dataset=dataset())


def test_ema_with_averaged_model(tmp_path):
    """An AveragedModel (a deep copy of the TrAct model) kept by a callback averages the TrAct
    trajectory."""
    decay, epochs = 0.5, 3

    class EMA(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.average.update_parameters(model)

    ema, model = EMA(), Classifier()
    args = arguments(tmp_path, epochs, 2)
    TrActTrainer(
        model=model, args=args, train_dataset=dataset(), callbacks=[ema], tract_layer="net.0"
    ).train()
    trajectory, _ = ref([slice(None)] * epochs)
    average = trajectory[0]
    for weight in trajectory[1:]:
        average = decay * average + (1 - decay) * weight
    torch.testing.assert_close(stem(ema.average.module), average, rtol=1e-12, atol=1e-12)


def test_vit_from_a_small_config(tmp_path):
    """A real PreTrainedModel (its loss takes the Trainer's loss kwargs), float32: 4 micro-batches
    train its patch embedding like one batch of 4x; without TrAct the weights differ."""
    config = tiny_vit_config(num_labels=3)
    x, y = make_data()
    data = [{"pixel_values": xi.float() + 1, "labels": yi} for xi, yi in zip(x, y, strict=True)]
    layer = "vit.embeddings.patch_embeddings.projection"

    def train(trainer_class, accumulate: int, **kwargs) -> torch.Tensor:
        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(config)
        args = arguments(tmp_path, 3, accumulate, learning_rate=0.05, optim="adamw_torch")
        trainer_class(model=model, args=args, train_dataset=data, **kwargs).train()
        if trainer_class is TrActTrainer:
            assert [name for name, _ in trainact.enabled_layers(model)] == [layer]
        return model.get_submodule(layer).weight.detach()

    # found from one batch (torch.fx cannot trace ViT), or named
    micro = train(
        TrActTrainer, 4, tract_example_inputs={"pixel_values": data[0]["pixel_values"][None]}
    )
    big = train(TrActTrainer, 1, tract_layer=layer)
    torch.testing.assert_close(micro, big, rtol=1e-4, atol=1e-5)
    assert (big - train(transformers.Trainer, 1)).abs().max() > 1e-2


class ProbingTrainer(TrActTrainer):
    """A compute_loss that first runs a probing backward and throws its gradient away."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        probe = model(pixel_values=3 * inputs["pixel_values"] + 1, labels=inputs["labels"])
        probe["loss"].backward()
        model.zero_grad()
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_a_discarded_backward_leaves_nothing_in_the_deferred_statistics(tmp_path):
    """TrActTrainer always defers: the probing backward's statistics go with its gradient."""
    model, epochs = Classifier(), 3
    args = arguments(tmp_path, epochs)
    ProbingTrainer(model=model, args=args, train_dataset=dataset(), tract_layer="net.0").train()
    expected, _ = ref([slice(None)] * epochs)
    torch.testing.assert_close(stem(model), expected[-1], rtol=1e-12, atol=1e-12)


class TwoViews(Classifier):
    def forward(self, pixel_values, labels):
        logits = self.net(pixel_values) + self.net(2 * pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_two_views_raise(tmp_path):
    trainer = TrActTrainer(
        model=TwoViews(), args=arguments(tmp_path, 1), train_dataset=dataset(), tract_layer="net.0"
    )
    with pytest.raises(RuntimeError, match="torch.cat"):
        trainer.train()


def test_gradient_checkpointing_of_a_vit_keeps_tract_exact():
    """Hugging Face gradient checkpointing recomputes the encoder in backward; the patch
    embedding (outside it) is preconditioned once, as without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(tiny_vit_config(num_labels=3)).double()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        trainact.apply(model, example_inputs={"pixel_values": x})
        model(pixel_values=x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        grads.append(model.vit.embeddings.patch_embeddings.projection.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
