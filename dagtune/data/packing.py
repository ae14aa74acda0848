"""Padding-free packing for the SFT nodes (``packing: true``): which examples go into which micro-batch
and how a micro-batch row is laid out. Pure arithmetic over token ids (plus the collator), no trainer.

Each optimizer step takes the same ``batch_size * grad_accum`` examples as the
unpacked recipe (consecutive groups of one seeded shuffle per epoch, see ``pack_plan``); the group's
examples are laid end to end, padding-free, into one row per micro-batch, split over as few micro-batches
as keep each under ``packed_tokens_per_batch`` tokens (balanced by tokens; that count is the gradient
accumulation of the run). ``position_ids`` restart at 0 for every example, so attention never crosses an
example: transformers builds a block-diagonal causal mask from the position ids (SDPA/eager, also on CPU).
On the unsloth backend the batch also carries ``packed_seq_lengths`` for Unsloth's packed-attention shim
(torch's varlen flash kernel), which wraps transformers' "sdpa" entry; Unsloth's rewritten Gemma-3
attention calls SDPA directly and never reaches it (its counters stayed 0 in the H200 epoch runs), so
there the block mask is what isolates examples -- checked by tests/test_training_gpu.py's
packed == unpacked test. Labels come from the completion mask on both backends (the first
token of every example is never a label, so no example is learned from its predecessor's last token).
Loss weighting: HF ``Trainer`` counts the label tokens of all micro-batches of a step
(``num_items_in_batch``) and TRL's loss divides each micro-batch's summed token loss by that count, so
the step's loss is the mean over the step's completion tokens whatever the micro-batch split is: packing
changes neither which examples share a step nor how much each weighs (a token-weighted mean, as
unpacked). tests/test_training_sft.py checks one step's loss and gradients packed vs unpacked.
"""

from __future__ import annotations

import math
import random
from typing import Any


def step_groups(n: int, examples_per_step: int, seed: int, total_steps: int) -> list[list[int]]:
    """The examples of each optimizer step: consecutive groups of ``examples_per_step`` of one seeded
    shuffle per epoch (a step never spans epochs; an epoch's last step may be smaller), as many steps as
    the run has. A function of (n, seed) only, so a resumed run sees the same groups."""
    groups: list[list[int]] = []
    epoch = 0
    while len(groups) < total_steps:
        perm = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(perm)
        groups.extend(perm[i : i + examples_per_step] for i in range(0, n, examples_per_step))
        epoch += 1
    return groups[:total_steps]


def split_by_tokens(group: list[int], lengths: list[int], k: int) -> list[list[int]]:
    """``group`` over ``k`` micro-batches, longest example first into the emptiest one (LPT); each
    micro-batch keeps the group's order. Fewer examples than ``k`` leaves empty micro-batches."""
    bins: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    order = {ix: j for j, ix in enumerate(group)}
    for ix in sorted(group, key=lambda i: (-lengths[i], order[i])):
        b = min(range(k), key=lambda j: (load[j], j))
        bins[b].append(ix)
        load[b] += lengths[ix]
    return [sorted(b, key=order.__getitem__) for b in bins]


def pack_plan(
    lengths: list[int],
    examples_per_step: int,
    token_cap: int,
    seed: int,
    total_steps: int,
    multiple_of: int = 1,
) -> tuple[list[list[int]], int]:
    """(micro-batches in training order, micro-batches per step). Every step has the same count (the
    Trainer's gradient accumulation): the smallest that keeps every micro-batch of every step within
    ``token_cap`` tokens (raised to the longest example if that is longer), rounded up to a multiple of
    ``multiple_of`` (the data-parallel world size: each rank takes an equal share of the step)."""
    cap = max(token_cap, max(lengths))
    groups = step_groups(len(lengths), examples_per_step, seed, total_steps)

    def fits(g: list[int], k: int) -> bool:
        return max(sum(lengths[i] for i in b) for b in split_by_tokens(g, lengths, k)) <= cap

    accum = 1
    for g in groups:
        k = max(accum, math.ceil(sum(lengths[i] for i in g) / cap))
        while k < len(g) and not fits(g, k):
            k += 1
        accum = max(accum, k)
    accum = -(-accum // multiple_of) * multiple_of
    micro = [b for g in groups for b in split_by_tokens(g, lengths, accum)]
    return micro, accum


def with_labels(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """input_ids + labels (-100 off the completion)."""
    ids = row["input_ids"]
    return {
        "input_ids": ids,
        "labels": [t if m else -100 for t, m in zip(ids, row["completion_mask"], strict=True)],
    }


def packed_row(rows: list[dict[str, list[int]]], idxs: list[int], pad_id: int) -> dict[str, list[int]]:
    """One padding-free micro-batch: the examples end to end, ``seq_lengths`` for the position ids. The
    first token of each example is never a label (it would be predicted from the previous example). An
    empty micro-batch (a last step with fewer examples than micro-batches) is one pad token, no label."""
    if not idxs:
        return {"input_ids": [pad_id], "labels": [-100], "seq_lengths": [1]}
    ids: list[int] = []
    labels: list[int] = []
    lens: list[int] = []
    for i in idxs:
        r = rows[i]
        ids += r["input_ids"]
        labels += [-100] + r["labels"][1:]
        lens.append(len(r["input_ids"]))
    return {"input_ids": ids, "labels": labels, "seq_lengths": lens}


class PackedCollator:
    """Training items (``seq_lengths`` present) become one padding-free row: input_ids, labels and
    position_ids of shape (1, T), no attention mask (+ ``packed_seq_lengths`` for Unsloth's varlen
    attention). Evaluation items (plain examples) are padded on the right to the longest, as unpacked."""

    def __init__(self, pad_id: int, packed_seq_lengths: bool):
        self.pad_id = pad_id
        self.packed_seq_lengths = packed_seq_lengths

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "seq_lengths" in items[0]:
            ids = [t for it in items for t in it["input_ids"]]
            labels = [t for it in items for t in it["labels"]]
            lens = [n for it in items for n in it["seq_lengths"]]
            batch = {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([[p for n in lens for p in range(n)]], dtype=torch.long),
            }
            if self.packed_seq_lengths:
                batch["packed_seq_lengths"] = torch.tensor(lens, dtype=torch.int32)
            return batch
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            labels[i, :n] = torch.tensor(it["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
