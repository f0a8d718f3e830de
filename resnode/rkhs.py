"""RKHS neural ODEs with random Fourier features of a Matérn (Sobolev) kernel.

Barboni, Peyré & Vialard (slides "On the training of infinitely deep and wide ResNets"; NeurIPS 2022
paper "On global convergence of ResNets: from finite to infinite width using linear parameterization").

* The kernel: spectrum ``k^(w) ∝ (1 + |w|^2/nu)^{-(d/2 + nu)}`` (slide "Regularity condition"). This is
  a multivariate Student t with ``2 nu`` degrees of freedom and scale ``s^2 = 1/2``; its characteristic
  function is the Matérn kernel ``k(r) = 2^{1-nu}/Gamma(nu) (sqrt(nu) r)^nu K_nu(sqrt(nu) r)``.
* Random Fourier features ``phi(x) = p^{-1/2} [cos(W x), sin(W x)]`` give ``k_p(x, x') = mean_j cos(w_j.(x - x'))``.
* Condition 1 (regularity): ``|v|_inf + |Dv|_inf + |D^2 v|_inf <= kappa |v|_V``.
* Condition 2 (quantitative universality): ``lambda(delta)``, the least eigenvalue of kernel matrices of
  ``delta``-separated sets.
* The RKHS neural ODE ``x_{t+1} = x_t + (1/T) Theta_t phi(x_t)``, ``x_0 = A x``, output ``B x_T``, trained by
  gradient descent in ``H = L^2([0, 1], V)``, and the local Polyak-Łojasiewicz bounds of the slide's theorem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .train import check_divergence


def _nu(nu, above: float = 0.0) -> float:
    nu = _checks.positive_float("nu", nu)
    if nu <= above:
        raise ValueError(f"nu must be > {above:g} here (the bound needs finite moments); got {nu!r}")
    return nu


# --------------------------------------------------------------------------- the kernel and its spectrum

def sample_spectrum(p: int, d: int, nu: float, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """``p`` frequencies with density ``∝ (1 + |w|^2/nu)^{-(d/2+nu)}`` (slide "Regularity condition").

    Student t, ``2 nu`` degrees of freedom, scale ``s^2 = 1/2``: ``w = g sqrt(nu / (2 G))`` with
    ``g ~ N(0, I_d)`` and ``G ~ Gamma(nu, 1)``. Returns ``(p, d)``.
    """
    p, d, nu = _checks.positive_int("p", p), _checks.positive_int("d", d), _nu(nu)
    g = torch.randn(p, d, generator=generator, dtype=dtype)
    # Gamma(nu, 1) from the generator: torch's Gamma sampler ignores generators, so use the
    # Marsaglia-Tsang method on generator draws (exact, a few rejection rounds).
    gam = _gamma(p, nu, generator, dtype)
    return g * torch.sqrt(nu / (2 * gam))[:, None]


def _gamma(n: int, shape: float, generator, dtype) -> Tensor:
    """``n`` draws of Gamma(shape, 1) by Marsaglia & Tsang (2000), using ``generator``."""
    boost = shape < 1
    a = shape + 1 if boost else shape
    dd = a - 1 / 3
    c = 1 / math.sqrt(9 * dd)
    out = torch.empty(n, dtype=dtype)
    todo = torch.arange(n)
    while len(todo):
        m = len(todo)
        z = torch.randn(m, generator=generator, dtype=dtype)
        u = torch.rand(m, generator=generator, dtype=dtype)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z**2 + dd - dd * v + dd * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = (dd * v)[ok]
        todo = todo[~ok]
    if boost:
        out = out * torch.rand(n, generator=generator, dtype=dtype) ** (1 / shape)
    return out


def matern(r, nu: float) -> np.ndarray:
    """The Matérn kernel ``k(r) = 2^{1-nu}/Gamma(nu) (sqrt(nu) r)^nu K_nu(sqrt(nu) r)``, ``k(0) = 1``.

    It is the Fourier transform (characteristic function) of :func:`sample_spectrum`'s density.
    """
    from scipy.special import gamma, kv

    nu = _nu(nu)
    r = np.asarray(r, dtype=float)
    if np.isnan(r).any() or (r < 0).any():
        raise ValueError("r must be >= 0 (a distance; NaN is not one)")
    z = np.sqrt(nu) * r
    with np.errstate(invalid="ignore", over="ignore"):
        k = 2 ** (1 - nu) / gamma(nu) * z**nu * kv(nu, z)
    # at z = 0 the product is 0 * inf (the limit is 1); at z = inf it is inf * 0 (the limit is 0)
    return np.where(z < 1e-12, 1.0, np.where(np.isinf(z), 0.0, k))


def matern_matrix(x: Tensor, y: Tensor | None, nu: float) -> Tensor:
    """The matrix ``(k(|x_i - y_j|))_{ij}`` of :func:`matern` (``y = None``: ``K_X``)."""
    y = x if y is None else y
    dist = torch.cdist(x.double(), y.double())
    return torch.as_tensor(matern(dist.numpy(), nu))


def spectral_moments(nu: float, scale2: float = 0.5) -> tuple[float, float]:
    """``(E w_1^2, E w_1^4)`` of the Student t with ``2 nu`` degrees of freedom and scale ``scale2``.

    ``E w_1^2 = s^2 nu / (nu - 1)``, ``E w_1^4 = 3 s^4 nu^2 / ((nu - 1)(nu - 2))``; ``nu > 2``. The
    slide's spectrum has ``s^2 = 1/2``.
    """
    nu, s2 = _nu(nu, 2.0), _checks.positive_float("scale2", scale2)
    return s2 * nu / (nu - 1), 3 * s2**2 * nu**2 / ((nu - 1) * (nu - 2))


def kappa_moment_bound(nu: float, scale2: float = 0.5) -> float:
    """``1 + sqrt(E w_1^2) + sqrt(E w_1^4)``: Cauchy-Schwarz bound on kappa for the infinite-width kernel."""
    m2, m4 = spectral_moments(nu, scale2)
    return 1 + math.sqrt(m2) + math.sqrt(m4)


def kappa_slide_bound(nu: float) -> float:
    """The slide's ``kappa <= 1 + sqrt(nu/(nu-1)) + sqrt(3 nu^2/((nu-1)(nu-2)))`` (``nu > 2``).

    Equal to :func:`kappa_moment_bound` with scale ``s^2 = 1``, i.e. the spectrum ``(1 + |w|^2/(2 nu))^{...}``.
    """
    return kappa_moment_bound(nu, scale2=1.0)


# --------------------------------------------------------------------------- random Fourier features

@dataclass
class FourierFeatures:
    """Random Fourier features ``phi(x) = p^{-1/2} [cos(W x), sin(W x)]`` in ``R^{2p}`` (slide "RKHS neural ODE").

    ``omega`` is ``(p, d)``; ``k_p(x, x') = phi(x).phi(x') = mean_j cos(w_j.(x - x'))``, so ``k_p(x, x) = 1``.
    """

    omega: Tensor

    def __post_init__(self):
        if self.omega.ndim != 2:
            raise ValueError(f"omega must be (p, d); got shape {tuple(self.omega.shape)}")

    @classmethod
    def matern(cls, p: int, d: int, nu: float, seed: int = 0, dtype: torch.dtype = torch.float64):
        """``p`` frequencies of the Matérn spectrum (see :func:`sample_spectrum`)."""
        return cls(sample_spectrum(p, d, nu, torch.Generator().manual_seed(seed), dtype))

    @property
    def p(self) -> int:
        """The number of frequencies ``p`` (rows of ``omega``)."""
        return self.omega.shape[0]

    @property
    def dim(self) -> int:
        """The input dimension ``d`` (columns of ``omega``)."""
        return self.omega.shape[1]

    @property
    def width(self) -> int:
        """The feature dimension ``2p`` (a cosine and a sine per frequency)."""
        return 2 * self.p

    def _x(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}); got shape {tuple(x.shape)}")
        return x.to(self.omega.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        z = self._x(x) @ self.omega.T
        return torch.cat([torch.cos(z), torch.sin(z)], dim=1) / math.sqrt(self.p)

    def kernel(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``(k_p(x_i, y_j))_{ij}``."""
        return self(x) @ self(x if y is None else y).T

    def regularity(self, restarts: int = 32, iterations: int = 200, seed: int = 0) -> tuple[float, float, float]:
        """The three sups of condition 1 for the feature space, per unit of ``|Theta|``:

        ``sup_x |phi(x)| = 1``, ``sup_x |D phi(x)|_op = sqrt(lambda_max(mean_j w_j w_j^T))`` (exact), and
        ``sup_x |D^2 phi(x)|_op = sqrt(max_{|h|=1} mean_j (w_j.h)^4)``, maximised over unit ``h`` by the
        ascent ``h <- grad / |grad|`` from ``restarts`` starts (the largest frequencies, then random):
        a lower estimate of that sup, usually the sup itself.
        """
        return 1.0, self.lipschitz(), math.sqrt(max_fourth_moment(self.omega, restarts, iterations, seed))

    def lipschitz(self) -> float:
        """``sup_x |D phi(x)|_op = sqrt(lambda_max(mean_j w_j w_j^T))`` (exact: ``|D phi(x) h|`` does not depend on ``x``).

        For the infinite-width kernel it is ``sqrt(E w_1^2)`` (:func:`spectral_moments`, isotropic spectrum)."""
        w = self.omega
        return math.sqrt(torch.linalg.eigvalsh(w.T @ w / self.p)[-1].item())

    def kappa(self, **kwargs) -> float:
        """``1 + sup|D phi| + sup|D^2 phi|``: the regularity constant kappa of these features."""
        return sum(self.regularity(**kwargs))


def max_fourth_moment(omega: Tensor, restarts: int = 32, iterations: int = 200, seed: int = 0) -> float:
    """``max_{|h|=1} mean_j (w_j.h)^4`` by the monotone ascent ``h <- grad/|grad|`` (the function is convex)."""
    restarts, iterations = _checks.positive_int("restarts", restarts), _checks.positive_int("iterations", iterations)
    p, d = omega.shape
    big = omega[torch.argsort(omega.norm(dim=1), descending=True)[: max(1, restarts // 2)]]
    gen = torch.Generator().manual_seed(seed)
    h = torch.cat([big, torch.randn(restarts - len(big), d, generator=gen, dtype=omega.dtype)], dim=0)
    h = h / h.norm(dim=1, keepdim=True)
    for _ in range(iterations):
        s = h @ omega.T  # (restarts, p)
        g = (s**3) @ omega
        h = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return ((h @ omega.T) ** 4).mean(dim=1).max().item()


# --------------------------------------------------------------------------- lambda(delta)

def separation(x: Tensor) -> float:
    """``min_{i != j} |x_i - x_j|``."""
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"x must be (n >= 2, d); got shape {tuple(x.shape)}")
    dist = torch.cdist(x.double(), x.double())
    dist.fill_diagonal_(float("inf"))
    return dist.min().item()


def min_eigenvalue(k: Tensor) -> float:
    """``lambda_min`` of a symmetric kernel matrix."""
    return torch.linalg.eigvalsh(k.double())[0].item()


def line_points(n: int, delta: float, d: int = 1) -> Tensor:
    """``n`` points a distance ``delta`` apart on the first axis of ``R^d``."""
    n, delta, d = _checks.positive_int("n", n), _checks.positive_float("delta", delta), _checks.positive_int("d", d)
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, 0] = delta * torch.arange(n, dtype=torch.float64)
    return x


def grid_points(side: int, delta: float, d: int) -> Tensor:
    """The ``side^d`` points of a cubic grid of spacing ``delta`` in ``R^d``."""
    side, delta, d = _checks.positive_int("side", side), _checks.positive_float("delta", delta), _checks.positive_int("d", d)
    axes = [torch.arange(side, dtype=torch.float64) * delta] * d
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)


def random_separated(n: int, delta: float, d: int, seed: int = 0, box: float | None = None) -> Tensor:
    """``n`` points, pairwise at least ``delta`` apart, drawn uniformly in ``[0, box]^d`` by rejection.

    ``box`` defaults to the side of a cube holding ``n`` balls of radius ``delta/2`` loosely (a packing
    density of about 1/4), so the set is close to its separation in many places.
    """
    n, delta, d = _checks.positive_int("n", n), _checks.positive_float("delta", delta), _checks.positive_int("d", d)
    if box is None:
        box = delta * (4 * n) ** (1 / d)
    gen = torch.Generator().manual_seed(seed)
    points: list[Tensor] = []
    for _ in range(1000 * n):
        cand = torch.rand(d, generator=gen, dtype=torch.float64) * box
        if not points or torch.cdist(cand[None], torch.stack(points)).min() >= delta:
            points.append(cand)
            if len(points) == n:
                return torch.stack(points)
    raise ValueError(f"could not place n={n} points {delta}-apart in a box of side {box}; enlarge box")


# --------------------------------------------------------------------------- the RKHS neural ODE

def lifting(d: int, copies: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``A = (Id, ..., Id)^T / sqrt(copies)`` (``sigma_min(A) = sigma_max(A) = 1``) and ``B = (Id, 0, ..., 0)``.

    Slide "Enforcing convergence via lifting": ``A`` is ``(copies d, d)``, ``B`` is ``(d, copies d)``.
    """
    d, copies = _checks.positive_int("d", d), _checks.positive_int("copies", copies)
    eye = torch.eye(d, dtype=dtype)
    a = torch.cat([eye] * copies, dim=0) / math.sqrt(copies)
    b = torch.cat([eye] + [torch.zeros(d, d, dtype=dtype)] * (copies - 1), dim=1)
    return a, b


def _check_theta(theta: Tensor, features: FourierFeatures) -> None:
    if theta.ndim != 3 or theta.shape[2] != features.width or theta.shape[1] != features.dim:
        raise ValueError(f"theta must be (T, {features.dim}, {features.width}) for these features; "
                         f"got shape {tuple(theta.shape)}")


def _forward(theta: Tensor, features: FourierFeatures, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """States ``(T+1, n, D)`` of the Euler flow, and the ``cos``, ``sin`` of each step's phases ``(T, n, p)``."""
    _check_theta(theta, features)
    steps, p = theta.shape[0], features.p
    scale = 1 / (math.sqrt(p) * steps)
    xs, cos, sin = [x0.to(theta.dtype)], [], []
    for t in range(steps):
        z = xs[-1] @ features.omega.T
        cos.append(torch.cos(z))
        sin.append(torch.sin(z))
        xs.append(xs[-1] + (cos[-1] @ theta[t, :, :p].T + sin[-1] @ theta[t, :, p:].T) * scale)
    return torch.stack(xs), torch.stack(cos), torch.stack(sin)


def flow(theta: Tensor, features: FourierFeatures, x0: Tensor) -> Tensor:
    """States ``x_0``, ..., ``x_T`` of ``x_{t+1} = x_t + (1/T) Theta_t phi(x_t)`` (slide "RKHS neural ODE"): ``(T+1, n, D)``."""
    return _forward(theta, features, x0)[0]


def h_norm(theta: Tensor) -> float:
    """``|v|_H = (mean_t |Theta_t|_F^2)^{1/2}``, the Euler version of ``(int_0^1 |v_t|_V^2 dt)^{1/2}`` (an upper bound of it)."""
    return theta.pow(2).sum(dim=(1, 2)).mean().sqrt().item()


@dataclass
class Evaluation:
    """Loss, Euclidean gradient ``dF/dTheta``, states ``(T+1, n, D)`` and adjoints ``p^t`` ``(T+1, n, D)``."""

    loss: float
    grad: Tensor
    states: Tensor
    adjoints: Tensor
    residuals: Tensor

    @property
    def h_grad_norm2(self) -> float:
        """``|grad_H F|_H^2 = T sum_t |dF/dTheta_t|_F^2`` (the H-gradient is ``T dF/dTheta_t``)."""
        return self.grad.shape[0] * self.grad.pow(2).sum().item()


def evaluate(theta: Tensor, features: FourierFeatures, x0: Tensor, b: Tensor, y: Tensor) -> Evaluation:
    """``F = (1/N) sum_i |B x_T^i - y_i|^2`` and its gradient by the adjoint (back-propagation) equations.

    ``p_i^T = B^T r_i`` with ``r_i = B x_T^i - y_i``; ``p^t = p^{t+1} + (1/T) Dv_t(x^t)^T p^{t+1}``;
    ``dF/dTheta_t = (2/(N T)) sum_i p_i^{t+1} phi(x_i^t)^T``.
    """
    if b.ndim != 2 or b.shape[1] != features.dim or y.shape != (len(x0), b.shape[0]):
        raise ValueError(f"b must be (d_out, {features.dim}) and y (n, d_out); got {tuple(b.shape)}, {tuple(y.shape)}")
    steps, n, p, scale = theta.shape[0], len(x0), features.p, 1 / math.sqrt(features.p)
    w = features.omega
    xs, c, s = _forward(theta, features, x0)
    r = xs[-1] @ b.T - y
    loss = r.pow(2).sum().item() / n
    ps = [None] * (steps + 1)
    ps[steps] = r @ b
    for t in range(steps - 1, -1, -1):
        q = ps[t + 1] @ theta[t]  # (n, 2p): Theta_t^T p
        ps[t] = ps[t + 1] + ((-s[t] * q[:, :p] + c[t] * q[:, p:]) @ w) * (scale / steps)
    adjoints = torch.stack(ps)
    grad = (2 * scale / (n * steps)) * torch.cat([adjoints[1:].mT @ c, adjoints[1:].mT @ s], dim=2)
    return Evaluation(loss, grad, xs, adjoints, r)


@dataclass
class PLCheck:
    """The quantities of the local PL theorem at one point ``v`` (our normalisation; see :func:`pl_check`)."""

    loss: float
    ratio: float  # |grad_H F|^2 / F
    lower: float  # (4/(N T)) s_min(B)^2 sum_t lambda_min(K_t) c_{t+1}^2
    upper: float  # (4/T) s_max(B)^2 sum_t C_{t+1}^2
    lower_slide: float  # (4/N) s_min(B)^2 lambda_hat e^{-2 kappa R}
    upper_slide: float  # 4 s_max(B)^2 e^{2 kappa R}
    radius: float  # R = |v|_H (Frobenius norms of Theta)
    min_lambda: float  # min_t lambda_min(K_{X_t})
    min_separation: float  # min_t sep(X_t)
    separation_bound: float  # s_min(A) delta prod (1 - lip |Theta_s| / T)
    contraction: float  # min_t c_t (discrete adjoint contraction)
    expansion: float  # max_t C_t


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else float("inf")


def pl_check(theta: Tensor, features: FourierFeatures, x0: Tensor, b: Tensor, y: Tensor, lip: float, kappa: float,
             lam_hat=None, sigma_min_a: float = 1.0) -> PLCheck:
    """Measure ``|grad_H F|_H^2 / F`` and the bounds of the slide's theorem at ``Theta``.

    With ``p`` the adjoint, ``|grad_H F|^2 = (4/(N^2 T)) sum_t sum_ij k(x_i^t, x_j^t) p_i^{t+1}.p_j^{t+1}``;
    ``lambda_min(K) <= lambda_max(K) <= N`` (``k <= 1``) and the adjoint is contracted/expanded at most by
    ``c_t = prod_{s >= t} (1 - lip |Theta_s|_F / T)``, ``C_t = prod_{s >= t} (1 + lip |Theta_s|_F / T)``
    (Euler; ``lip`` bounds ``sup|D phi|``). The slide's forms use ``e^{-+ kappa R}`` and ``lambda_hat(delta)``
    (a callable, an estimate of ``lambda``) at ``s_min(A) delta e^{-kappa R}``, with ``delta = sep(A x)``.
    """
    ev = evaluate(theta, features, x0, b, y)
    steps, n = theta.shape[0], len(x0)
    sv = torch.linalg.svdvals(b)
    smin, smax = sv[-1].item(), sv[0].item()
    norms = theta.pow(2).sum(dim=(1, 2)).sqrt()
    shrink = (1 - lip * norms / steps).clamp_min(0)
    grow = 1 + lip * norms / steps
    c = torch.ones(steps + 1, dtype=theta.dtype)
    big = torch.ones(steps + 1, dtype=theta.dtype)
    for t in range(steps - 1, -1, -1):
        c[t], big[t] = c[t + 1] * shrink[t], big[t + 1] * grow[t]
    lams = torch.tensor([min_eigenvalue(features.kernel(ev.states[t])) for t in range(steps)])
    seps = [separation(ev.states[t]) for t in range(steps + 1)]
    delta = seps[0] / sigma_min_a
    sep_bound = sigma_min_a * delta * torch.cat([torch.ones(1, dtype=theta.dtype), torch.cumprod(shrink, 0)]).min().item()
    lower = 4 / (n * steps) * smin**2 * (lams.clamp_min(0) * c[1:] ** 2).sum().item()
    upper = 4 / steps * smax**2 * (big[1:] ** 2).sum().item()
    radius = h_norm(theta)
    lam_slide = lam_hat(sigma_min_a * delta * _exp(-kappa * radius)) if lam_hat is not None else float("nan")
    return PLCheck(loss=ev.loss, ratio=ev.h_grad_norm2 / ev.loss, lower=lower, upper=upper,
                   lower_slide=4 / n * smin**2 * lam_slide * _exp(-2 * kappa * radius),
                   upper_slide=4 * smax**2 * _exp(2 * kappa * radius), radius=radius,
                   min_lambda=lams.min().item(), min_separation=min(seps), separation_bound=sep_bound,
                   contraction=c.min().item(), expansion=big.max().item())


def gradient_descent(features: FourierFeatures, x0: Tensor, b: Tensor, y: Tensor, steps: int, iterations: int,
                     lr: float, record_every: int = 10, on_record=None) -> tuple[Tensor, dict]:
    """Gradient descent in ``H`` from ``v = 0``: ``Theta_t <- Theta_t - lr T dF/dTheta_t`` (slide "RKHS neural ODE").

    Returns the final ``Theta`` and a history of losses, ``|grad_H F|^2`` and ``|v|_H`` at every
    iteration; ``on_record(k, theta)`` is called every ``record_every`` iterations (and at the end).
    """
    steps, iterations = _checks.positive_int("steps", steps), _checks.positive_int("iterations", iterations)
    lr, record_every = _checks.positive_float("lr", lr), _checks.positive_int("record_every", record_every)
    theta = torch.zeros(steps, features.dim, features.width, dtype=features.omega.dtype)
    hist = {"loss": [], "grad2": [], "radius": []}
    for k in range(iterations + 1):
        if on_record is not None and (k % record_every == 0 or k == iterations):
            on_record(k, theta)
        ev = evaluate(theta, features, x0, b, y)
        check_divergence(ev.loss, hist["loss"][0] if hist["loss"] else ev.loss, k, f"the learning rate lr={lr}")
        hist["loss"].append(ev.loss)
        hist["grad2"].append(ev.h_grad_norm2)
        hist["radius"].append(h_norm(theta))
        if k < iterations:
            theta = theta - lr * steps * ev.grad
    return theta, {key: np.array(v) for key, v in hist.items()}


def project(train: Tensor, other: Tensor | None = None, dim: int = 10, radius: float = 1.0):
    """Principal components of flattened ``train`` (``dim`` of them), scaled so training points have mean norm ``radius``.

    Returns the projected ``train`` and ``other`` (the same map: centred and projected with the training statistics).
    """
    dim, radius = _checks.positive_int("dim", dim), _checks.positive_float("radius", radius)
    flat = train.reshape(len(train), -1).double()
    if dim > min(flat.shape):
        raise ValueError(f"dim must be at most {min(flat.shape)} here; got {dim}")
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False)[2][:dim].T
    z = (flat - mean) @ basis
    factor = radius / z.norm(dim=1).mean()
    if other is None:
        return z * factor, None
    return z * factor, ((other.reshape(len(other), -1).double() - mean) @ basis) * factor


# --------------------------------------------------------------------------- the Corollary: localisation of the PL bounds

def ball_pl_bounds(radius, *, lam0: float, n: int, lip: float, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Certified PL constants on the ball ``{|v|_H <= R}`` around ``v = 0`` of the Euler model (our normalisation).

    For ``|v|_H <= R`` every point moves by at most ``(1/T) sum_t |Theta_t|_F <= R`` (``|phi| = 1``), so the feature
    matrix ``Phi_t`` (``N x 2p``) moves by at most ``sqrt(N) lip R`` in Frobenius norm and, by Weyl's inequality for
    singular values, ``lambda_min(K_{X_t}) >= (sqrt(lambda_min(K_{X_0})) - sqrt(N) lip R)_+^2``; the adjoint contracts by
    at least ``prod_s (1 - lip |Theta_s|_F / T) >= 1 - lip R`` and expands by at most ``e^{lip R}``. With the bounds of
    :func:`pl_check`::

        m(R) = (4/N) s_min(B)^2 (sqrt(lam0) - sqrt(N) lip R)_+^2 (1 - lip R)_+^2,     M(R) = 4 s_max(B)^2 e^{2 lip R},

    ``lam0 = lambda_min(K_{X_0})`` of the model's own features at the lifted inputs ``X_0 = A x``. Returns
    ``(m, M)`` as arrays over ``radius``.
    """
    radius = np.asarray(radius, dtype=float)
    if (radius < 0).any():
        raise ValueError("radius must be >= 0")
    n, lip = _checks.positive_int("n", n), _checks.positive_float("lip", lip)
    lam0 = _checks.nonnegative_float("lam0", lam0)
    sv = torch.linalg.svdvals(b.double())
    smin, smax = sv[-1].item(), sv[0].item()
    root = np.clip(math.sqrt(lam0) - math.sqrt(n) * lip * radius, 0, None)
    m = 4 / n * smin**2 * root**2 * np.clip(1 - lip * radius, 0, None) ** 2
    return m, 4 * smax**2 * np.exp(2 * lip * radius)


def slide_pl_bounds(radius, *, n: int, kappa: float, delta: float, lam_hat, b: Tensor,
                    sigma_min_a: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The slide's forms in our normalisation: ``m(R) = (4/N) s_min(B)^2 lambda(s_min(A) delta e^{-kappa R}) e^{-2 kappa R}``
    and ``M(R) = 4 s_max(B)^2 e^{2 kappa R}``, with ``lam_hat`` (a callable) standing for ``lambda(.)``. When
    ``lam_hat`` is an upper estimate of ``lambda`` (any configuration gives one), so is ``m``."""
    radius = np.asarray(radius, dtype=float)
    n, kappa = _checks.positive_int("n", n), _checks.positive_float("kappa", kappa)
    delta = _checks.positive_float("delta", delta)
    sv = torch.linalg.svdvals(b.double())
    smin, smax = sv[-1].item(), sv[0].item()
    shrink = np.exp(-kappa * radius)
    lam = np.array([lam_hat(sigma_min_a * delta * s) for s in shrink.ravel()]).reshape(radius.shape)
    return 4 / n * smin**2 * lam * shrink**2, 4 * smax**2 / shrink**2


def localisation_cap(radius, m, M) -> tuple[float, float]:
    """The largest initial loss that the slide's Corollary (Liu, Zhu & Belkin's condition)
    ``F(v0) <= m(R)^2 R^2 / M(R)`` admits over the radii given, and the radius that attains it: ``(cap, R)``."""
    radius, m, M = (np.asarray(a, dtype=float) for a in (radius, m, M))
    if not radius.shape == m.shape == M.shape or radius.ndim != 1 or len(radius) == 0:
        raise ValueError("radius, m and M must be 1-d arrays of the same length")
    caps = m**2 * radius**2 / M
    best = int(np.argmax(caps))
    return float(caps[best]), float(radius[best])


# --------------------------------------------------------------------------- the feature count of the lifting proposition

def kernel_ball_cap(x0: Tensor, *, nu: float, b: Tensor, radii) -> tuple[float, float, float]:
    """The Corollary's largest admissible initial loss for the infinite-width Matérn kernel (``p = inf``), with the
    bounds of :func:`ball_pl_bounds` certified on the ball around ``v = 0``: ``lam0 = lambda_min(K_{X_0})`` of the
    closed-form kernel (:func:`matern_matrix`) and ``lip = sqrt(E w_1^2)`` (:func:`spectral_moments`), the exact
    ``sup |D phi|`` of the kernel's feature map. Returns ``(cap, R, lam0)``: :func:`localisation_cap` over ``radii``."""
    lam0 = max(min_eigenvalue(matern_matrix(x0, None, nu)), 0.0)
    m, big = ball_pl_bounds(radii, lam0=lam0, n=len(x0), lip=math.sqrt(spectral_moments(nu)[0]), b=b)
    cap, radius = localisation_cap(radii, m, big)
    return cap, radius, lam0


def features_cap(features: FourierFeatures, x0: Tensor, *, radius: float, b: Tensor, lip: float | None = None) -> float:
    """``m(R)^2 R^2 / M(R)`` at one radius for the model with these random features (:func:`ball_pl_bounds` with the
    features' own ``lambda_min(K_{X_0})`` and, unless ``lip`` is given, their own :meth:`FourierFeatures.lipschitz`):
    the model meets the Corollary's condition at ``R`` exactly when its initial loss is at most this."""
    lam0 = max(min_eigenvalue(features.kernel(x0)), 0.0)
    lip = features.lipschitz() if lip is None else lip
    m, big = ball_pl_bounds(radius, lam0=lam0, n=len(x0), lip=lip, b=b)
    return float(m**2 * radius**2 / big)


@dataclass
class FeatureCount:
    """How many random features carry the kernel's Corollary condition over to the finite model (:func:`feature_count`).

    ``fraction`` and ``p_star`` are for the condition with the features' own constants; ``fraction_lambda`` and
    ``p_star_lambda`` for the condition with the features' ``lambda_min`` but the kernel's Lipschitz constant, which
    isolates the part that depends on the kernel matrix of the ``N`` points."""

    n: int
    ps: list  # the feature counts tried, increasing
    fraction: list  # at each p, the fraction of draws whose model meets the condition
    fraction_lambda: list  # the same with the kernel's Lipschitz constant
    p_star: float  # the first p at which every draw meets it, here and at the next p tried (inf: never)
    p_star_lambda: float
    cap: float  # the kernel's largest admissible F(v0)
    radius: float  # the radius R that attains it
    lam0: float  # lambda_min of the closed-form kernel at the inputs


def _first_of_two(fractions: list) -> float:
    """The first p index from which every draw passes at two consecutive counts (or at the last count tried)."""
    for i, fr in enumerate(fractions):
        if fr == 1 and (i + 1 == len(fractions) or fractions[i + 1] == 1):
            return i
    return -1


def feature_count(x0: Tensor, *, nu: float, b: Tensor, ps, draws: int, seed: int = 0, margin: float = 2.0,
                  radii=None) -> FeatureCount:
    """The slides' proposition (lifting, Matérn features, ``p = O(N^4 + ...)``) at one data set: given ``v0 = 0`` and
    the radius ``R`` at which the closed-form kernel admits the largest initial loss (:func:`kernel_ball_cap`), and an
    initial loss ``F(v0) = cap / margin`` that the kernel admits, find how many features ``p`` the model needs to
    admit it too, ``F(v0) <= m_p(R)^2 R^2 / M_p(R)`` (:func:`features_cap`), for every one of ``draws`` independent
    draws of the frequencies (draw ``j`` at count ``p`` uses the same frequencies whatever ``x0``, so data sets are
    compared on the same draws). ``ps`` are tried in increasing order, until both criteria (see
    :class:`FeatureCount`) have held for every draw at two consecutive counts; ``p_star`` is the first of the two."""
    draws = _checks.positive_int("draws", draws)
    margin = _checks.positive_float("margin", margin)
    ps = sorted(int(p) for p in ps)
    if not ps or ps[0] < 1:
        raise ValueError(f"ps must be positive feature counts; got {ps!r}")
    radii = np.geomspace(1e-5, 3.0, 120) if radii is None else np.asarray(radii, dtype=float)
    cap, radius, lam0 = kernel_ball_cap(x0, nu=nu, b=b, radii=radii)
    f0, lip_kernel = cap / margin, math.sqrt(spectral_moments(nu)[0])
    tried, full, lam_only = [], [], []
    for p in ps:
        own, fixed = [], []
        for j in range(draws):
            features = FourierFeatures.matern(p, x0.shape[1], nu, seed=seed * 100_003 + 7919 * j + p)
            lam = max(min_eigenvalue(features.kernel(x0)), 0.0)
            for lip, out in ((features.lipschitz(), own), (lip_kernel, fixed)):
                m, big = ball_pl_bounds(radius, lam0=lam, n=len(x0), lip=lip, b=b)
                out.append(float(m**2 * radius**2 / big) >= f0)
        tried.append(p)
        full.append(sum(own) / draws)
        lam_only.append(sum(fixed) / draws)
        if _first_of_two(full) >= 0 and _first_of_two(lam_only) >= 0 and full[-2:] == [1, 1] == lam_only[-2:]:
            break
    star = lambda fr: tried[_first_of_two(fr)] if _first_of_two(fr) >= 0 else math.inf  # noqa: E731
    return FeatureCount(n=len(x0), ps=tried, fraction=full, fraction_lambda=lam_only, p_star=star(full),
                        p_star_lambda=star(lam_only), cap=cap, radius=radius, lam0=lam0)


# --------------------------------------------------------------------------- lifting: what a flow of the line cannot do

def increasing_fit_floor(x, y) -> float:
    """``min (1/N) sum_i (f(x_i) - y_i)^2`` over nondecreasing maps ``f`` of the line (distinct ``x_i``): the isotonic
    regression of ``y`` on ``x``, by pooling adjacent violators. The flow of a field on the line, and every Euler step
    ``x + v_t(x)/T`` that keeps the points in order, is such a map, so the loss of an unlifted model (``d = 1``,
    ``A = B = 1``) stays at or above this floor. For ``y = -x`` the floor is the variance of ``x``."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"x and y must be 1-d of the same length; got {x.shape} and {y.shape}")
    if len(np.unique(x)) != len(x):
        raise ValueError("the x_i must be distinct")
    ys = y[np.argsort(x)]
    blocks: list[list[float]] = []  # [sum, count] of each pooled block
    for v in ys:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    fit = np.concatenate([np.full(int(c), s / c) for s, c in blocks])
    return float(np.mean((fit - ys) ** 2))


def keeps_order(states: Tensor) -> bool:
    """Whether the Euler flow of points on the line (``states`` ``(T+1, n, 1)``, from :func:`flow`) keeps them in the
    order of ``states[0]`` at every step, i.e. the model's map is increasing on the data."""
    if states.ndim != 3 or states.shape[2] != 1:
        raise ValueError(f"states must be (T+1, n, 1); got shape {tuple(states.shape)}")
    order = torch.argsort(states[0, :, 0])
    return bool((torch.diff(states[:, order, 0], dim=1) > 0).all())


# --------------------------------------------------------------------------- ReLU features and Condition 1

@dataclass
class ReLUFeatures:
    """Random ReLU features ``phi(x) = p^{-1/2} relu(W x)`` in ``R^p`` (the slides' kernel ``<sigma(W x), sigma(W x')>``
    with ``sigma`` = ReLU, and the fixed random inner weights of the authors' code). ``weight`` is ``(p, d)``."""

    weight: Tensor

    def __post_init__(self):
        if self.weight.ndim != 2:
            raise ValueError(f"weight must be (p, d); got shape {tuple(self.weight.shape)}")

    @classmethod
    def gaussian(cls, p: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64):
        """``W`` with independent ``N(0, 1/d)`` entries."""
        p, d = _checks.positive_int("p", p), _checks.positive_int("d", d)
        return cls(torch.randn(p, d, generator=torch.Generator().manual_seed(seed), dtype=dtype) / math.sqrt(d))

    @property
    def p(self) -> int:
        """The number of features ``p`` (rows of ``weight``)."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """The input dimension ``d`` (columns of ``weight``)."""
        return self.weight.shape[1]

    @property
    def width(self) -> int:
        """The feature dimension ``p`` (one ReLU per row of ``weight``)."""
        return self.p

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}); got shape {tuple(x.shape)}")
        return torch.relu(x.to(self.weight.dtype) @ self.weight.T) / math.sqrt(self.p)

    def lipschitz(self) -> float:
        """A bound on ``sup_x |D phi(x)|_op``: ``|D phi(x) h| = p^{-1/2} |1[Wx > 0] * (W h)| <= p^{-1/2} |W h|``."""
        return torch.linalg.matrix_norm(self.weight, ord=2).item() / math.sqrt(self.p)

    def kinks(self, x0: Tensor, u: Tensor) -> Tensor:
        """The ``s`` at which the line ``x0 + s u`` crosses the hyperplane ``<w_j, x> = 0`` of each feature ``j``."""
        return -(self.weight @ x0.to(self.weight.dtype)) / (self.weight @ u.to(self.weight.dtype))


def difference_quotients(field, x0: Tensor, u: Tensor, s, hs) -> tuple[np.ndarray, np.ndarray]:
    """First and second difference quotients of a field along the line ``x(s) = x0 + s u`` (``|u| = 1``).

    They are::

        q1(h) = max_s |v(x(s + h)) - v(x(s))| / h,    q2(h) = max_s |v(x(s + h)) - 2 v(x(s)) + v(x(s - h))| / h^2,

    the max over the given ``s``. ``field`` maps ``(n, d)`` points to ``(n, D)`` values. For a field with bounded first
    and second derivatives (Condition 1) they stay under ``sup |Dv|`` and ``sup |D^2 v|`` for every ``h`` (mean value
    theorem) and converge as ``h -> 0``. For ``v = Theta phi`` with ReLU features, centred at a kink ``s_j`` with ``h``
    smaller than the distance to the other kinks, the second difference is ``|Theta_j| |w_j . u| h / sqrt(p)``, so
    ``q2(h)`` grows like ``1/h``: no finite ``kappa``. Returns ``(q1, q2)`` over ``hs``."""
    s = torch.as_tensor(np.asarray(s, dtype=float), dtype=x0.dtype)
    u = u / u.norm()
    at = lambda t: field(x0[None] + t[:, None] * u[None])  # noqa: E731
    q1, q2 = [], []
    for h in np.asarray(hs, dtype=float):
        if not h > 0:
            raise ValueError(f"hs must be > 0; got {h!r}")
        mid, up, down = at(s), at(s + h), at(s - h)
        q1.append(((up - mid).norm(dim=1) / h).max().item())
        q2.append(((up - 2 * mid + down).norm(dim=1) / h**2).max().item())
    return np.array(q1), np.array(q2)


__all__ = ["sample_spectrum", "matern", "matern_matrix", "spectral_moments", "kappa_moment_bound",
           "kappa_slide_bound", "FourierFeatures", "max_fourth_moment", "separation", "min_eigenvalue",
           "line_points", "grid_points", "random_separated", "lifting", "flow", "h_norm", "Evaluation", "evaluate",
           "PLCheck", "pl_check", "gradient_descent", "project", "ball_pl_bounds", "slide_pl_bounds",
           "localisation_cap", "kernel_ball_cap", "features_cap", "FeatureCount", "feature_count",
           "increasing_fit_floor", "keeps_order", "ReLUFeatures", "difference_quotients"]
