"""Continual TIES merging: fold each task vector into the merged one with TIES (Yadav et al., 2023).

Step 1: θ = θ0 + c·τ_1. Step t: with m = θ − θ0 (the merged task vector so far),
θ ← θ + c·TIES(m, τ_t), where TIES of the two vectors
  1. trims each vector to its top `threshold` percent of magnitudes: with d entries and
     K = threshold/100, an entry is kept when |x| ≥ the k-th smallest |x| of its vector,
     k = d − floor(d·K) (so ties at the threshold are all kept; with threshold 100 everything is);
  2. elects a sign per entry, sign(m̂ + τ̂) of the trimmed vectors; an entry whose sum is zero
     takes the majority sign, sign(Σ elected signs) over all entries;
  3. merges the trimmed entries whose sign agrees with the elected one (`merge_func`: their sum,
     their mean, or the largest magnitude with the elected sign).

State: m itself (float32 per tensor, already scaled). The trim and the sign election see exactly
the stored float32 values of m and the float64 task vector. Scalars: `merged_norm` (‖m‖),
`last_task_norm` (‖τ_t‖) and, from step 2, `last_kept_merged_fraction` and
`last_kept_task_fraction` (shares of entries surviving each trim) and `last_changed_fraction`
(share of entries the step changed).

`scope=model` (default) applies the trim and the majority sign to the whole flattened model, as
the reference does. Both are global quantities, so `prepare_step` finds them exactly before the
update pass, in bounded memory:
  - Magnitudes are ordered by their IEEE bit patterns (for non-negative floats the bit pattern,
    read as an integer, is monotone in the value): 31-bit keys for float32 m, 63-bit keys for
    float64 τ. The k-th smallest key is found by radix refinement: a pass histograms the next
    `DIGIT_BITS` bits of the keys that share the prefix found so far, which pins the prefix down
    by those bits (at most 2 such passes for m and 4 for τ); a digit whose keys turn out to be a
    single value (many equal magnitudes, as bf16 checkpoints give) settles the answer at once.
  - In the same passes, while the entries whose trim is still undecided (their key shares the
    prefix) number at most `PENDING_LIMIT`, their values are kept aside; every other entry's trim
    is already known, so its elected sign is summed at once. When a pass ends with the undecided
    entries all kept aside, the exact thresholds are their k-th values (`kthvalue` on at most
    `PENDING_LIMIT` keys) and their elected signs complete the majority sum.
  A model with at most `PENDING_LIMIT` entries takes one preparation pass; a larger one takes one
  pass per refinement plus one, typically 2 or 3 read passes before the update pass (at most 5).
  Memory: per vector, 2^DIGIT_BITS counts and extreme keys (1.5 MiB), plus at most
  `PENDING_LIMIT` kept-aside entries (12 bytes each, 24 MiB; a few times that while they are
  finished), beside the per-tensor temporaries every method has; independent of the model size
  and of the number of models.
`scope=tensor` trims and resolves zero signs within each tensor instead (the same TIES rule with
one tensor as the whole vector, as mergekit and PEFT apply it); it needs no preparation pass.

Reference: FusionBench `fusion_bench/method/opcm/ties_merging.py` (ContinualTiesMergingForCLIP)
with `fusion_bench/method/ties_merging/ties_merging_utils.py` (`topk_values_mask`,
`resolve_sign`, `disjoint_merge`). Choices and differences:
  - `merge_func` defaults to `sum`, the reference's continual default: agreeing entries add up.
  - `scaling_factor` defaults to 0.3, the value of the continual-merging paper's 8-task runs; the
    reference's configuration file ships 0.5.
  - `threshold` is always a percentage. The reference divides by 100 only values above 1 (it
    reads 0.2 as 20 %), and its `kthvalue(0)` fails at threshold 100, which here keeps everything.
  - The merged vector covers every floating-point tensor of the base (integer buffers are copied
    from the base); the reference flattens the state dict it is given.
  - Where the majority sign is itself zero, an entry with a zero elected sign keeps its negative
    trimmed values, exactly as the reference's `torch.where(sign > 0, v > 0, v < 0)` does.
  - The reference stores θ in the model's dtype and recomputes m = θ − θ0; here m is stored as
    float32 directly, and all arithmetic is float64, so values agree to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from .base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    StepTensor,
    TensorInfo,
    TensorUpdate,
)
from .configs.ties import MergeFunc, TiesConfig
from .ops import squared_norm

DIGIT_BITS = 16  # key bits resolved per histogram pass (2^16 counts per histogram)
PENDING_LIMIT = 1 << 21  # undecided entries kept aside to finish the selection in memory

_KEY_MAX = (1 << 63) - 1
_THRESHOLD_M = "ties_threshold_merged"
_THRESHOLD_TAU = "ties_threshold_task"
_MAJORITY = "ties_majority_sign"


def trim_rank(numel: int, threshold: float) -> int:
    """The 1-based rank, in ascending magnitude, of the smallest kept magnitude among `numel`
    entries at `threshold` percent: numel − floor(numel·threshold/100). At most 0 keeps all."""
    return numel - int(numel * (threshold / 100))


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened, as int64 keys ordered like the magnitudes (the IEEE bit patterns).

    float32 gives 31-bit keys, float64 63-bit keys; other float dtypes go through float32, which
    holds them exactly."""
    a = x.detach().abs().reshape(-1)
    if a.dtype == torch.float64:
        return a.view(torch.int64)
    if a.dtype != torch.float32:
        a = a.to(torch.float32)
    return a.view(torch.int32).to(torch.int64)


def _key_bits(dtype: torch.dtype) -> int:
    return 63 if dtype == torch.float64 else 31


def _key_value(key: int, bits: int) -> float:
    if bits == 63:
        return float(torch.tensor(key, dtype=torch.int64).view(torch.float64))
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))


def _sign(value: int) -> float:
    return float((value > 0) - (value < 0))


def _trimmed(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def elected_sign_sum(
    merged: torch.Tensor, task: torch.Tensor, threshold_merged: float, threshold_task: float
) -> int:
    """Σ sign(m̂ + τ̂) over the entries of one pair of tensors, m̂ and τ̂ the trimmed vectors."""
    m = _trimmed(merged.to(COMPUTE_DTYPE), threshold_merged)
    t = _trimmed(task.to(COMPUTE_DTYPE), threshold_task)
    return int(torch.sign(m + t).to(torch.int64).sum())


def ties_combine(
    merged: torch.Tensor,
    task: torch.Tensor,
    threshold_merged: float,
    threshold_task: float,
    majority_sign: float,
    merge_func: MergeFunc = "sum",
) -> tuple[torch.Tensor, dict[str, int]]:
    """TIES of two vectors of one shape, given their trim thresholds and the majority sign.

    Returns the merged update (float64) and counts: entries kept by each trim and entries the
    update changes."""
    merged, task = merged.to(COMPUTE_DTYPE), task.to(COMPUTE_DTYPE)
    m = _trimmed(merged, threshold_merged)
    t = _trimmed(task, threshold_task)
    sign = torch.sign(m + t)
    sign = torch.where(sign == 0, torch.full_like(sign, majority_sign), sign)
    keep_m = torch.where(sign > 0, m > 0, m < 0)
    keep_t = torch.where(sign > 0, t > 0, t < 0)
    zero = torch.zeros((), dtype=COMPUTE_DTYPE, device=m.device)
    sel_m = torch.where(keep_m, m, zero)
    sel_t = torch.where(keep_t, t, zero)
    if merge_func == "sum":
        out = sel_m + sel_t
    elif merge_func == "mean":
        out = (sel_m + sel_t) / (keep_m.to(COMPUTE_DTYPE) + keep_t.to(COMPUTE_DTYPE)).clamp(min=1)
    elif merge_func == "max":
        out = torch.maximum(sel_m.abs(), sel_t.abs()) * sign
    else:
        raise ValueError(f"unknown merge_func {merge_func!r}")
    counts = {
        "kept_merged": int((merged.abs() >= threshold_merged).sum()),
        "kept_task": int((task.abs() >= threshold_task).sum()),
        "changed": int((keep_m | keep_t).sum()),
    }
    return out, counts


def tensor_threshold(x: torch.Tensor, threshold: float) -> float:
    """The trim threshold of one tensor on its own (the k-th smallest magnitude)."""
    rank = trim_rank(x.numel(), threshold)
    if rank <= 0:
        return 0.0
    return float(torch.kthvalue(x.detach().abs().reshape(-1).to(COMPUTE_DTYPE), rank).values)


class _Selection:
    """The exact k-th smallest of a stream of non-negative integer keys, refined pass by pass.

    The answer is known to share `prefix` in its bits above `shift`; `below` keys are smaller
    than every key with that prefix, and `count` keys have it."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.prefix = 0
        self.shift = bits
        self.below = 0
        self.count: int | None = None  # unknown until the first pass has counted the entries
        self.key: int | None = None
        self._hist: torch.Tensor | None = None
        self._lowest: torch.Tensor | None = None
        self._highest: torch.Tensor | None = None
        self._width = 0

    @property
    def resolved(self) -> bool:
        return self.key is not None

    def threshold(self) -> float:
        assert self.key is not None
        return _key_value(self.key, self.bits)

    @property
    def untouched(self) -> bool:
        """Nothing narrowed yet: every key is undecided."""
        return self.key is None and self.shift == self.bits

    def undecided(self, keys: torch.Tensor) -> torch.Tensor:
        if self.key is not None:
            return torch.zeros_like(keys, dtype=torch.bool)
        return (keys >> self.shift) == self.prefix

    def split(self, keys: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(undecided keys, or None when there are none; keys known to be kept, i.e. at or above
        the answer)."""
        if self.key is not None:
            return None, keys >= self.key
        high = keys >> self.shift
        return high == self.prefix, high > self.prefix

    def observe(self, keys: torch.Tensor) -> None:
        """Count the next digit of the keys sharing the prefix; note each digit's extreme keys."""
        candidates = keys if self.untouched else keys[self.undecided(keys)]
        if self._hist is None:
            self._width = min(DIGIT_BITS, self.shift)
            bins = 1 << self._width
            self._hist = torch.zeros(bins, dtype=torch.int64, device=keys.device)
            self._lowest = torch.full((bins,), _KEY_MAX, dtype=torch.int64, device=keys.device)
            self._highest = torch.full((bins,), -1, dtype=torch.int64, device=keys.device)
        bins = self._hist.numel()
        digits = (candidates >> (self.shift - self._width)) & (bins - 1)
        if digits.numel() > bins:
            self._hist += torch.bincount(digits, minlength=bins)
        else:
            self._hist.index_add_(0, digits, torch.ones_like(digits))
        self._lowest.scatter_reduce_(0, digits, candidates, "amin")
        self._highest.scatter_reduce_(0, digits, candidates, "amax")

    def narrow(self, rank: int) -> None:
        """Fix the next digit from the histogram of the pass just ended."""
        if rank <= 0:
            self.key = 0
            return
        assert self._hist is not None
        hist, self._hist = self._hist, None
        assert self._lowest is not None and self._highest is not None
        cumulative = hist.cumsum(0)
        target = torch.tensor(rank - self.below, dtype=cumulative.dtype, device=hist.device)
        digit = int(torch.searchsorted(cumulative, target))
        self.below += int(cumulative[digit]) - int(hist[digit])
        self.count = int(hist[digit])
        self.prefix = (self.prefix << self._width) | digit
        self.shift -= self._width
        if self.shift == 0 or int(self._lowest[digit]) == int(self._highest[digit]):
            self.key = int(self._lowest[digit])  # the digit's keys are all one value
        self._lowest = self._highest = None

    def settle(self, rank: int, candidates: torch.Tensor) -> None:
        """Resolve from all keys sharing the prefix."""
        if rank <= 0:
            self.key = 0
            return
        self.key = int(torch.kthvalue(candidates, rank - self.below).values)


class _Aside:
    """Entries whose trim is still undecided, kept aside during a pass to finish in memory.

    In the first pass every entry is undecided, so whole tensors are referenced as they come;
    later passes copy the undecided entries into two buffers sized once for the pass, so that
    nothing small and long-lived sits between the pass's large temporaries (which fragments the
    heap of a long pass)."""

    def __init__(
        self,
        capacity: int | None = None,
        dtypes: tuple[torch.dtype, ...] = (),
        device: torch.device | None = None,
    ) -> None:
        self.count = 0
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        if capacity is not None:
            self._buffers = (
                torch.empty(capacity, dtype=dtypes[0], device=device),
                torch.empty(capacity, dtype=dtypes[1], device=device),
            )

    def add(self, m: torch.Tensor, tau: torch.Tensor) -> None:
        if self._buffers is None:
            self._parts.append((m, tau))
        else:
            end = self.count + m.numel()
            self._buffers[0][self.count : end] = m
            self._buffers[1][self.count : end] = tau
        self.count += m.numel()

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._buffers is None:
            yield from self._parts
        else:
            yield self._buffers[0][: self.count], self._buffers[1][: self.count]

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = list(self.chunks())
        if not chunks:
            return torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=COMPUTE_DTYPE)
        if len(chunks) == 1:
            return chunks[0]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def _observe(selections: tuple[_Selection, _Selection], keys: tuple[torch.Tensor, ...]) -> None:
    for selection, k in zip(selections, keys, strict=True):
        if not selection.resolved:
            selection.observe(k)


def global_ties_selection(
    tensors: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], threshold: float
) -> tuple[float, float, float, int]:
    """The whole-model trim thresholds of m and τ and the majority sign, found exactly.

    `tensors()` starts a fresh pass over (m, τ) pairs, one tensor at a time. Returns
    (threshold of m, threshold of τ, majority sign, number of passes); see the module docstring.
    """
    selections: tuple[_Selection, _Selection] | None = None
    dtypes: tuple[torch.dtype, ...] = ()
    device: torch.device | None = None
    rank: int | None = None
    passes = 0
    while True:
        passes += 1
        if selections is None:
            # First pass: keep everything aside while it fits; histogram only once it does not
            # (a model of at most PENDING_LIMIT entries never needs a histogram).
            aside: _Aside | None = _Aside()
            histogram = False
        else:
            bound = sum(s.count or 0 for s in selections if not s.resolved)
            aside = _Aside(bound, dtypes, device) if bound <= PENDING_LIMIT else None
            histogram = aside is None
        sign_sum = 0
        numel = 0
        for m, tau in tensors():
            if selections is None:
                selections = (_Selection(_key_bits(m.dtype)), _Selection(_key_bits(tau.dtype)))
                dtypes, device = (m.dtype, tau.dtype), tau.device
                if threshold >= 100:
                    for s in selections:
                        s.key = 0
            keys = (magnitude_keys(m), magnitude_keys(tau))
            numel += keys[0].numel()
            if histogram:
                _observe(selections, keys)
            if aside is None:
                continue
            m_flat, tau_flat = m.reshape(-1), tau.reshape(-1)
            everything = selections[0].untouched or selections[1].untouched
            undecided: torch.Tensor | None = None
            if everything:  # nothing narrowed yet: every entry is undecided
                count = m_flat.numel()
            else:
                undecided_m, kept_m = selections[0].split(keys[0])
                undecided_tau, kept_tau = selections[1].split(keys[1])
                if undecided_m is None or undecided_tau is None:
                    undecided = undecided_tau if undecided_m is None else undecided_m
                else:
                    undecided = undecided_m | undecided_tau
                count = 0 if undecided is None else int(undecided.sum())
            if aside.count + count > PENDING_LIMIT:
                # Too many to finish in memory this pass: histogram instead, starting with the
                # entries kept aside so far (they include every undecided one seen).
                for chunk in aside.chunks():
                    _observe(selections, tuple(magnitude_keys(v) for v in chunk))
                _observe(selections, keys)
                aside, histogram = None, True
                continue
            if everything:
                aside.add(m_flat, tau_flat)
                continue
            if count:
                aside.add(m_flat[undecided], tau_flat[undecided])
            # Every other entry's trim is known: its elected sign counts now.
            elected = torch.sign(
                torch.where(kept_m, m_flat, 0.0) + torch.where(kept_tau, tau_flat, 0.0)
            )
            if undecided is not None:
                elected.masked_fill_(undecided, 0)
            sign_sum += int(elected.sum())
        if selections is None:  # no floating-point tensors at all
            return 0.0, 0.0, 0.0, passes
        if rank is None:
            rank = trim_rank(numel, threshold)
            for s in selections:
                if not s.resolved:
                    s.count = numel
        if aside is not None:
            m_rest, tau_rest = aside.values()
            for s, values in zip(selections, (m_rest, tau_rest), strict=True):
                if not s.resolved:
                    k = magnitude_keys(values)
                    s.settle(rank, k[s.undecided(k)])
            t_m, t_tau = selections[0].threshold(), selections[1].threshold()
            sign_sum += elected_sign_sum(m_rest, tau_rest, t_m, t_tau)
            return t_m, t_tau, _sign(sign_sum), passes
        for s in selections:
            if not s.resolved:
                s.narrow(rank)


class Ties(ContinualMethod):
    config_class = TiesConfig
    state_names = ("merged",)
    config: TiesConfig

    def prepare_step(
        self, step: int, scalars: Scalars, tensors: Callable[[], Iterator[StepTensor]]
    ) -> Scalars:
        if step == 1 or self.config.scope != "model":
            return {}

        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for item in tensors():
                yield item.state["merged"], item.task_vector

        t_m, t_tau, majority, _ = global_ties_selection(pairs, self.config.threshold)
        return {_THRESHOLD_M: t_m, _THRESHOLD_TAU: t_tau, _MAJORITY: majority}

    def streams_rows(self, info: TensorInfo) -> bool:
        # scope=tensor trims by each tensor's own top-k: it needs the whole tensor at once.
        return self.config.scope == "model"

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        cfg = self.config
        partials = {"task_norm_sq": squared_norm(task_vector)}
        if step == 1:
            new_merged = self.stored(cfg.scaling_factor * task_vector)
        else:
            merged = state["merged"]
            if cfg.scope == "model":
                t_m, t_tau = scalars[_THRESHOLD_M], scalars[_THRESHOLD_TAU]
                majority = scalars[_MAJORITY]
            else:
                t_m = tensor_threshold(merged, cfg.threshold)
                t_tau = tensor_threshold(task_vector, cfg.threshold)
                total = elected_sign_sum(merged, task_vector, t_m, t_tau)
                majority = _sign(total)
            combined, counts = ties_combine(
                merged, task_vector, t_m, t_tau, majority, cfg.merge_func
            )
            new_merged = self.stored(merged.to(COMPUTE_DTYPE) + cfg.scaling_factor * combined)
            partials.update({k: float(v) for k, v in counts.items()})
            partials["entries"] = float(task_vector.numel())
        partials["merged_norm_sq"] = squared_norm(new_merged.to(COMPUTE_DTYPE))
        return TensorUpdate(state={"merged": new_merged}, partials=partials)

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        out = {
            "merged_norm": math.sqrt(partials.get("merged_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
        }
        entries = partials.get("entries", 0.0)
        if step > 1 and entries:
            out["last_kept_merged_fraction"] = partials["kept_merged"] / entries
            out["last_kept_task_fraction"] = partials["kept_task"] / entries
            out["last_changed_fraction"] = partials["changed"] / entries
        return out

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return state["merged"].to(COMPUTE_DTYPE)
