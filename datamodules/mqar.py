"""Multi-query associative recall (MQAR), the synthetic recall task of the Zoology benchmark.

Each example (Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language
models", 2023) is a sequence of ``seq_len`` tokens:

* positions ``0 .. 2N-1`` hold N key–value pairs ``k_1 v_1 k_2 v_2 ...``; keys are drawn without
  replacement from the key vocabulary ``1 .. vocab_size // 2 - 1``, values without replacement from the
  value vocabulary ``vocab_size // 2 .. vocab_size - 1`` (token 0 is the filler);
* every key is queried once later on, at position ``2N + 2·gap``; the N gaps are distinct slots of
  ``0 .. (seq_len - 2N) // 2 - 1`` drawn without replacement with probability ∝ ``(gap + 1) ** (power_a - 1)``,
  a power law that puts most queries close to the context, as in natural text;
* the remaining positions are filler: token 0 (as in the configs of Zoology's Figure 2, the default here), or
  uniform random tokens of the whole vocabulary with ``random_fill`` (``random_non_queries`` there).

``labels[:, t]`` is the target for the prediction made at position t (already shifted): the value of the
queried key at each query position, ``-100`` (ignored by the loss and the accuracy) everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.resumable import split_loader

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARSpec:
    """What one MQAR split looks like; :meth:`validate` explains any impossible combination."""

    seq_len: int = 256
    num_pairs: int = 16
    vocab_size: int = 8192
    power_a: float = 0.01
    random_fill: bool = False

    @property
    def key_range(self) -> tuple[int, int]:
        """Keys are ``[low, high)``; 0 is reserved for the filler."""
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    @property
    def query_slots(self) -> int:
        """Number of possible query positions (every other position after the context)."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    def validate(self) -> None:
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len ({self.seq_len}) is too short for num_pairs ({self.num_pairs}): the context takes "
                f"2·num_pairs tokens and the queries need num_pairs of the (seq_len - 2·num_pairs) // 2 query slots, "
                f"so seq_len must be >= 4·num_pairs = {4 * self.num_pairs}; raise seq_len or lower num_pairs"
            )
        if self.vocab_size < 2 * self.num_pairs + 2:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) is too small for num_pairs ({self.num_pairs}): keys are drawn "
                f"without replacement from 1 .. vocab_size // 2 - 1 and values from vocab_size // 2 .. vocab_size - 1, "
                f"so vocab_size must be >= 2·num_pairs + 2 = {2 * self.num_pairs + 2}"
            )
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1] (1 spaces queries uniformly), got {self.power_a}")


def sample_distinct(rng: np.random.Generator, num_rows: int, population: int, size: int) -> np.ndarray:
    """``[num_rows, size]`` int64: per row, an ordered sample of ``size`` distinct integers of
    ``0 .. population - 1``, uniform over all such ordered samples.

    Sequential sampling without replacement, vectorised over rows: at draw j the rank r is uniform over
    the ``population - j`` unused integers, and the r-th unused integer is ``r + #{i : s_i - i <= r}``
    for the already drawn integers sorted as ``s_0 < s_1 < ...`` (``s_i - i`` unused integers lie below
    ``s_i``). Costs O(num_rows · size²) time and O(num_rows · size) memory, whatever the population.
    """
    if not 0 <= size <= population:
        raise ValueError(f"cannot draw {size} distinct integers from a population of {population}")
    drawn = np.empty((num_rows, size), dtype=np.int64)
    ordered = np.empty((num_rows, size), dtype=np.int64)  # the first j columns sorted ascending
    for j in range(size):
        rank = rng.integers(0, population - j, size=num_rows)  # [R]
        below = ordered[:, :j] - np.arange(j) <= rank[:, None]  # [R, j]; sorted, so a prefix of True
        position = below.sum(axis=1)  # [R]: insertion index of the new integer
        value = rank + position
        drawn[:, j] = value
        previous = ordered[:, :j]
        keep_left = np.concatenate([previous, value[:, None]], axis=1)  # column c < position keeps s_c
        shift_right = np.concatenate([value[:, None], previous], axis=1)  # column c > position takes s_{c-1}
        columns = np.arange(j + 1)
        ordered[:, : j + 1] = np.where(
            columns < position[:, None],
            keep_left,
            np.where(columns == position[:, None], value[:, None], shift_right),
        )
    return drawn


def power_law_gaps(rng: np.random.Generator, num_rows: int, slots: int, size: int, power_a: float) -> np.ndarray:
    """``[num_rows, size]``: distinct slots of ``0 .. slots - 1`` drawn without replacement with weights
    ``(slot + 1) ** (power_a - 1)``, through the Gumbel top-k trick (the same law as drawing one at a time
    and renormalising, which is what ``numpy.random.choice(replace=False, p=...)`` does)."""
    log_weight = (power_a - 1.0) * np.log(np.arange(1, slots + 1, dtype=np.float64))  # [S]
    perturbed = log_weight + rng.gumbel(size=(num_rows, slots))  # [R, S]
    return np.argsort(-perturbed, axis=1, kind="stable")[:, :size]


def generate_mqar(
    spec: MQARSpec, num_examples: int, seed: int | np.random.SeedSequence
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, each int64 ``[num_examples, seq_len]``, a deterministic function of ``seed``."""
    spec.validate()
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    n, pairs = num_examples, spec.num_pairs
    key_low, key_high = spec.key_range
    value_low, value_high = spec.value_range
    keys = key_low + sample_distinct(rng, n, key_high - key_low, pairs)  # [n, N]
    values = value_low + sample_distinct(rng, n, value_high - value_low, pairs)  # [n, N]
    gaps = power_law_gaps(rng, n, spec.query_slots, pairs, spec.power_a)  # [n, N]

    context = 2 * pairs
    inputs = np.zeros((n, spec.seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_positions = context + 2 * gaps  # [n, N]
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    labels = np.full((n, spec.seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_positions, values, axis=1)
    if spec.random_fill:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, spec.vocab_size, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


class MQARDataset(Dataset):
    """In-memory MQAR split; indexing with a list of indices returns a whole batch at once."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels  # [N, T] each

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}  # [B, T] each


def collate_batch(batch):
    """The DataLoader's collate function: batches from :meth:`MQARDataset.__getitems__` pass through."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class MQARDataModule(pl.LightningDataModule):
    """MQAR train and validation splits generated in memory.

    Batches are ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels`` already
    shifted (the target of position t) and ``-100`` except at the answers. The train and validation
    splits come from independent streams of ``seed`` and may use different query spacings
    (``train_power_a``, ``val_power_a``), as in Zoology.
    """

    def __init__(
        self,
        seq_len: int = 256,
        num_pairs: int = 16,
        vocab_size: int = 8192,
        num_train: int = 20_000,
        num_val: int = 1_000,
        batch_size: int = 64,
        train_power_a: float = 0.01,
        val_power_a: float = 0.01,
        random_fill: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_spec = MQARSpec(seq_len, num_pairs, vocab_size, train_power_a, random_fill)
        self.val_spec = MQARSpec(seq_len, num_pairs, vocab_size, val_power_a, random_fill)
        self.train_spec.validate()
        self.val_spec.validate()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_train, self.num_val = num_train, num_val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.vocab_size = vocab_size
        self.train_set: MQARDataset | None = None
        self.val_set: MQARDataset | None = None

    def _split_seed(self, split: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, split])

    def setup(self, stage: str | None = None) -> None:
        # Generated in every process (not prepare_data) because nothing is written to disk; the data
        # depend on the seed only, so every rank holds the same splits.
        if self.train_set is None:
            self.train_set = MQARDataset(*generate_mqar(self.train_spec, self.num_train, self._split_seed(0)))
        if self.val_set is None:
            self.val_set = MQARDataset(*generate_mqar(self.val_spec, self.num_val, self._split_seed(1)))

    def _loader(self, dataset: MQARDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise ValueError("MQARDataModule.setup() must run before its dataloaders are requested")
        return split_loader(
            dataset,
            self.trainer,
            train=shuffle,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
