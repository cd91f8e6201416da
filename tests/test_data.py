"""Batches: move_to_device keeps every structure, batch_size_of finds the leading dimension of the first
tensor, and fit/validate accept batches of tensors, tuples, lists, dicts, namedtuples and dataclasses."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, make_data, quiet
from torch.utils.data import DataLoader

import trainkit as tk
from trainkit.data import batch_size_of, move_to_device


def cpu(**kwargs) -> dict:
    """quiet() pinned to the CPU: exact comparisons stay exact on a machine that has a GPU."""
    return quiet(device="cpu", **kwargs)


Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Inner:
    ids: torch.Tensor
    names: list[str]


@dataclasses.dataclass
class Outer:
    label: str
    inner: Inner
    extras: dict
    pair: Pair
    count: int = 3
    cache: torch.Tensor | None = dataclasses.field(default=None, init=False)


def t(*shape: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full(shape, fill)


def assert_same_structure(a, b) -> None:
    """Equal types all the way down; tensors equal and on the CPU."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.device.type == "cpu" and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_structure(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_structure(x, y)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same_structure(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


def nested_batch() -> Outer:
    return Outer(
        label="b0",
        inner=Inner(ids=torch.arange(6).reshape(3, 2), names=["a", "b", "c"]),
        extras={"mask": t(3, fill=1.0), "lens": [torch.tensor([1, 2, 3]), (t(3), "s")], "none": None},
        pair=Pair(x=t(3, 4, fill=2.0), y=torch.tensor([0, 1, 2])),
    )


@pytest.mark.parametrize(
    "batch",
    [
        t(4, 2, fill=3.0),
        (t(4, 2), torch.tensor([1, 2, 3, 4])),
        [t(4, 2), [t(4), (t(1), 7)], "text"],
        {"x": t(4, 2), "y": {"z": t(4), "w": [t(2)]}, "k": 3.5},
        OrderedDict(a=t(2), b=(t(2), t(3))),
        Pair(x=t(4, 2), y=t(4)),
        nested_batch(),
        [Pair(x=nested_batch(), y={"p": Pair(t(1), None)})],
        "no tensors",
        None,
    ],
    ids=[
        "tensor",
        "tuple",
        "list",
        "dict",
        "ordereddict",
        "namedtuple",
        "dataclass",
        "mixed",
        "str",
        "none",
    ],
)
def test_move_to_device_keeps_the_structure(batch):
    moved = move_to_device(batch, torch.device("cpu"))
    assert_same_structure(moved, batch)


def test_move_to_device_rebuilds_containers_and_keeps_leaves():
    batch = nested_batch()
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved is not batch and moved.inner is not batch.inner
    assert moved.label is batch.label  # non-tensor leaves pass through untouched
    assert moved.inner.names == batch.inner.names and moved.inner.names is not batch.inner.names
    assert moved.count == 3 and moved.cache is None
    assert isinstance(moved.pair, Pair) and moved.pair._fields == ("x", "y")


def test_move_to_device_changes_dtype_nowhere_and_device_everywhere():
    # The meta device is always there and shows that every tensor, however deep, was moved.
    batch = nested_batch()
    moved = move_to_device(batch, torch.device("meta"))
    tensors = [
        moved.inner.ids,
        moved.extras["mask"],
        moved.extras["lens"][0],
        moved.extras["lens"][1][0],
        moved.pair.x,
        moved.pair.y,
    ]
    assert all(x.device.type == "meta" for x in tensors)
    assert [x.dtype for x in tensors] == [torch.int64, torch.float32, torch.int64, torch.float32] + [
        torch.float32,
        torch.int64,
    ]
    assert moved.extras["lens"][1][1] == "s" and moved.extras["none"] is None


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        (t(5, 3), 5),
        ((t(4, 2), t(9)), 4),
        ([[t(7, 1)], t(2)], 7),
        ({"meta": "id", "x": t(6, 2), "y": t(3)}, 6),
        ({"first": {"deep": [t(2, 5)]}, "x": t(8)}, 2),
        (Pair(x=t(3, 1), y=t(10)), 3),
        (nested_batch(), 3),
        (torch.tensor(1.0), 1),
        ("no tensor", 1),
        ([1, 2, 3], 1),
    ],
)
def test_batch_size_of_takes_the_leading_dim_of_the_first_tensor(batch, size):
    assert batch_size_of(batch) == size


# -- batch structures through fit and evaluation -----------------------------------------------------------


@dataclasses.dataclass
class Features:
    x: torch.Tensor


@dataclasses.dataclass
class Example:
    features: Features
    y: torch.Tensor
    tag: str = "train"


def collate(kind: str):
    def fn(items):
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        return {
            "tuple": lambda: (x, y),
            "list": lambda: [x, y],
            "dict": lambda: {"x": x, "y": y},
            "namedtuple": lambda: Pair(x, y),
            "dataclass": lambda: Example(Features(x), y),
        }[kind]()

    return fn


def unpack(batch):
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if isinstance(batch, Example):
        return batch.features.x, batch.y
    x, y = batch
    return x, y


class AnyBatch(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.types: list[type] = []

    def training_step(self, batch, batch_idx):
        self.types.append(type(batch))
        x, y = unpack(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = unpack(batch)
        return {"loss": F.cross_entropy(self(x), y), "n": float(x.shape[0])}


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple", "dataclass"])
def test_fit_and_validate_accept_every_batch_structure(kind):
    loader = DataLoader(make_data(24), batch_size=8, collate_fn=collate(kind))
    val = DataLoader(make_data(10, seed=1), batch_size=4, collate_fn=collate(kind))
    task = AnyBatch()
    trainer = tk.Trainer(max_epochs=1, **cpu())
    result = trainer.fit(task, loader, val)
    expected = {"tuple": tuple, "list": list, "dict": dict, "namedtuple": Pair, "dataclass": Example}[kind]
    assert task.types == [expected] * 3

    # Same numbers as a tuple-batch evaluation: the weights come from the first tensor whatever the structure.
    reference = trainer.validate(task, DataLoader(make_data(10, seed=1), batch_size=4))
    assert result.metrics == trainer.validate(task, val) == reference
    assert reference["val_n"] == (4 * 4 + 4 * 4 + 2 * 2) / 10
