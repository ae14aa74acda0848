"""Deterministic stratified splits and cross-split leakage removal (exact and near duplicates)."""

from __future__ import annotations

import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dagtune.data.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "validation", "test")

# Arabic spelling variants that writers use interchangeably; folding them makes "the same text" mean the
# same thing for Arabic as case-folding does for English.
ARABIC_FOLD = str.maketrans(
    {"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ة": "ه", "ؤ": "و", "ئ": "ي", "ـ": None}
    | {chr(0x0660 + i): str(i) for i in range(10)}
    | {chr(0x06F0 + i): str(i) for i in range(10)}
)
DIACRITICS = re.compile("[\u064b-\u065f\u0670\u06d6-\u06ed]")
# Sentence punctuation only: math operators (+ - * / =) change a line's meaning and stay.
PUNCT = re.compile(r"[.,!?؟،؛:;\"'`«»()\[\]{}…]")
SPACES = re.compile(r"\s+")


def fold_arabic(text: str) -> str:
    """Arabic spelling variants folded (alef forms, ى, ة, hamza seats, Arabic-Indic digits), diacritics
    and tatweel dropped; Latin text passes unchanged. Data dedup and evaluation matching share it."""
    return DIACRITICS.sub("", text).translate(ARABIC_FOLD)


def normalize_text(text: str) -> str:
    text = fold_arabic(unicodedata.normalize("NFKC", text).lower())
    text = PUNCT.sub(" ", text)
    return SPACES.sub(" ", text).strip()


def trigrams(norm: str) -> set[str]:
    if len(norm) < 3:
        return {norm}
    return {norm[i : i + 3] for i in range(len(norm) - 2)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# ------------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------------
Stratum = tuple[str, ...]  # most important key first, e.g. (call / no_call, dialect)


def largest_remainder(sizes: dict[Any, int], room: dict[Any, int], total: int) -> dict[Any, int]:
    """Share `total` among keys in proportion to their sizes: floors first, then the largest remainders
    (ties by key, so it is deterministic), never more than a key's room."""
    n = sum(sizes.values())
    if n == 0 or total <= 0:
        return dict.fromkeys(sizes, 0)
    take = {k: min(total * s // n, room[k]) for k, s in sizes.items()}
    order = sorted(sizes, key=lambda k: (-(total * sizes[k] % n), str(k)))
    left = total - sum(take.values())
    while left > 0:
        grew = False
        for k in order:
            if left and take[k] < room[k]:
                take[k] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return take


def allocate(
    sizes: dict[Stratum, int], room: dict[Stratum, int], total: int, depth: int = 0
) -> dict[Stratum, int]:
    """Per-stratum counts summing to `total`, shared level by level: first over the first key (so a
    small class such as no-call gets its share even when each of its dialects alone rounds to zero),
    then within each value over the next key."""
    heads: dict[str, list[Stratum]] = defaultdict(list)
    for key in sizes:
        heads[key[depth]].append(key)
    take = largest_remainder(
        {h: sum(sizes[k] for k in ks) for h, ks in heads.items()},
        {h: sum(room[k] for k in ks) for h, ks in heads.items()},
        total,
    )
    out: dict[Stratum, int] = {}
    for h, ks in heads.items():
        if depth + 1 == len(ks[0]):
            out[ks[0]] = take[h]
        else:
            out.update(allocate({k: sizes[k] for k in ks}, {k: room[k] for k in ks}, take[h], depth + 1))
    return out


def group_rows(
    rows: list[dict[str, Any]], stratum: Callable[[dict[str, Any]], Stratum]
) -> dict[Stratum, dict[str, list]]:
    """stratum -> group id -> rows. Rows that share a group (e.g. both answers to one question) are
    split together; a group's stratum combines its members' values at each level."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    by_stratum: dict[Stratum, dict[str, list]] = defaultdict(dict)
    for gid, members in groups.items():
        keys = [stratum(m) for m in members]
        key = tuple("+".join(sorted({k[i] for k in keys})) for i in range(len(keys[0])))
        by_stratum[key][gid] = members
    return by_stratum


def split_size(n: int, frac: float) -> int:
    """round half up (Python's round() would give 0 for 0.5), and at least one row."""
    return max(1, int(n * frac + 0.5))


def split_stratified(
    rows: list[dict[str, Any]],
    stratum: Callable[[dict[str, Any]], Stratum],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    task: str,
) -> dict[str, list[dict[str, Any]]]:
    """Train/validation/test with every stratum in each split in proportion; the same rows and seed
    always give the same splits, whatever order the rows came in."""
    by_stratum = group_rows(rows, stratum)
    sizes = {s: len(g) for s, g in by_stratum.items()}
    n = sum(sizes.values())
    if n < 3:
        raise DataError(f"{task}: {n} usable rows; need at least 3 for three splits")
    n_val = allocate(sizes, dict(sizes), split_size(n, val_fraction))
    n_test = allocate(sizes, {s: k - n_val[s] for s, k in sizes.items()}, split_size(n, test_fraction))
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for s in sorted(by_stratum):
        gids = sorted(by_stratum[s])
        random.Random(f"{seed}:split:{task}:{'|'.join(s)}").shuffle(gids)
        cut1, cut2 = n_val[s], n_val[s] + n_test[s]
        for i, gid in enumerate(gids):
            name = "validation" if i < cut1 else "test" if i < cut2 else "train"
            out[name].extend(by_stratum[s][gid])
    for name, split_rows in out.items():
        split_rows.sort(key=lambda r: r["id"])
        random.Random(f"{seed}:order:{task}:{name}").shuffle(split_rows)
    return out


# ------------------------------------------------------------------------------------------------
# leakage: exact (normalized text) and near duplicates (character-trigram Jaccard, MinHash + LSH)
# ------------------------------------------------------------------------------------------------
PRIME = (1 << 31) - 1  # a, x < 2^31: a*x < 2^62 fits uint64 and wraps p ~2^31 times (good mixing)
NUM_PERM = 64


def lsh_shape(threshold: float, num_perm: int = NUM_PERM, max_miss: float = 1e-6) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest false candidates) for which a pair at the
    threshold still becomes a candidate with probability >= 1 - max_miss."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if (1 - threshold**r) ** b <= max_miss:
            best = (b, r)
    return best


class NearDuplicateIndex:
    """MinHash signatures over character trigrams, bucketed by LSH bands. A candidate must first agree on
    enough signature positions (the MinHash estimate of its Jaccard, with a 0.2 margin: a pair at the
    threshold falls below it with probability ~1e-7) and is then confirmed with the exact Jaccard, so the
    index never reports a pair below the threshold. Linear in rows, which a 45k-row source needs (all
    pairs would be ~10^9 comparisons)."""

    ESTIMATE_MARGIN = 0.2
    CHUNK_HASHES = 100_000  # trigram ids per vectorized batch (x NUM_PERM uint64 = 50 MB)

    def __init__(self, threshold: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, NUM_PERM, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, PRIME, NUM_PERM, dtype=np.uint64)[:, None]
        self.threshold = threshold
        self.bands, self.rows = lsh_shape(threshold)
        self.band_mult = rng.integers(1, 1 << 62, self.rows, dtype=np.uint64)
        self.buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.grams: list[set[str]] = []
        self.sigs = np.empty((0, NUM_PERM), dtype=np.uint64)
        # Trigram -> small integer id. Trigrams repeat across rows, so a lookup is far cheaper than hashing
        # every occurrence; ids are assigned in row order, which is deterministic.
        self.ids: dict[str, int] = {}

    def signatures(self, gram_sets: list[set[str]]) -> np.ndarray:
        """One MinHash signature per set, computed in vectorized chunks (np.minimum.reduceat)."""
        out = np.empty((len(gram_sets), NUM_PERM), dtype=np.uint64)
        ids = self.ids
        start = 0
        while start < len(gram_sets):
            stop, total = start, 0
            while stop < len(gram_sets) and (total == 0 or total + len(gram_sets[stop]) <= self.CHUNK_HASHES):
                total += len(gram_sets[stop])
                stop += 1
            chunk = gram_sets[start:stop]
            x = np.fromiter(
                (ids.setdefault(g, len(ids)) for grams in chunk for g in grams), dtype=np.uint64, count=total
            )
            offsets = np.cumsum([0] + [len(g) for g in chunk[:-1]])
            hashed = self.a * x[None, :] + self.b  # one universal hash per permutation, reduced
            # one fold: congruent to mod 2^31-1 and a fixed function of x, all MinHash needs; far cheaper than %
            hashed = (hashed & PRIME) + (hashed >> np.uint64(31))
            out[start:stop] = np.minimum.reduceat(hashed, offsets, axis=1).T
            start = stop
        return out

    def band_hashes(self, sigs: np.ndarray) -> list[list[int]]:
        """One integer per (row, band): the band's signature values mixed (wrapping uint64 arithmetic)."""
        bands = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows)
        return (bands * self.band_mult).sum(axis=2).tolist()

    def add(self, gram_sets: list[set[str]]) -> None:
        if not gram_sets:
            return
        base = len(self.grams)
        sigs = self.signatures(gram_sets)
        for j, keys in enumerate(self.band_hashes(sigs)):
            for bucket, key in zip(self.buckets, keys, strict=True):
                bucket[key].append(base + j)
        self.grams.extend(gram_sets)
        self.sigs = np.vstack([self.sigs, sigs])

    def matches(self, gram_sets: list[set[str]]) -> list[bool]:
        """For each set: does the index hold one with Jaccard >= threshold?"""
        if not gram_sets:
            return []
        sigs = self.signatures(gram_sets)
        out = []
        for grams, sig, keys in zip(gram_sets, sigs, self.band_hashes(sigs), strict=True):
            cands: set[int] = set()
            for bucket, key in zip(self.buckets, keys, strict=True):
                cands.update(bucket.get(key, ()))
            out.append(self.confirm(grams, sig, cands))
        return out

    def confirm(self, grams: set[str], sig: np.ndarray, cands: set[int]) -> bool:
        if not cands:
            return False
        idx = np.fromiter(cands, dtype=np.int64, count=len(cands))
        estimate = (self.sigs[idx] == sig).mean(axis=1)
        keep = estimate >= self.threshold - self.ESTIMATE_MARGIN
        for i in idx[keep][np.argsort(-estimate[keep], kind="stable")]:
            if jaccard(grams, self.grams[i]) >= self.threshold:
                return True
        return False


def remove_leakage(
    splits: dict[str, list[dict[str, Any]]],
    text: Callable[[dict[str, Any]], str],
    threshold: float,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Drop validation rows that duplicate train, then test rows that duplicate train or validation.
    Train stays whole (it is the largest split; the held-out splits are what must be clean)."""
    seen_exact: set[str] = set()
    index = NearDuplicateIndex(threshold)
    counts: dict[str, Any] = {"exact": 0, "near": 0, "by_split": {}}

    def remember(rows: list[dict[str, Any]]) -> None:
        norms = [normalize_text(text(r)) for r in rows]
        seen_exact.update(norms)
        index.add([trigrams(n) for n in norms])

    remember(splits["train"])
    out = {"train": splits["train"]}
    for name in ("validation", "test"):
        norms = [normalize_text(text(r)) for r in splits[name]]
        exact = [n in seen_exact for n in norms]
        near = index.matches([trigrams(n) for n, e in zip(norms, exact, strict=True) if not e])
        near_iter = iter(near)
        verdict = ["exact" if e else ("near" if next(near_iter) else "") for e in exact]
        out[name] = [r for r, v in zip(splits[name], verdict, strict=True) if not v]
        remember(out[name])
        n_exact, n_near = verdict.count("exact"), verdict.count("near")
        counts["exact"] += n_exact
        counts["near"] += n_near
        counts["by_split"][name] = {"exact": n_exact, "near": n_near}
    return out, counts


def read_split(data_dir: Path, task: str, split: str) -> pd.DataFrame:
    """One split of a prepare_data artifact (``<task>/<split>.parquet``), as the later nodes read it."""
    import pandas as pd

    p = Path(data_dir) / task / f"{split}.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"prepare_data artifact has no {task}/{split}.parquet ({p})")
    return pd.read_parquet(p)
