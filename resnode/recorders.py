"""Statistics of a training run kept on the fly, in memory that does not grow with iterations x depth.

A recorder is called as ``recorder.update(t, weights, loss)`` after ``t`` updates (``t = 0`` is the
initialisation), with ``weights`` a dict of stacked tensors ``(L, [S,] ...)`` and ``loss`` of shape
``()`` or ``(S,)``. Recorders hold no functions, so a run's checkpoint can pickle them.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _checks


def _times(name: str, times: Iterable[int]) -> tuple[int, ...]:
    times = tuple(sorted(set(int(t) for t in times)))
    if not times or times[0] < 0:
        raise ValueError(f"{name} must be a non-empty set of iterations >= 0; got {times!r}")
    return times


def increments(stacked: Tensor, lead: int, buffers: dict[str, Tensor] | None = None,
               chunk_bytes: int = 2**20) -> Tensor:
    """``||Z_{k+1} - Z_k||_F`` for ``k < L - 1``: shape ``(L - 1, *copies)`` where ``lead`` counts the copy dimensions.

    The differences are formed about ``chunk_bytes`` at a time, in ``buffers`` kept by the caller from one
    call to the next when given (the result is then one of them, overwritten by the next call). A fresh
    difference of the whole stack at every iteration (33 MB at L = 2^14) fragmented glibc's heap in some
    runs: 6 GB resident after 500 iterations instead of 1.2 GB.
    """
    flat = stacked.flatten(start_dim=1 + lead)
    size = max(1, chunk_bytes // max(1, flat[0].numel() * flat.element_size()))
    shapes = {"out": (len(flat) - 1, *flat.shape[1:-1]), "diff": (min(size, len(flat)), *flat.shape[1:])}
    buffers = {} if buffers is None else buffers
    for key, shape in shapes.items():
        if key not in buffers or buffers[key].shape != shape or buffers[key].dtype != flat.dtype:
            buffers[key] = flat.new_empty(shape)
    out, diff = buffers["out"], buffers["diff"]
    for lo in range(0, len(out), size):
        hi = min(lo + size, len(out))
        chunk = torch.sub(flat[lo + 1 : hi + 1], flat[lo:hi], out=diff[: hi - lo])
        torch.linalg.vector_norm(chunk, dim=-1, out=out[lo:hi])
    return out


class Loss:
    """The loss every ``every`` iterations: ``.values`` is ``(records, *copies)``, ``.times`` the iterations."""

    def __init__(self, every: int = 1):
        self.every = _checks.positive_int("every", every)
        self.times: list[int] = []
        self._values: list[np.ndarray] = []

    def update(self, t: int, weights: dict[str, Tensor], loss: Tensor) -> None:
        """Record ``loss`` (float64, ``()`` or ``(S,)``) and ``t`` if iteration ``t`` is a multiple of ``every``."""
        if t % self.every == 0:
            self.times.append(t)
            self._values.append(loss.detach().cpu().double().numpy())

    @property
    def values(self) -> np.ndarray:
        """The recorded losses, ``(records, *copies)``, one row per entry of ``.times``."""
        return np.stack(self._values)


class MaxIncrement:
    """Marion et al. Fig. 1 (left) and Prop. 3: the largest increment across depth, as a running max over time.

    For each tensor named in ``names`` and each horizon ``T`` of ``horizons``:
    ``max_{t <= T} max_k ||Z_{k+1}(t) - Z_k(t)||_F`` (``.max[name]``, shape ``(horizons, *copies)``), and the
    authors' plotted aggregate ``(sum_{t < T} sum_k ||Z_{k+1}(t) - Z_k(t)||_F^2)^{1/2}`` (``.l2[name]``).
    ``.now[name]`` is the latest ``max_k`` (not a running max), for plots against time.
    """

    def __init__(self, horizons: Sequence[int], names: Sequence[str] = ("V", "W"), copies: int = 0):
        self.horizons = _times("horizons", horizons)
        self.names = tuple(names)
        self.copies = copies  # number of copy dimensions after depth
        self.max = {n: [] for n in self.names}
        self.l2 = {n: [] for n in self.names}
        self._running: dict[str, Tensor] = {}
        self._sum_sq: dict[str, Tensor] = {}
        self.now: dict[str, Tensor] = {}
        self._buffers: dict[str, dict[str, Tensor]] = {}  # reused at every update; not pickled

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_buffers"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _buffers={})

    def update(self, t: int, weights: dict[str, Tensor], loss: Tensor) -> None:
        """Take iteration ``t``'s increments ``||Z_{k+1}(t) - Z_k(t)||_F`` of each named tensor into ``.now``, the
        running max and the sum of squares; at a horizon ``t = T``, record ``.max`` and ``.l2`` (the sum over
        ``t < T``)."""
        for name in self.names:
            inc = increments(weights[name], self.copies, self._buffers.setdefault(name, {}))
            top = inc.max(0).values
            self.now[name] = top
            if name not in self._running:
                self._running[name] = top.clone()
                self._sum_sq[name] = torch.zeros_like(top)
            if t in self.horizons:  # the l2 aggregate sums t < T, as the authors' script does
                self.l2[name].append(self._sum_sq[name].sqrt().cpu().numpy().copy())
            torch.maximum(self._running[name], top, out=self._running[name])
            self._sum_sq[name] += inc.square().sum(0)
            if t in self.horizons:
                self.max[name].append(self._running[name].cpu().numpy().copy())

    def result(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(max, l2)`` for ``name``, each ``(recorded horizons, *copies)``."""
        return np.stack(self.max[name]), np.stack(self.l2[name])


class Snapshots:
    """Copies of chosen entries at chosen iterations: every ``stride``-th layer and, when ``entries`` is given
    as ``(rows, cols)``, only those matrix entries (Marion et al. Fig. 2; a coarsened reference for Fig. 1 right)."""

    def __init__(self, times: Iterable[int], names: Sequence[str] = ("V", "W"), stride: int = 1,
                 entries: tuple[Sequence[int], Sequence[int]] | None = None):
        self.times = _times("times", times)
        self.names = tuple(names)
        self.stride = _checks.positive_int("stride", stride)
        self.entries = None if entries is None else (list(entries[0]), list(entries[1]))
        self.taken: dict[int, dict[str, Tensor]] = {}

    def update(self, t: int, weights: dict[str, Tensor], loss: Tensor) -> None:
        """At a chosen iteration ``t``, keep a detached copy of every ``stride``-th layer of each named tensor
        (only ``entries`` if given) in ``.taken[t]``."""
        if t in self.times:
            taken = {}
            for name in self.names:
                w = weights[name][:: self.stride]
                if self.entries is not None:
                    rows, cols = self.entries
                    w = w[..., rows, :][..., cols]
                taken[name] = w.detach().clone()
            self.taken[t] = taken

    def stacked(self, name: str) -> Tensor:
        """``(times, layers, ...)`` of ``name`` over the recorded iterations."""
        return torch.stack([self.taken[t][name] for t in sorted(self.taken)])


class DistanceTo:
    """Marion et al. Fig. 1 (right): ``(1/L sum_i ||Z_i(t) - Z^ref_{i L_ref / L}(t)||_F^2)^{1/2}`` at the iterations
    where ``reference`` (a ``Snapshots`` of the reference run, or its ``taken`` dict) holds the reference weights.

    The reference grid must contain every layer ``i L_ref / L`` after its own coarsening: its layer count
    (as snapshotted) must be a multiple of ``L``. ``.values[name]`` is ``(times, *copies)``. A checkpoint keeps
    the values, not the reference.
    """

    def __init__(self, reference, names: Sequence[str] = ("V", "W"), copies: int = 0):
        self.reference = reference.taken if isinstance(reference, Snapshots) else dict(reference)
        self.names = tuple(names)
        self.copies = copies
        self.times: list[int] = []
        self._values: dict[str, list[np.ndarray]] = {n: [] for n in self.names}

    def update(self, t: int, weights: dict[str, Tensor], loss: Tensor) -> None:
        """At an iteration ``t`` the reference holds, record each named tensor's distance to it (Marion et al. Fig. 1
        right), ``(1/L sum_i ||Z_i(t) - Z^ref_{i L_ref / L}(t)||_F^2)^{1/2}``, of shape ``(*copies)``."""
        if t not in self.reference:
            return
        self.times.append(t)
        for name in self.names:
            w, ref = weights[name], self.reference[t][name]
            depth, fine = w.shape[0], ref.shape[0]
            if fine % depth:
                raise ValueError(f"the reference has {fine} layers, not a multiple of depth {depth}")
            ref = ref[:: fine // depth].to(w)
            if self.copies and ref.dim() == w.dim() - self.copies:
                ref = ref.reshape(ref.shape[0], *(1,) * self.copies, *ref.shape[1:])
            gap = (w - ref).flatten(start_dim=1 + self.copies)
            self._values[name].append(gap.square().sum(-1).mean(0).sqrt().cpu().numpy())

    def __getstate__(self) -> dict:
        """Pickled (as in a checkpoint) without the reference weights, which the resuming run passes again."""
        return {k: v for k, v in self.__dict__.items() if k != "reference"}

    @property
    def values(self) -> dict[str, np.ndarray]:
        """The recorded distances by name, each ``(times, *copies)``, one row per entry of ``.times``."""
        return {n: np.stack(v) for n, v in self._values.items()}


class Clock:
    """The wall time a run spends between its updates, summed over the pieces of a resumed run, and the peak
    resident memory of the process so far in bytes, ``.peak_rss_bytes`` (``getrusage``'s ``ru_maxrss``, which Linux
    gives in kibibytes).

    ``.seconds`` / ``.updates`` is the time per iteration. The time between a checkpoint and its resumption is not
    counted: a checkpoint keeps the totals, not the moment of the last update.
    """

    def __init__(self):
        self.seconds = 0.0
        self.updates = 0
        self.peak_rss_bytes = 0
        self._last: float | None = None

    def update(self, t: int, weights: dict[str, Tensor], loss: Tensor) -> None:
        """Add the wall time since the previous update (none at the first) to ``.seconds``, count the iteration, and
        update the peak resident memory ``.peak_rss_bytes``."""
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
            self.updates += 1
        self._last = now
        self.peak_rss_bytes = max(self.peak_rss_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    @property
    def per_iteration(self) -> float:
        """Seconds per iteration (nan before two updates)."""
        return self.seconds / self.updates if self.updates else float("nan")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_last"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _last=None)


__all__ = ["increments", "Loss", "MaxIncrement", "Snapshots", "DistanceTo", "Clock"]
