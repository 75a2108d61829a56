"""A guard for device plumbing on a machine without CUDA: inside it, a tensor created without an explicit device
lands on ``meta`` (no data), so any computation mixing it with the model's real tensors fails, as an
unplaced tensor would fail beside a CUDA model."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def unplaced_tensors_fail() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
