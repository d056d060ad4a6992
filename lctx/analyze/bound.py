"""RoPE arithmetic on frequencies alone: Men et al.'s B(m), the base lower bound it implies, Su's long-term decay.

B(m) = Σ_i cos(m·θ_i) is the expected attention score of a query and a key m tokens apart when both are the
same random vector ("Base of RoPE Bounds Context Length", Men et al. 2024, arXiv:2405.14591): the model can
only tell similar tokens from random ones at distance m while B(m) ≥ 0, so a base b is *admissible* for a
length L when B(m) ≥ 0 for every integer m in [0, L] with θ_i = b^(−2i/d).

B is not monotone in b, so the smallest admissible base is found by scanning a geometric grid of bases
b_k = ratio^k (k ≥ 1) fine enough to resolve the narrow admissible windows, and above it lies the point from
which every base is admissible. Both scans evaluate B at every m ≤ L for many bases, as a matrix product
(cos((a + c)θ) = cos aθ·cos cθ − sin aθ·sin cθ), so a 128k-token bound takes seconds on two CPU cores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

RATIO = 1.001  # grid ratio of the base scan: resolves the admissible windows (they span ratios of ~1.003+)
MAX_BASE = 1e16  # the scan's ceiling: a base past it is not searched (only tiny rotary dims need one)
_FLOATS_PER_BATCH = 1 << 22  # B(m) values held at once (16 MB in float32)
_RECHECK = 1e-3  # float32 minima this close to 0 are recomputed in float64


def frequencies(base: float | torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """θ_i = b^(−2i/d) in float64, one row per base: shape (bases, d/2)."""
    bases = torch.as_tensor(base, dtype=torch.float64).reshape(-1, 1)
    return bases ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def b_values(theta: torch.Tensor, start: int, stop: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """B(m) for integers m in [start, stop] and each row of ``theta`` (bases, d/2): shape (bases, stop − start + 1).

    m = a + c with a on a coarse grid and c < cols: B is the product of a (rows × d) cos/sin table of a·θ with a
    (d × cols) one of c·θ, so it costs one matrix product instead of a cosine per (m, i).
    """
    theta = theta.to(torch.float64)
    n = stop - start + 1
    if theta.shape[1] == 0:
        return torch.zeros(theta.shape[0], n, dtype=dtype)
    cols = max(1, min(n, math.isqrt(n)))
    rows = -(-n // cols)
    half = theta.shape[1]
    both = torch.cat([theta, theta], dim=1)[:, None, :]  # cos on the first half, sin (as a shifted cos) on the second
    shift = torch.cat([torch.zeros(half, dtype=torch.float64), torch.full((half,), math.pi / 2, dtype=torch.float64)])
    a = (start + cols * torch.arange(rows, dtype=torch.float64))[None, :, None]
    left = torch.cos(torch.addcmul(shift, a, both)).to(dtype)  # cos(aθ), −sin(aθ)
    right = torch.cos(torch.addcmul(-shift, torch.arange(cols, dtype=torch.float64)[None, :, None], both))
    right = right.to(dtype).transpose(1, 2)  # cos(cθ), sin(cθ)
    return torch.bmm(left, right).reshape(theta.shape[0], -1)[:, :n]


def b_min(theta: torch.Tensor, stop: int, start: int = 0) -> torch.Tensor:
    """min of B(m) over integers m in [start, stop], per row of ``theta``; float64 wherever the sign is close."""
    batch = max(1, _FLOATS_PER_BATCH // (stop - start + 1))
    out = torch.zeros(theta.shape[0], dtype=torch.float64)
    for s in range(0, theta.shape[0], batch):
        out[s:s + batch] = b_values(theta[s:s + batch], start, stop, torch.float32).amin(1)
    close = (out.abs() < _RECHECK).nonzero().flatten()
    for row in close.tolist():
        out[row] = b_values(theta[row:row + 1], start, stop).min()
    return out


def _proved_prefix(k: int, log_ratio: float, rotary_dim: int, length: int) -> int:
    """The largest M ≤ length with B(m) ≥ 0 for every m ≤ M and *every* base ≥ b_k, proved all at once.

    For b ≥ b_k each θ_i (i ≥ 1) lies in (0, θ_i(b_k)], so cos(m·θ_i) is at least cos(m·θ_i(b_k)) while that
    phase is at most π, and at least −1 beyond; θ_0 = 1 whatever the base. This bound only rises with k, so M
    does too: the smallest k reaching ``length`` can be bisected, and a scan of bases ≥ b_k need only check
    m > M. Evaluated in chunks of m, stopping at the first m it cannot prove; within a chunk the dimensions
    whose phase stays ≤ π are summed as one matrix product, the few crossing π elementwise.
    """
    theta = frequencies(math.exp(k * log_ratio), rotary_dim)[0]
    cut = torch.floor(math.pi / theta)  # phase m·θ_i ≤ π exactly for m ≤ cut_i; cut rises with i
    cut[0] = -1  # θ_0 = 1 is exact, not bounded: summed on its own
    chunk = 8192
    for lo in range(0, length + 1, chunk):
        hi = min(length, lo + chunk - 1)
        m = torch.arange(lo, hi + 1, dtype=torch.float64)
        bound = torch.cos(m) - float(((cut >= 0) & (cut < lo)).sum())
        whole = cut >= hi
        if whole.any():
            bound += b_values(theta[whole][None], lo, hi)[0]
        crossing = (cut >= lo) & (cut < hi)
        if crossing.any():
            phase = m[:, None] * theta[crossing]
            bound += torch.where(phase <= math.pi, torch.cos(phase), -1.0).sum(1)
        bad = (bound < _RECHECK).nonzero()  # margin: a proof must not rest on rounding
        if bad.numel():
            return lo + int(bad[0]) - 1
    return length


def _inadmissible(ks: torch.Tensor, proved: int, log_ratio: float, rotary_dim: int, length: int) -> torch.Tensor:
    """Which bases b_k of consecutive ``ks`` have B(m) < 0 for some m ≤ length (a boolean mask).

    Used where bases are mostly admissible, so the work is in proving it cheaply: m ≤ ``proved`` need no check
    (:func:`_proved_prefix` of a base at most ``ks[0]``), and the slow dimensions (phase ≤ π up to ``length``)
    are bounded for the whole batch by their sum at its smallest base, where their phases are largest. Only the
    fast ones are summed per base; a base this bound cannot clear gets the exact check.
    """
    theta = frequencies(torch.exp(ks * log_ratio), rotary_dim)
    fast = int((length * theta[0] > math.pi).sum())  # θ falls with i: the fast dimensions come first
    slow = b_values(theta[:1, fast:], proved + 1, length)[0].float()
    low = b_values(theta[:, :fast], proved + 1, length, torch.float32).add_(slow).amin(1)
    unclear = (low < _RECHECK).nonzero().flatten()
    bad = torch.zeros(ks.numel(), dtype=torch.bool)
    if unclear.numel():
        bad[unclear] = b_min(theta[unclear], length, proved + 1) < 0
    return bad


def _last_inadmissible(top: int, log_ratio: float, rotary_dim: int, length: int) -> int:
    """The largest k < ``top`` whose base is not admissible (0 if none), scanning down in batches.

    The proved prefix is computed once per group of bases, at the group's smallest: it holds for all of them.
    """
    k = top
    while k > 1:
        group = max(1, k - 512)
        proved = _proved_prefix(group, log_ratio, rotary_dim, length)
        batch = max(16, _FLOATS_PER_BATCH // (length - proved + 1))
        while k > group:
            ks = torch.arange(max(group, k - batch), k, dtype=torch.float64)
            if proved < length:
                bad = _inadmissible(ks, proved, log_ratio, rotary_dim, length).nonzero()
                if bad.numel():
                    return int(ks[int(bad.max())])
            k = int(ks[0])
    return 0


@dataclass(frozen=True)
class BaseBound:
    """The admissible bases for one rotary dimension and length, on the grid b_k = ratio^k.

    ``lower`` is the smallest admissible base (the paper's figure); ``stable`` the smallest from which every
    grid base up to ``certified`` is admissible, and every base at all from ``certified`` on (proved, not
    scanned). None where no base up to :data:`MAX_BASE` qualifies (a rotary dimension of 2: B = cos m).
    """

    rotary_dim: int
    length: int
    lower: float | None
    stable: float | None
    certified: float | None
    ratio: float
    seconds: float

    def as_dict(self) -> dict:
        return {"length": self.length, "rotary_dim": self.rotary_dim, "base_lower_bound": self.lower,
                "base_lower_bound_stable": self.stable, "certified_from": self.certified,
                "scan_ratio": self.ratio, "seconds": round(self.seconds, 3)}


def _first_admissible(ks: torch.Tensor, log_ratio: float, rotary_dim: int, length: int) -> int | None:
    """The smallest k in ``ks`` (ascending) whose base is admissible.

    Most bases below the bound fail close to m = L, so each is tried on a short band of m first, then a
    longer one; only the survivors get the full check.
    """
    def admissible(candidates: torch.Tensor, lo: int) -> torch.Tensor:
        return candidates[b_min(frequencies(torch.exp(candidates * log_ratio), rotary_dim), length, lo) >= 0]

    full = max(1, _FLOATS_PER_BATCH // (length + 1))
    for s in range(0, ks.numel(), 4096):
        alive = ks[s:s + 4096]
        for lo in (length - w for w in (255, 4095) if w < length):
            alive = admissible(alive, lo)
        for g in range(0, alive.numel(), full):  # ascending, so the first admissible group member is the answer
            found = admissible(alive[g:g + full], 0)
            if found.numel():
                return int(found[0])
    return None


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the analysis is thousands of small tensor operations, which a second OpenMP
    thread slows down; on a shared two-core machine many times (the 128k bound for d = 128: 32 s against 5 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=64)
def base_bound(rotary_dim: int, length: int, ratio: float = RATIO) -> BaseBound:
    """Men et al.'s base lower bound for rotary dimension ``rotary_dim`` and length ``length``.

    Three steps: bisect the smallest grid base from which every base is provably admissible; scan down from
    there to the last inadmissible base (``stable`` is the next one up); scan up from the bottom of the grid
    to the first admissible base (``lower``).
    """
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary dimension must be a positive even number, not {rotary_dim}")
    if length < 1:
        raise ValueError(f"length must be at least 1, not {length}")
    if not 1 < ratio <= 1.01:
        raise ValueError(f"scan ratio must be in (1, 1.01], not {ratio}")
    started, log_ratio = time.perf_counter(), math.log(ratio)
    with one_thread():
        lower, stable, certified = _scan(rotary_dim, length, log_ratio)
    lower_base, stable_base, certified_base = (None if k is None else math.exp(k * log_ratio)
                                               for k in (lower, stable, certified))
    return BaseBound(rotary_dim, length, lower_base, stable_base, certified_base, ratio, time.perf_counter() - started)


def _scan(rotary_dim: int, length: int, log_ratio: float) -> tuple[int | None, int | None, int | None]:
    """Grid indices (lower, stable, certified) of :func:`base_bound`."""
    top = math.ceil(math.log(MAX_BASE) / log_ratio)
    certified = None
    if _proved_prefix(top, log_ratio, rotary_dim, length) == length:
        lo, hi = 0, top  # lo: not proved (b_0 = 1 is no base), hi: proved
        while hi - lo > 64:  # within 1.001^64 ≈ 1.07 of the smallest: bisecting further costs more than it saves
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _proved_prefix(mid, log_ratio, rotary_dim, length) == length else (mid, hi)
        certified = hi
    stable = None if certified is None else _last_inadmissible(certified, log_ratio, rotary_dim, length) + 1
    end = stable if stable is not None else top + 1
    lower = _first_admissible(torch.arange(1, end, dtype=torch.float64), log_ratio, rotary_dim, length)
    return lower if lower is not None else stable, stable, certified


def su_decay(theta: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """RoFormer's long-term decay bound (Su et al. 2021, §3.4.3) at each relative distance m.

    |Σ_i h_i e^(imθ_i)| ≤ max_i |h_(i+1) − h_i| · Σ_j |S_j| with S_j = Σ_(i<j) e^(imθ_i) (Abel summation);
    the curve is (1/(d/2)) Σ_(j=1..d/2) |S_j|, which shrinks (with ripples) as m grows.
    """
    theta = theta.to(torch.float64).flatten()
    out = []
    for chunk in torch.as_tensor(distances, dtype=torch.float64).split(max(1, _FLOATS_PER_BATCH // theta.numel())):
        phase = chunk[:, None] * theta
        partial = torch.complex(torch.cos(phase), torch.sin(phase)).cumsum(dim=1)
        out.append(partial.abs().mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
