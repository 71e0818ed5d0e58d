"""Where weights come from: a source hands a layer the shard of a named tensor that the layer owns."""

from dataclasses import dataclass

import torch


class CheckpointError(RuntimeError):
    "A tensor is missing, unexpected or mis-shaped; the message names it."


@dataclass(frozen=True)
class Shard:
    "`length` slices of a full tensor along `dim`, starting at `start`: the part one rank owns."
    dim: int
    start: int
    length: int

    def of(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(self.dim, self.start, self.length)


class WeightSource:
    """Reads named tensors, or one shard of them, checking each against the shape the model expects.

    Layers never see a whole checkpoint: each asks for the shard it owns, so a source backed by
    files can read just those bytes."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str, shard: Shard | None) -> torch.Tensor:
        raise NotImplementedError

    def read(self, name: str, expected_shape: tuple[int, ...], shard: Shard | None = None) -> torch.Tensor:
        if name not in self.names():
            raise CheckpointError(f"the checkpoint has no tensor {name!r}")
        actual = tuple(self.shape(name))
        if actual != tuple(expected_shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(actual)} in the checkpoint; "
                                  f"the config implies {list(expected_shape)}")
        return self._read(name, shard)


class StateDictSource(WeightSource):
    "Full tensors already in memory, e.g. a reference model's `state_dict()`."

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def _read(self, name: str, shard: Shard | None) -> torch.Tensor:
        full = self.tensors[name]
        return full if shard is None else shard.of(full)
