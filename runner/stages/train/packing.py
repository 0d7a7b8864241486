"""data.packing: a batch's examples packed into rows without padding between them, attention kept inside each example.

transformers' DataCollatorWithFlattening concatenates examples and numbers each one's positions from 0; it returns no
attention_mask. From position ids that restart, transformers (masking_utils.find_packed_sequence_indices) builds a
block-diagonal causal mask for sdpa and eager, but only when no attention_mask is passed and there is no KV cache
(Trainer turns `use_cache` off); flash_attention_2 reads the same boundaries from the position ids, as varlen attention.
Each example's first label becomes -100, so no token is predicted across a boundary. The loss is the mean over the
batch's labelled tokens, as with padded batches: packing changes how a batch is laid out, not what it trains.

The layout depends on the attention kernel:
- flash_attention_2: the whole batch in one row (its varlen kernel costs each example its own length squared, and it
  takes the boundaries from position ids only for a single row).
- sdpa and eager: rows no longer than the batch's longest example (first-fit decreasing), filled to a common width by a
  padding segment that is a sequence of its own (positions from 0, labels -100: it attends only to itself and adds no
  loss). These kernels compute the whole row x row score matrix and mask it, so one row of batch_size examples would
  cost batch_size times the attention of padded rows (measured 3.2x slower than padding on CPU); rows of the longest
  example's width keep attention within what padding the same batch costs, and never need more memory than it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithFlattening


class PackingCollator:
    def __init__(self, pad_token_id: int, one_row: bool = False) -> None:
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.one_row:
            return self.flatten(features, return_tensors="pt")
        rows = [self.flatten([features[i] for i in row], return_tensors="pt")
                for row in rows_of(lengths=[len(f["input_ids"]) for f in features])]
        width = max(row["input_ids"].shape[1] for row in rows)
        fill = {"input_ids": self.pad_token_id, "labels": -100}
        batch = {}
        for key in ("input_ids", "labels", "position_ids"):
            batch[key] = torch.cat([_filled(row[key][0], width, fill.get(key)) for row in rows]).view(len(rows), width)
        return batch


def rows_of(lengths: list[int]) -> list[list[int]]:
    """Example indices per row: first-fit decreasing into rows as wide as the longest example."""
    width = max(lengths)
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, taken in enumerate(used) if taken + lengths[index] <= width), None)
        if row is None:
            rows.append([index])
            used.append(lengths[index])
        else:
            rows[row].append(index)
            used[row] += lengths[index]
    return rows


def _filled(values: torch.Tensor, width: int, fill: int | None) -> torch.Tensor:
    """The row up to `width`: fill tokens/labels, or positions 0.. so the filling is a sequence of its own."""
    missing = width - values.shape[0]
    if missing == 0:
        return values
    tail = torch.arange(missing, dtype=values.dtype) if fill is None else torch.full((missing,), fill, dtype=values.dtype)
    return torch.cat([values, tail])
