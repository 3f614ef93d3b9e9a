"""Transfer learning on a small CNN: pretrain on digits 0–4, then fine-tune for digits 5–9 four ways.

The classic recipe (Yosinski et al. 2014) freezes the early layers, whose stroke and edge detectors
carry over, and retrains the late ones. Here it is set beside LoRA on every convolution, full
fine-tuning and a linear probe, all attached through feathertune with the same optimizer, epochs and
batch size, on scikit-learn's bundled 8×8 digits (offline). Training from scratch is the reference.

What the table shows: the pretrained features carry over (frozen, with only a new head, they already
classify digits 5–9 at about 0.96), and every method lands within a point or two of full fine-tuning
while training a fraction of the weights (LoRA under a fifth), the base left untouched and shareable.
It also shows this data set's limit: 600 clean 8×8 images are enough to train the network from
scratch, which matches or beats every transfer here (it did even from 10 images a class, when this
example was written), so what transfer buys on digits is trained parameters, not accuracy.

    python examples/cnn_transfer.py            # 15-20 s on two CPU cores, imports included
    python examples/cnn_transfer.py --seed 1   # another initialisation and batch order

Same seed, same output: every weight and batch order comes from it; the train/test splits are fixed.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import feathertune as ft

BATCH_SIZE = 32
PRETRAIN_EPOCHS = 15
TRANSFER_EPOCHS = 10


# --- data ---------------------------------------------------------------------------------------

@dataclass
class Split:
    train_x: torch.Tensor  # (N, 1, 8, 8), pixels in [0, 1]
    train_y: torch.Tensor  # (N,) class index 0–4
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_split(digits: range) -> Split:
    """The images of `digits`, labels renumbered from 0, split 70/30 stratified (the same every run)."""
    images, labels = load_digits(return_X_y=True)  # (1797, 64) pixels 0–16, (1797,)
    keep = (labels >= digits.start) & (labels < digits.stop)
    x = torch.tensor(images[keep] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels[keep] - digits.start, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return Split(train_x, train_y, test_x, test_y)


# --- the network --------------------------------------------------------------------------------

def small_cnn(classes: int = 5) -> nn.Module:
    """Two early convolutions (strokes and edges), one late one (parts of digits), a linear head."""
    features = nn.Sequential(OrderedDict(
        early=nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),  # (N, 32, 8, 8) -> (N, 32, 4, 4)
        )),
        late=nn.Sequential(OrderedDict(
            conv3=nn.Conv2d(32, 32, 3, padding=1), relu3=nn.ReLU(),
            # Flatten, not a global average: where a stroke sits is what tells a 5 from a 6 or a 9.
            pool=nn.MaxPool2d(2), flatten=nn.Flatten(),  # (N, 32, 4, 4) -> (N, 32·2·2)
        )),
    ))
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(32 * 2 * 2, classes)))


CONVS = ["conv1", "conv2", "conv3"]


def with_fresh_head(pretrained: nn.Module, seed: int) -> nn.Module:
    """A copy of the pretrained network with a new, randomly initialised 5-way head for digits 5–9."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)  # every method starts from the very same head
    model.head = nn.Linear(model.head.in_features, 5)
    return model


# --- training -----------------------------------------------------------------------------------

def train(model: nn.Module, data: Split, lr: float, epochs: int, seed: int) -> None:
    """AdamW on whatever `model` leaves trainable, shuffled mini-batches of BATCH_SIZE."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order = torch.Generator().manual_seed(seed)  # the same batch order for every method
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data.train_y), generator=order).split(BATCH_SIZE):
            loss = loss_fn(model(data.train_x[batch]), data.train_y[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return (model(data.test_x).argmax(-1) == data.test_y).float().mean().item()


def train_from_random(data: Split, epochs: int, seed: int) -> nn.Module:
    """A new network, every weight trained: pretraining on digits 0–4, and the scratch reference."""
    torch.manual_seed(seed)
    model = small_cnn()
    train(model, data, lr=3e-3, epochs=epochs, seed=seed)
    return model


# --- the transfer methods -----------------------------------------------------------------------

# Learning rates: the fewer and the fresher the trained weights, the larger the step they can take.
# A head alone, or LoRA's zero-initialised B (whose low-rank update starts from nothing), take 1e-2;
# the late layers with the head 3e-3; full fine-tuning 1e-3, small enough not to wreck the early
# features in the first steps while the new head is still random. Scratch has nothing to keep: 3e-3,
# the pretraining rate (train_from_random).
METHODS = {
    "head only (linear probe)": (ft.PartialConfig(modules=["head"]), 1e-2),
    "late layers + head": (ft.PartialConfig(modules=["features.late", "head"]), 3e-3),
    "LoRA r=4 on every conv": (ft.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=CONVS,
                                             modules_to_save=["head"]), 1e-2),
    "full fine-tuning": (ft.PartialConfig(modules="all"), 1e-3),
}


@dataclass
class Result:
    method: str
    trainable: int
    accuracy: float
    seconds: float


def transfer(name: str, config: ft.PartialConfig | ft.LoraConfig, lr: float, pretrained: nn.Module, data: Split, epochs: int,
             seed: int) -> tuple[Result, nn.Module]:
    """Attach `config` to a fresh copy of the pretrained network, train it on digits 5–9, score it."""
    start = time.perf_counter()
    model = ft.attach(with_fresh_head(pretrained, seed), config)  # LoRA draws A here, seeded too
    train(model, data, lr, epochs, seed)
    trainable, _ = ft.trainable_parameters(model)
    return Result(name, trainable, accuracy(model, data), time.perf_counter() - start), model


def from_scratch(data: Split, epochs: int, seed: int) -> Result:
    start = time.perf_counter()
    model = train_from_random(data, epochs, seed)
    trainable = sum(p.numel() for p in model.parameters())
    return Result("from scratch (reference)", trainable, accuracy(model, data), time.perf_counter() - start)


@torch.no_grad()
def base_untouched(model: nn.Module, pretrained: nn.Module, data: Split, seed: int) -> float:
    """Largest difference between the fine-tuned model under ft.disabled and the network it started as."""
    model.eval()
    with ft.disabled(model):
        tuned_off = model(data.test_x)
    return (tuned_off - with_fresh_head(pretrained, seed).eval()(data.test_x)).abs().max().item()


# --- report -------------------------------------------------------------------------------------

def print_table(results: list[Result], network_size: int) -> None:
    # % of the network's own parameters: ft.trainable_parameters' total also counts the frozen originals
    # that partial fine-tuning and modules_to_save keep beside their trainable copies.
    print(f"{'method':<26} {'trainable':>9} {'% of net':>8} {'acc 5-9':>7} {'seconds':>7}")
    for r in results:
        print(f"{r.method:<26} {r.trainable:>9,} {100 * r.trainable / network_size:>7.1f}% "
              f"{r.accuracy:>7.3f} {r.seconds:>7.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The network is tiny: one thread is fastest (on two busy cores, two threads ran several times
    # slower), and it keeps every sum in one order.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    source, target = digits_split(range(0, 5)), digits_split(range(5, 10))
    print(f"digits 0-4: {len(source.train_y)} train / {len(source.test_y)} test; "
          f"digits 5-9: {len(target.train_y)} train / {len(target.test_y)} test")
    pretrained = train_from_random(source, PRETRAIN_EPOCHS, args.seed)
    network_size = sum(p.numel() for p in pretrained.parameters())
    print(f"pretrained on digits 0-4 ({network_size:,} parameters): test accuracy "
          f"{accuracy(pretrained, source):.3f}\n")

    print(f"transfer to digits 5-9: AdamW, {TRANSFER_EPOCHS} epochs, batch {BATCH_SIZE}, fresh 5-way head")
    results, worst_drift = [], 0.0
    for name, (config, lr) in METHODS.items():
        result, model = transfer(name, config, lr, pretrained, target, TRANSFER_EPOCHS, args.seed)
        results.append(result)
        worst_drift = max(worst_drift, base_untouched(model, pretrained, target, args.seed))
    results.append(from_scratch(target, TRANSFER_EPOCHS, args.seed))
    print_table(results, network_size)

    # Every fine-tune trains copies (or LoRA factors) beside the pretrained tensors, never the tensors
    # themselves: one frozen base can serve several tasks, and switching the adapter off gives it back.
    print(f"\nunder ft.disabled, every fine-tuned model equals the network it started from "
          f"(largest difference {worst_drift:.1e})")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
