"""The diffusive regime of deep ResNets: Itô-process weights, ODE and SDE limits, strong errors, Jacobians.

Cont, Rossier, Xu (2022), Sections 4-5. The network is ``h_{k+1} = h_k + delta sigma(A_k h_k + b_k)``
(eq. 1.1, ``h_0 = x``). The exponent conditions and limits below are our derivation by order counting (see
the book chapter "The SDE regime"), with

    delta = L^-alpha,   A_k = L^-beta Abar(k/L) + L^gamma (W^A_{(k+1)/L} - W^A_{k/L}),   same for b_k,

* regime 1 (smooth weights, no noise): ``beta = 0, alpha = 1`` gives the neural ODE
  ``dH = sigma(Abar H + bbar) dt`` (Thm 1, (4.3)); ``alpha + beta = 1, beta > 0`` the linear ODE
  ``dH = (Abar H + bbar) dt`` (Thm 1, (4.4));
* regime 2 (Brownian weights, Remark 1): ``alpha = gamma = 0, beta = 1`` gives the SDE (Thm 3, (4.19))
  ``dH = (Abar H + bbar + sigma''(0)/2 q(H)) dt + dW^A H + dW^b`` with the Itô correction
  ``q_i(H) = d[W^A H + W^b]^{ii}/dt``; ``alpha + beta = 1, 2 gamma < alpha`` the linear ODE (Thm 2, (4.18)).

Here ``W^A = s_A B^A`` and ``W^b = s_b B^b`` with independent standard Brownian motions, so
``q(H) = (s_A^2 |H|^2 + s_b^2) (1, ..., 1)``. Every depth reads one fine Brownian path: its coarse
increments are sums of the fine ones, and the limit SDE is solved on that same path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchsde
from torch import Tensor

from . import _checks, ode
from .models import euler


# ----------------------------------------------------------------------------------------------------------
# Activation satisfying Assumption 1 with a chosen sigma''(0)


@dataclass(frozen=True)
class CurvedTanh:
    """``sigma(x) = tanh(x) + (c/2) tanh(x)^2``: Assumption 1 with ``sigma''(0) = c`` and ``sigma'''(0) = -2``.

    ``sigma(0) = 0``, ``sigma'(0) = 1``; smooth with all derivatives bounded (a polynomial in tanh), so
    ``sigma'''`` is bounded. ``c = 0`` is tanh; other ``c`` change only the curvature at 0, which is the
    one feature of sigma beyond ``sigma'(0)`` that the regime-2 limits see (Thms 2-3).
    """

    curvature: float = 0.0

    def __post_init__(self):
        if isinstance(self.curvature, bool) or not isinstance(self.curvature, (int, float)) \
                or not math.isfinite(self.curvature):
            raise ValueError(f"curvature must be a finite number, got {self.curvature!r}")

    def __call__(self, x: Tensor) -> Tensor:
        t = torch.tanh(x)
        return t + 0.5 * self.curvature * t * t

    def derivative(self, x: Tensor) -> Tensor:
        """``sigma'(x) = (1 - tanh^2 x)(1 + c tanh x)``."""
        t = torch.tanh(x)
        return (1 - t * t) * (1 + self.curvature * t)


# ----------------------------------------------------------------------------------------------------------
# One fine Brownian path, seen at every depth


@dataclass
class BrownianGrid:
    """Increments of a standard Brownian motion on the fine grid ``k/N`` of [0, 1]: ``(N, paths, channels)``."""

    increments: Tensor

    @classmethod
    def sample(cls, steps: int, paths: int, channels: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> "BrownianGrid":
        """Independent ``N(0, 1/N)`` increments on ``N = steps`` fine steps."""
        steps = _checks.positive_int("steps", steps)
        shape = (steps, _checks.positive_int("paths", paths), _checks.positive_int("channels", channels))
        return cls(torch.randn(shape, generator=generator, dtype=dtype) / math.sqrt(steps))

    @property
    def steps(self) -> int:
        """The number ``N`` of fine steps (of increments)."""
        return self.increments.shape[0]

    def coarse(self, depth: int) -> Tensor:
        """Increments ``W_{(k+1)/L} - W_{k/L}``, ``k < L = depth``: sums of ``N/L`` consecutive fine increments."""
        depth = _checks.positive_int("depth", depth)
        if self.steps % depth:
            raise ValueError(f"depth {depth} must divide the fine grid's {self.steps} steps")
        return self.increments.reshape(depth, self.steps // depth, *self.increments.shape[1:]).sum(1)

    def path(self) -> Tensor:
        """``W_{k/N}``, ``k = 0..N``: ``(N + 1, paths, channels)``."""
        return torch.cat([torch.zeros_like(self.increments[:1]), self.increments.cumsum(0)])


class GridBrownian(torchsde.BaseBrownian):
    """The path of a ``BrownianGrid`` as a torchsde Brownian motion (for ``sdeint(..., bm=...)``).

    Queries must fall on the fine grid (the solver's ``dt`` a multiple of ``1/N``): the increments it
    returns are then exactly the ones the ResNets use.
    """

    def __init__(self, grid: BrownianGrid):
        self._path = grid.path()
        self._steps = grid.steps

    def _at(self, t) -> Tensor:
        scaled = float(t) * self._steps
        k = round(scaled)
        if abs(scaled - k) > 1e-6:
            raise ValueError(f"time {float(t)} is not on the fine grid of {self._steps} steps")
        return self._path[k]

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("GridBrownian has no space-time Levy area; use method='euler'")
        return self._at(ta) if tb is None else self._at(tb) - self._at(ta)

    def __repr__(self):
        return f"GridBrownian(steps={self._steps}, shape={tuple(self.shape)})"

    @property
    def dtype(self):
        """The dtype of the path."""
        return self._path.dtype

    @property
    def device(self):
        """The device of the path."""
        return self._path.device

    @property
    def shape(self):
        """The shape of one value of the path, ``(paths, channels)``."""
        return self._path.shape[1:]

    @property
    def levy_area_approximation(self):
        """``"none"``: the grid carries no Levy area (torchsde then allows only methods that need none)."""
        return "none"


# ----------------------------------------------------------------------------------------------------------
# Drift functions and the noise model


@dataclass
class SmoothDrift:
    """Smooth weights ``Abar(t) = M0 + M1 cos(pi t) + M2 sin(2 pi t)``, ``bbar(t) = v0 + v1 cos(pi t)``.

    The continuous functions of the scaling regimes (2.2)-(2.3); drawn once from a seed.
    """

    matrices: Tensor  # (3, d, d)
    vectors: Tensor  # (2, d)

    @classmethod
    def sample(cls, dim: int, scale: float = 1.0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> "SmoothDrift":
        """Entries ``N(0, scale^2 / d)`` for the matrices and ``N(0, scale^2)`` for the vectors."""
        dim = _checks.positive_int("dim", dim)
        scale = _checks.positive_float("scale", scale)
        mats = torch.randn(3, dim, dim, generator=generator, dtype=dtype) * scale / math.sqrt(dim)
        vecs = torch.randn(2, dim, generator=generator, dtype=dtype) * scale
        return cls(mats, vecs)

    @property
    def dim(self) -> int:
        """The state dimension ``d``."""
        return self.vectors.shape[-1]

    def __call__(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(Abar(t), bbar(t))``; for a vector of times, shapes ``(T, d, d)`` and ``(T, d)``."""
        t = torch.as_tensor(t, dtype=self.matrices.dtype)
        c, s = torch.cos(math.pi * t)[..., None, None], torch.sin(2 * math.pi * t)[..., None, None]
        A = self.matrices[0] + c * self.matrices[1] + s * self.matrices[2]
        b = self.vectors[0] + c[..., 0] * self.vectors[1]
        return A, b


@dataclass(frozen=True)
class Noise:
    """``W^A = s_A B^A`` (``d x d`` independent Brownian motions), ``W^b = s_b B^b`` (``d`` more): Remark 1's i.i.d. case.

    Channel ``i d + j`` drives ``A_ij``, channel ``d^2 + i`` drives ``b_i``.
    """

    dim: int
    s_A: float = 1.0
    s_b: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dim", _checks.positive_int("dim", self.dim))
        for name in ("s_A", "s_b"):
            object.__setattr__(self, name, _checks.nonnegative_float(name, getattr(self, name)))

    @property
    def channels(self) -> int:
        """The number of Brownian channels, ``d^2 + d`` (one per entry of ``A``, then one per entry of ``b``)."""
        return self.dim * self.dim + self.dim

    def split(self, dW: Tensor) -> tuple[Tensor, Tensor]:
        """``(dW^A, dW^b)`` from Brownian increments ``(..., channels)``: shapes ``(..., d, d)`` and ``(..., d)``."""
        d = self.dim
        return self.s_A * dW[..., : d * d].reshape(*dW.shape[:-1], d, d), self.s_b * dW[..., d * d:]

    def q(self, h: Tensor) -> Tensor:
        """The Itô correction ``q_i(h) = d[W^A h + W^b]^{ii}/dt = s_A^2 |h|^2 + s_b^2`` (same for every i)."""
        return (self.s_A**2 * (h * h).sum(-1, keepdim=True) + self.s_b**2).expand_as(h)

    def q_jacobian(self, h: Tensor) -> Tensor:
        """``dq/dh = 2 s_A^2 (1, ..., 1)^T h``: ``(..., d, d)``."""
        return 2 * self.s_A**2 * h[..., None, :].expand(*h.shape, self.dim)

    def explosion_scale(self, curvature: float) -> float:
        """``R* = 2 / (|sigma''(0)| s_A^2 sqrt(d))``: where the Itô drift ``sigma''(0)/2 q(H)`` of (4.19) alone blows up.

        Along the diagonal ``H = r (1, ..., 1) / sqrt(d)`` that drift is ``sigma''(0)/2 (s_A^2 r^2 + s_b^2) sqrt(d)`` in
        the direction of ``H``, so without the other terms ``r' >= r^2 / R*``, whose solution
        ``r_0 / (1 - r_0 t / R*)`` blows up at ``t = R* / r_0``: before ``t = 1`` from any ``r_0 > R*``. A path of the limit
        that reaches ``R*`` is in the region where (4.19) can explode, and the moment bound that Thm 3 assumes
        (uniform integrability) fails. ``inf`` when ``sigma''(0) s_A = 0`` (the drift is then at most linear).
        """
        rate = abs(float(curvature)) * self.s_A**2 * math.sqrt(self.dim) / 2
        return math.inf if rate == 0 else 1 / rate

    def diffusion(self, h: Tensor) -> Tensor:
        """``g(h)`` with ``g(h) dB = dW^A h + dW^b``: ``(..., d, channels)``."""
        d = self.dim
        eye = torch.eye(d, dtype=h.dtype)
        gA = self.s_A * eye[:, :, None] * h[..., None, None, :]  # (..., i, i', j) = s_A [i = i'] h_j
        gb = self.s_b * eye.expand(*h.shape[:-1], d, d)
        return torch.cat([gA.reshape(*h.shape[:-1], d, d * d), gb], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Weights of the two scaling regimes


def regime1_weights(drift: SmoothDrift, depth: int, alpha: float = 1.0, beta: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """Scaling regime 1 ((2.2), reconstructed): ``A_k = L^-beta Abar(k/L)``, ``b_k = L^-beta bbar(k/L)``, ``delta = L^-alpha``.

    Thm 1: ``beta = 0, alpha = 1`` -> neural ODE; ``alpha + beta = 1, beta > 0`` -> linear ODE.
    Returns ``(A (L, d, d), b (L, d), delta)``.
    """
    depth = _checks.positive_int("depth", depth)
    A, b = drift(torch.arange(depth, dtype=drift.matrices.dtype) / depth)
    return A * depth**-beta, b * depth**-beta, float(depth) ** -alpha


def regime2_weights(drift: SmoothDrift, noise: Noise, grid: BrownianGrid, depth: int, alpha: float = 0.0,
                    beta: float = 1.0, gamma: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """Scaling regime 2 ((2.3)/(4.5), reconstructed): ``A_k = L^-beta Abar(k/L) + L^gamma Delta W^A_k``, same for b.

    ``Delta W`` are the increments of ``grid`` over ``[k/L, (k+1)/L]`` (sums of fine increments).
    Thm 3 (SDE): ``alpha = gamma = 0, beta = 1``; Thm 2 (linear ODE): ``alpha + beta = 1, 2 gamma < alpha``.
    Returns ``(A (L, P, d, d), b (L, P, d), delta)`` for the ``P`` paths of ``grid``.
    """
    if grid.increments.shape[-1] != noise.channels:
        raise ValueError(f"grid has {grid.increments.shape[-1]} channels, noise needs {noise.channels}")
    dA, db = noise.split(grid.coarse(depth))
    A0, b0 = regime1_weights(drift, depth, alpha=0.0, beta=beta)[:2]
    return A0[:, None] + depth**gamma * dA, b0[:, None] + depth**gamma * db, float(depth) ** -alpha


# ----------------------------------------------------------------------------------------------------------
# The ResNet and its backpropagated Jacobians


def resnet(x: Tensor, A: Tensor, b: Tensor, delta: float, sigma) -> Tensor:
    """All states of ``h_{k+1} = h_k + delta sigma(A_k h_k + b_k)`` (eq. 1.1): ``(L + 1, *x.shape)``, by ``models.euler``.

    ``A`` is ``(L, ..., d, d)`` and ``b`` ``(L, ..., d)``; leading dimensions after depth (paths) broadcast with ``x``.
    """
    h = x.expand(*torch.broadcast_shapes(x.shape, b.shape[1:]))
    return euler(h, lambda h, Ak, bk: sigma((Ak @ h[..., None])[..., 0] + bk), (A, b), delta, trajectory=True)


def resnet_jacobians(states: Tensor, A: Tensor, b: Tensor, delta: float, sigma: CurvedTanh) -> Tensor:
    """``J_k = d h_L / d h_k``, ``k = 0..L``, by the backward recursion (5.3) ``J_k = J_{k+1} (I + delta diag(sigma'(z_k)) A_k)``.

    ``states`` from ``resnet``; returns ``(L + 1, ..., d, d)`` with ``J_L = I``.
    """
    L = A.shape[0]
    z = (A @ states[:-1, ..., None])[..., 0] + b
    steps = delta * sigma.derivative(z)[..., None] * A  # (L, ..., d, d)
    J = torch.eye(states.shape[-1], dtype=states.dtype).expand(*states.shape[1:], states.shape[-1])
    out = [J]
    for k in range(L - 1, -1, -1):
        J = J + J @ steps[k]
        out.append(J)
    return torch.stack(out[::-1])


# ----------------------------------------------------------------------------------------------------------
# Limits


class LimitSDE(torch.nn.Module):
    """Thm 3 (4.19), reconstructed: ``dH = (Abar H + bbar + c/2 q(H)) dt + dW^A H + dW^b`` (Itô, general noise).

    ``c = sigma''(0)``; ``c = 0`` drops the Itô correction (the limit for tanh).
    """

    noise_type = "general"
    sde_type = "ito"

    def __init__(self, drift: SmoothDrift, noise: Noise, curvature: float):
        super().__init__()
        self.drift, self.noise, self.curvature = drift, noise, float(curvature)

    def f(self, t, h):
        """The drift ``Abar(t) h + bbar(t) + c/2 q(h)`` of Cont et al. (4.19) at ``h`` ``(P, d)``: ``(P, d)``."""
        A, b = self.drift(t)
        return h @ A.T + b + 0.5 * self.curvature * self.noise.q(h)

    def g(self, t, h):
        """The diffusion ``g(h)``, ``g(h) dB = dW^A h + dW^b``, of Cont et al. (4.19) at ``h`` ``(P, d)``:
        ``(P, d, channels)``."""
        return self.noise.diffusion(h)


def solve_sde(drift: SmoothDrift, noise: Noise, curvature: float, x: Tensor, grid: BrownianGrid,
              out_steps: int) -> Tensor:
    """Thm 3's SDE solved by torchsde (Euler-Maruyama, step ``1/N``) on the fine path of ``grid``.

    Returns ``H`` at ``k / out_steps``, ``k = 0..out_steps``: ``(out_steps + 1, P, d)``.
    """
    out_steps = _checks.positive_int("out_steps", out_steps)
    if grid.steps % out_steps:
        raise ValueError(f"out_steps {out_steps} must divide the fine grid's {grid.steps} steps")
    P = grid.increments.shape[1]
    ts = torch.linspace(0, 1, out_steps + 1, dtype=grid.increments.dtype)
    with torch.no_grad():
        return torchsde.sdeint(LimitSDE(drift, noise, curvature), x.expand(P, noise.dim).contiguous(), ts,
                               bm=GridBrownian(grid), method="euler", dt=1.0 / grid.steps)


def euler_maruyama(drift: SmoothDrift, noise: Noise, curvature: float, x: Tensor, grid: BrownianGrid,
                   out_steps: int, jacobian: bool = False) -> tuple[Tensor, Tensor | None]:
    """Hand-written Euler-Maruyama of Thm 3's SDE on ``grid`` (a cross-check of ``solve_sde``), and optionally
    its first variation ``dJ = (Abar + c/2 dq/dH) J dt + dW^A J``, ``J_0 = I`` (``J_t = dH_t/dx``, Thm 5).

    Returns ``(H, J)`` at ``k / out_steps``: ``(out_steps + 1, P, d)`` and ``(out_steps + 1, P, d, d)`` or None.
    """
    N = grid.steps
    if N % _checks.positive_int("out_steps", out_steps):
        raise ValueError(f"out_steps {out_steps} must divide the fine grid's {N} steps")
    every = N // out_steps
    P, d = grid.increments.shape[1], noise.dim
    As, bs = drift(torch.arange(N, dtype=grid.increments.dtype) / N)
    dA, db = noise.split(grid.increments)
    h = x.expand(P, d).clone()
    J = torch.eye(d, dtype=h.dtype).expand(P, d, d).clone() if jacobian else None
    Hs, Js = [h], [J]
    c, dt = 0.5 * float(curvature), 1.0 / N
    for k in range(N):
        if jacobian:
            lin = As[k] + c * noise.q_jacobian(h)
            J = J + dt * lin @ J + dA[k] @ J
        h = h + dt * (h @ As[k].T + bs[k] + c * noise.q(h)) + (dA[k] @ h[..., None])[..., 0] + db[k]
        if (k + 1) % every == 0:
            Hs.append(h)
            Js.append(J)
    return torch.stack(Hs), (torch.stack(Js) if jacobian else None)


def _augmented(drift: SmoothDrift, sigma: CurvedTanh | None):
    """Field of ``(H, J)`` with ``dH = F(t, H)``, ``dJ = dF/dH J``: neural ODE (``sigma``) or linear ODE (None)."""
    d = drift.dim

    def field(t, y):
        h, J = y[..., :d], y[..., d:].reshape(*y.shape[:-1], d, d)
        A, b = drift(t)
        if sigma is None:
            return torch.cat([h @ A.T + b, (A @ J).flatten(-2)], -1)
        z = h @ A.T + b
        return torch.cat([sigma(z), ((sigma.derivative(z)[..., None] * A) @ J).flatten(-2)], -1)

    return field


def solve_ode(drift: SmoothDrift, x: Tensor, intervals: int, sigma: CurvedTanh | None = None,
              substeps: int = 4) -> tuple[Tensor, Tensor]:
    """The ODE limits of Thm 1 (and Thm 2's (4.18)) with their first variation, by RK4 (``resnode.ode.solve``).

    ``sigma`` given: the neural ODE ``dH = sigma(Abar H + bbar) dt`` (4.3); None: the linear ODE
    ``dH = (Abar H + bbar) dt`` (4.4)/(4.18). Returns ``H (intervals + 1, ..., d)`` and
    ``J_t = dH_t/dx`` ``(intervals + 1, ..., d, d)`` at ``k / intervals``.
    """
    d = drift.dim
    eye = torch.eye(d, dtype=x.dtype).expand(*x.shape[:-1], d, d)
    y0 = torch.cat([x, eye.flatten(-2)], -1)
    _, ys = ode.solve(_augmented(drift, sigma), y0, intervals, substeps=substeps)
    ys = ys[::substeps]
    return ys[..., :d], ys[..., d:].reshape(*ys.shape[:-1], d, d)


def backprop_limit(J: Tensor) -> Tensor:
    """Limit of ``d h_L / d h_{tL}`` from the first variation ``J_t = dH_t/dx``: ``J_1 J_t^{-1}`` (Thms 4-5).

    In regime 1 this solves the backward ODE ``dJ/dt = -J dF/dH`` with ``J_1 = I`` ((5.5)-(5.6)); in regime 2 it is
    the decomposition (5.12) of the gradient into the input Jacobian times the inverse forward Jacobian.
    """
    return J[-1] @ torch.linalg.inv(J)


# ----------------------------------------------------------------------------------------------------------
# Errors


def on_grid(states: Tensor, depth: int) -> Tensor:
    """The rows ``k / depth`` of states given at ``j / M`` (``M + 1`` rows, ``depth`` dividing ``M``)."""
    M = states.shape[0] - 1
    if M % _checks.positive_int("depth", depth):
        raise ValueError(f"depth {depth} must divide the {M} intervals of the states")
    return states[:: M // depth]


def strong_error(approx: Tensor, limit: Tensor, p: float = 2.0, matrix: bool = False) -> float:
    """Uniform error in ``L^p`` (Definition 1): ``(E sup_k |approx_k - limit_k|^p)^{1/p}``.

    First dimension time, then paths, then the state (``d``, or ``d x d`` with ``matrix=True``: Frobenius norm).
    """
    if approx.shape != limit.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(limit.shape)}")
    p = _checks.positive_float("p", p)
    diff = approx - limit
    norms = diff.flatten(-2).norm(dim=-1) if matrix else diff.norm(dim=-1)
    sup = norms.amax(0)
    return float(sup.pow(p).mean() ** (1 / p))


__all__ = ["CurvedTanh", "BrownianGrid", "GridBrownian", "SmoothDrift", "Noise", "regime1_weights",
           "regime2_weights", "resnet", "resnet_jacobians", "LimitSDE", "solve_sde", "euler_maruyama", "solve_ode",
           "backprop_limit", "on_grid", "strong_error"]
