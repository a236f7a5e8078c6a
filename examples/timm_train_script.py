"""TrAct in timm's ``train.py``: the same steps in the same order, with the lines TrAct adds.

    pip install timm "trainact"
    python examples/timm_train_script.py --grad-accum-steps 2 --clip-grad 1.0 --amp --model-ema
    python examples/timm_train_script.py --tiny        # seconds

timm's script builds the model, resolves its data config, then moves it to the device, makes it
channels_last, builds the optimizer, AMP and the loss scaler, the EMA copy, compiles it and wraps
it in DDP. TrAct goes right after ``resolve_data_config`` (its input size gives a zero batch for
finding the first layer) and before all the rest; ``defer=True`` when
``--grad-accum-steps`` > 1, so that the micro-batches of a step are preconditioned together;
``trainact.precondition_`` after the step's last backward and before ``--clip-grad`` (timm's
loss scaler clips inside its call: :class:`TrActScaler` puts TrAct between its unscaling and
its clipping). The data is a synthetic 4-class task in place of timm's loaders.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

import trainact


class TrActScaler(NativeScaler):
    """timm's ``NativeScaler`` with TrAct after the unscaling and before the clipping."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        super().__init__(device=device)
        self.model = model

    def __call__(
        self,
        loss,
        optimizer,
        clip_grad=None,
        clip_mode="norm",
        parameters=None,
        create_graph=False,
        need_update=True,
    ):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if need_update:
            self._scaler.unscale_(optimizer)
            trainact.precondition_(self.model)  # TrAct: the step's summed statistics
            if clip_grad is not None:
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            self._scaler.step(optimizer)
            self._scaler.update()


def quadrant_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) noise, one quadrant brighter by 0.5; the label says which one."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    h = size // 2
    masks = torch.zeros(4, 1, size, size)
    for q in range(4):
        masks[q, :, (q // 2) * h : (q // 2) * h + h, (q % 2) * h : (q % 2) * h + h] = 1.0
    return torch.randn(n, 3, size, size, generator=g) + 0.5 * masks[labels], labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clip-grad", type=float, default=None)
    parser.add_argument("--clip-mode", default="norm")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, loss scaler")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--model-ema", action="store_true")
    parser.add_argument("--torchcompile", action="store_true")
    parser.add_argument("--tract-lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--tiny", action="store_true", help="2 epochs on 512 images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # as timm's script
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    model = timm.create_model(args.model, num_classes=4, pretrained=False)
    data_config = resolve_data_config(vars(args), model=model)
    # TrAct: after the data config (discovery runs the model once on a zero batch of its input
    # size: no draw from the random stream), before .to(), channels_last, EMA, compile and DDP
    trainact.apply(
        model,
        lam=args.tract_lam,
        defer=args.grad_accum_steps > 1,
        example_inputs=torch.zeros(1, *data_config["input_size"]),
    )
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=0.9)
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        loss_scaler = TrActScaler(model, device.type)  # TrAct: in place of NativeScaler()
    model_ema = ModelEmaV3(model, decay=0.9) if args.model_ema else None
    if args.torchcompile:
        model = torch.compile(model)

    train_x, train_y = quadrant_images(512 if args.tiny else 4096, args.img_size, seed=1)
    test_x, test_y = quadrant_images(512, args.img_size, seed=2)
    epochs = 2 if args.tiny else args.epochs
    accum_steps, num_updates = args.grad_accum_steps, 0
    for epoch in range(epochs):  # train_one_epoch
        model.train()
        order = torch.randperm(len(train_x))
        batches = order.split(args.batch_size)
        for batch_idx, index in enumerate(batches):
            x, y = train_x[index].to(device), train_y[index].to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_batch = batch_idx == len(batches) - 1
            need_update = last_batch or (batch_idx + 1) % accum_steps == 0
            with amp_autocast():
                loss = F.cross_entropy(model(x), y)
            if accum_steps > 1:
                loss /= accum_steps
            if loss_scaler is not None:
                loss_scaler(
                    loss,
                    optimizer,
                    clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode,
                    parameters=model.parameters(),
                    need_update=need_update,
                )
            else:
                loss.backward()
                if need_update:
                    trainact.precondition_(model)  # TrAct: before the clipping
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
            if need_update:
                optimizer.zero_grad()
                num_updates += 1
                if model_ema is not None:
                    model_ema.update(model, step=num_updates)
        evaluated = model_ema if model_ema is not None else model
        evaluated.eval()
        with torch.no_grad(), amp_autocast():
            predicted = evaluated(test_x.to(device)).argmax(1).cpu()
        accuracy = (predicted == test_y).float().mean().item()
        print(f"epoch {epoch + 1}  loss {loss.item():.4f}  test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
