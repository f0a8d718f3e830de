"""The tangent kernel of Marion et al.'s eq. (3) ResNet in the metric of the gradient flow (4), and its local PL constant.

The network is ``h_0 = A x``, ``h_k = h_{k-1} + (1/(L sqrt m)) V_k sigma(W_k h_{k-1} / sqrt q)``, ``F(x) = B h_L``
(parameters as a dict: ``V`` ``(L, q, m)``, ``W`` ``(L, m, q)``, ``A`` ``(q, d)`` and ``B`` ``(d', q)``; a missing
``A`` or ``B`` is the identity). The flow (4) moves ``A`` and ``B`` at rate 1 and each ``Z_k = (V_k, W_k)`` at rate
``L``; on the stacked outputs ``F(x_i)_a`` it acts through the kernel ``(n d', n d')``

    Theta = J_A J_A^T + L sum_k J_{Z_k} J_{Z_k}^T + J_B J_B^T,

formed layer by layer from ``P_k^i = dF(x_i)/dh_k`` (back-propagated, ``d' x q`` per sample):

- ``V_k``: ``(1/(L m)) (P_k^i P_k^{i'T})_{aa'} (s_k^i . s_k^{i'})`` with ``s_k^i = sigma(W_k h_{k-1}^i / sqrt q)``;
- ``W_k``: ``(1/(L m q)) (U_k^i U_k^{i'T})_{aa'} (h_{k-1}^i . h_{k-1}^{i'})`` with ``U_k^i = P_k^i V_k diag(sigma'(p_k^i))``;
- ``A``: ``(P_0^i P_0^{i'T})_{aa'} (x_i . x_{i'})``; ``B``: ``delta_{aa'} (h_L^i . h_L^{i'})``.

With ``r`` the stacked residuals and ``l = |r|^2 / n`` the loss, the left side of Definition 1 (local PL)
is ``(4/n^2) r^T Theta r``, so its ratio to ``l`` is at least ``(4/n) lambda_min(Theta)`` (:func:`pl_constant`),
with equality for the worst targets. At the initialisation of Section 3 (``V = 0``, tied ``W``, ``A = (I; 0)``,
``B = (0, I)``) the kernel is ``((1/m) S^T S + 2 X X^T) kron I_{d'}`` (:func:`init_kernel`).
:func:`gradient_flow` trains the whole network (``A``, every ``Z_k``, ``B``) by gradient descent on the flow (4), on
:mod:`resnode.engine`, with batched copies; :func:`distances` gives Definition 1's distances to the start.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .train import check_divergence
from .engine import activation_derivative
from .models import ACTIVATIONS, Perceptron, activation as activation_function, euler


class Forward(NamedTuple):
    """States ``h_0 .. h_L`` ``(L + 1, n, q)``, pre-activations ``p_k = W_k h_{k-1} / sqrt q`` ``(L, n, m)``, outputs ``(n, d')``."""

    states: Tensor
    pres: Tensor
    outputs: Tensor


def _shapes(x: Tensor, params: dict) -> tuple[int, int, int, int, int, int]:
    """``(n, d, q, m, L, d')``, checking every shape."""
    if not isinstance(params, dict) or "V" not in params or "W" not in params:
        raise ValueError("params must be a dict with V (L, q, m), W (L, m, q) and optionally A (q, d), B (d', q)")
    unknown = set(params) - {"A", "V", "W", "B"}
    if unknown:
        raise ValueError(f"params may only name A, V, W, B; got {sorted(unknown)}")
    if x.dim() != 2:
        raise ValueError(f"x must be (n, d); got shape {tuple(x.shape)}")
    n, d = x.shape
    V, W = params["V"], params["W"]
    if W.dim() != 3:
        raise ValueError(f"W must be (L, m, q); got shape {tuple(W.shape)}")
    depth, m, q = W.shape
    if V.shape != (depth, q, m):
        raise ValueError(f"V must be (L, q, m) = {(depth, q, m)}; got {tuple(V.shape)}")
    A = params.get("A")
    if A is None and d != q:
        raise ValueError(f"without A the input dimension must equal q; got d={d}, q={q}")
    if A is not None and A.shape != (q, d):
        raise ValueError(f"A must be (q, d) = {(q, d)}; got {tuple(A.shape)}")
    B = params.get("B")
    if B is not None and (B.dim() != 2 or B.shape[1] != q):
        raise ValueError(f"B must be (d', q) with q = {q}; got {tuple(B.shape)}")
    return n, d, q, m, depth, (q if B is None else B.shape[0])


def forward(x: Tensor, params: dict, activation: str = "gelu") -> Forward:
    """Eq. (3) for every sample (``models.euler`` over ``models.Perceptron``, autograd-friendly): states,
    pre-activations and outputs ``F(x_i) = B h_L``."""
    _checks.one_of("activation", activation, ACTIVATIONS)
    _, _, q, m, _, _ = _shapes(x, params)
    A, B, V, W = params.get("A"), params.get("B"), params["V"], params["W"]
    h0 = x if A is None else x @ A.mT
    states = euler(h0, Perceptron(q, m, activation), (V, W), trajectory=True)
    pres = states[:-1] @ W.mT / math.sqrt(q)  # p_k for every layer in one batched product
    outputs = states[-1] if B is None else states[-1] @ B.mT
    return Forward(states, pres, outputs)


def loss(x: Tensor, y: Tensor, params: dict, activation: str = "gelu") -> Tensor:
    """``l = (1/n) sum_i |F(x_i) - y_i|^2`` (Marion et al. Section 3)."""
    out = forward(x, params, activation).outputs
    if y.shape != out.shape:
        raise ValueError(f"y must be (n, d') = {tuple(out.shape)}; got {tuple(y.shape)}")
    return (out - y).square().sum() / x.shape[0]


def _kron_gram(gram: Tensor, block: Tensor) -> Tensor:
    """``(n d', n d')`` with entries ``block[(i,a),(j,b)] * gram[i, j]``: ``block`` is ``(n, d', n, d')``."""
    return block * gram[:, None, :, None]


def tangent_kernel(x: Tensor, params: dict, *, train_io: bool = True, activation: str = "gelu") -> Tensor:
    """``Theta = J_A J_A^T + L sum_k J_{Z_k} J_{Z_k}^T + J_B J_B^T`` of the stacked outputs ``F(x_i)_a``, ``(n d', n d')``.

    The gradient flow (4) metric: rate ``L`` on each residual block, 1 on ``A`` and ``B``; ``train_io=False``
    leaves ``A`` and ``B`` out (Appendix E trains only the ``Z_k``). Rows are ordered sample-major
    (``i d' + a``). A loop over layers of a few batched products each; no autograd.
    """
    if not isinstance(train_io, bool):
        raise ValueError(f"train_io must be True or False; got {train_io!r}")
    n, d, q, m, depth, dout = _shapes(x, params)
    fw = forward(x, params, activation)
    B, V, W = params.get("B"), params["V"], params["W"]
    acts = activation_function(activation)(fw.pres)
    slopes = activation_derivative(activation, acts, fw.pres)
    c_v = 1 / (depth * m)  # L * (1/(L sqrt m))^2
    c_w = c_v / q
    c_back = 1 / (depth * math.sqrt(m) * math.sqrt(q))
    size = n * dout
    P = (torch.eye(q, dtype=x.dtype, device=x.device) if B is None else B).expand(n, dout, q).clone()
    theta = x.new_zeros(n, dout, n, dout)
    for k in range(depth - 1, -1, -1):  # layer k + 1 of the paper: V[k], W[k] act on states[k]
        s, slope, h = acts[k], slopes[k], fw.states[k]
        flat = P.reshape(size, q)
        theta += _kron_gram(s @ s.mT, (flat @ flat.mT).reshape(n, dout, n, dout)).mul_(c_v)
        U = (P @ V[k]).mul_(slope[:, None, :])  # (n, d', m)
        flatU = U.reshape(size, m)
        theta += _kron_gram(h @ h.mT, (flatU @ flatU.mT).reshape(n, dout, n, dout)).mul_(c_w)
        P = P + c_back * (U @ W[k])  # P_{k} = P_{k+1} (I + c V diag(sigma') W)
    if train_io:
        flat = P.reshape(size, q)
        theta += _kron_gram(x @ x.mT, (flat @ flat.mT).reshape(n, dout, n, dout))
        hL = fw.states[-1]
        eye = torch.eye(dout, dtype=x.dtype, device=x.device)
        theta += (hL @ hL.mT)[:, None, :, None] * eye[None, :, None, :]
    return theta.reshape(size, size)


def init_kernel(x: Tensor, W: Tensor, A: Tensor | None = None, d_out: int | None = None, *, train_io: bool = True,
                activation: str = "gelu") -> Tensor:
    """The kernel at the initialisation of Section 3 (``V = 0``, every ``W_k = W``, ``B B^T = I``, ``B A = 0``):
    ``((1/m) S^T S + 2 X X^T) kron I_{d'}`` (without ``A``, ``B``: ``(1/m) S^T S kron I_{d'}``), where
    ``S = sigma(W A x_i / sqrt q)`` is ``m x n``. Its rank is at most ``d' (min(m, n) + d)`` (``d' min(m, n)``)."""
    if not isinstance(train_io, bool):
        raise ValueError(f"train_io must be True or False; got {train_io!r}")
    if W.dim() != 2:
        raise ValueError(f"W must be the tied (m, q) matrix; got shape {tuple(W.shape)}")
    m, q = W.shape
    h0 = x if A is None else x @ A.mT
    if h0.shape[-1] != q:
        raise ValueError(f"A x must have q = {q} coordinates; got {h0.shape[-1]}")
    d_out = q if d_out is None else _checks.positive_int("d_out", d_out)
    S = activation_function(activation)(h0 @ W.mT / math.sqrt(q))  # (n, m): rows are samples
    gram = S @ S.mT / m
    if train_io:
        gram = gram + 2 * x @ x.mT
    return torch.kron(gram, torch.eye(d_out, dtype=x.dtype, device=x.device))


def pl_constant(theta: Tensor, n: int) -> float:
    """``mu_hat = (4/n) lambda_min(Theta)``: the smallest Definition-1 ratio over all targets at this point."""
    n = _checks.positive_int("n", n)
    if theta.dim() != 2 or theta.shape[0] != theta.shape[1] or theta.shape[0] % n:
        raise ValueError(f"theta must be a square (n d', n d') matrix with n = {n}; got {tuple(theta.shape)}")
    return 4 / n * torch.linalg.eigvalsh(theta)[0].item()


def pl_ratio(x: Tensor, y: Tensor, params: dict, *, train_io: bool = True, theta: Tensor | None = None,
             activation: str = "gelu") -> float:
    """The Definition-1 ratio ``(|d_A l|^2 + L sum_k |d_{Z_k} l|^2 + |d_B l|^2) / l = (4/n^2) r^T Theta r / l``:
    the instantaneous decay rate ``-d log l / dt`` of the loss along the flow (4)."""
    out = forward(x, params, activation).outputs
    if y.shape != out.shape:
        raise ValueError(f"y must be (n, d') = {tuple(out.shape)}; got {tuple(y.shape)}")
    theta = tangent_kernel(x, params, train_io=train_io, activation=activation) if theta is None else theta
    r = (out - y).reshape(-1)
    n = x.shape[0]
    return (4 / n * (r @ theta @ r) / (r @ r)).item()


def initialise(d: int, q: int, m: int, depth: int, d_out: int | None = None, *, train_io: bool = True,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> dict:
    """Section 3: ``V_k = 0``, ``W_k = W`` one standard Gaussian ``(m, q)`` matrix for all ``k``, and with
    ``train_io`` ``A = (I_d; 0)``, ``B = (0, I_{d'})`` (needs ``q >= d + d'``); without it ``A = B = I`` (``q = d = d'``)."""
    d, q, m, depth = (_checks.positive_int(k, v) for k, v in (("d", d), ("q", q), ("m", m), ("depth", depth)))
    d_out = d if d_out is None else _checks.positive_int("d_out", d_out)
    W = torch.randn(m, q, generator=generator, dtype=dtype)
    params = {"V": torch.zeros(depth, q, m, dtype=dtype), "W": W.expand(depth, m, q).clone()}
    if train_io:
        if q < d + d_out:
            raise ValueError(f"q must be >= d + d_out = {d + d_out} (Prop. 5); got q={q}")
        params["A"] = torch.eye(q, d, dtype=dtype)
        params["B"] = torch.eye(q, dtype=dtype)[q - d_out:]
    elif not d == q == d_out:
        raise ValueError(f"without trained A, B (Appendix E) d, q and d_out must be equal; got {d}, {q}, {d_out}")
    return params


def perturb(params: dict, rho: float, *, train_io: bool = True, coherent: bool = False,
            generator: torch.Generator | None = None) -> dict:
    """A random point of the Definition-1 neighbourhood of radius ``rho``: with ``train_io`` ``A`` and ``B`` move by
    ``rho`` each, then each ``V_k`` and ``W_k`` by a Gaussian direction of Frobenius norm ``rho / 2`` (so
    ``|Z_k - Z0_k|_F = |dV_k| + |dW_k| = rho``): independent across layers, or with ``coherent`` the same direction
    at every layer (a tied move, which depth does not average out). ``A`` and ``B`` are drawn first, so a
    generator in the same state gives the same moves of ``A`` and ``B`` at every depth (common random numbers
    for a comparison across depths). The arguments are not modified."""
    rho = _checks.nonnegative_float("rho", rho)
    if not isinstance(coherent, bool):
        raise ValueError(f"coherent must be True or False; got {coherent!r}")
    out = {}
    for name in ("A", "B"):
        if name not in params:
            continue
        w = params[name]
        if train_io:
            z = torch.randn(w.shape, generator=generator, dtype=w.dtype)
            out[name] = w + rho * z / torch.linalg.vector_norm(z)
        else:
            out[name] = w.clone()
    for name in ("V", "W"):
        w = params[name]
        if coherent:
            z = torch.randn(w.shape[1:], generator=generator, dtype=w.dtype).expand(w.shape)
        else:
            z = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        z = z * ((rho / 2) / torch.linalg.vector_norm(z.flatten(1), dim=1).reshape(-1, 1, 1))
        out[name] = w + z
    return {name: out[name] for name in params}


def sphere(n: int, d: int, radius: float, *, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` points uniform on the sphere of radius ``radius`` in ``R^d`` (Prop. 5 asks ``|x_i| = sqrt q``)."""
    n, d = _checks.positive_int("n", n), _checks.positive_int("d", d)
    radius = _checks.positive_float("radius", radius)
    z = torch.randn(n, d, generator=generator, dtype=dtype)
    return radius * z / torch.linalg.vector_norm(z, dim=1, keepdim=True)


def _copies(params: dict) -> int:
    """Number of copy dimensions of ``params`` (0 or 1): ``W`` is ``(L, m, q)`` or ``(L, S, m, q)``."""
    if params["W"].dim() not in (3, 4):
        raise ValueError(f"W must be (L, m, q) or (L, S, m, q); got shape {tuple(params['W'].shape)}")
    return params["W"].dim() - 3


def distances(params: dict, start: dict) -> dict[str, Tensor]:
    """The three distances of Definition 1 between ``params`` and ``start``: ``|A - A0|_F``, ``|B - B0|_F`` and
    ``sup_k |Z_k - Z0_k|_F`` with the paper's ``|Z|_F = |V|_F + |W|_F``; one value per copy (``(S,)`` or ``()``)."""
    lead = _copies(params)
    out = {}
    for name in ("A", "B"):
        if name in params:
            out[name] = torch.linalg.vector_norm((params[name] - start[name]).flatten(lead), dim=-1)
    per_layer = sum(torch.linalg.vector_norm((params[k] - start[k]).flatten(1 + lead), dim=-1) for k in ("V", "W"))
    out["Z"] = per_layer.max(0).values
    return out


def gradient_flow(x: Tensor, y: Tensor, params: dict, steps: int, dt: float, *, every: int = 1,
                  snapshots=(), activation: str = "gelu") -> tuple[dict, dict]:
    """Gradient descent with step ``dt`` on the flow (4) with ``A`` and ``B`` trained: ``A <- A - dt d_A l``,
    ``Z_k <- Z_k - dt L d_{Z_k} l``, ``B <- B - dt d_B l``, for ``l = (1/n) sum_i |B h_L(x_i) - y_i|^2`` of eq. (3).

    ``params`` as for :func:`tangent_kernel` (``A`` or ``B`` missing: the identity, not trained), or with a copy
    dimension ``S`` (``V`` ``(L, S, q, m)``, ``W`` ``(L, S, m, q)``, ``A`` ``(S, q, d)``, ``B`` ``(S, d', q)``, ``x``
    ``(S, n, d)``, ``y`` ``(S, n, d')``): ``S`` independent networks in the same calls of :mod:`resnode.engine`.
    Every ``every`` updates (and at the end) it records the loss and the :func:`distances` from the start;
    at the iterations in ``snapshots`` it keeps a copy of the parameters. Returns the trained parameters (new
    tensors) and the history: ``t`` ``(records,)``, ``loss`` ``(records, *S)``, ``A`` / ``Z`` / ``B`` distances
    ``(records, *S)``, ``snapshots`` ``{t: params}``.
    """
    from . import engine

    steps, every = _checks.positive_int("steps", steps), _checks.positive_int("every", every)
    dt = _checks.positive_float("dt", dt)
    _checks.one_of("activation", activation, ACTIVATIONS)
    lead = _copies(params)
    depth, m, q = params["W"].shape[0], params["W"].shape[-2], params["W"].shape[-1]
    if params["V"].shape != (*params["W"].shape[:-2], q, m):
        raise ValueError(f"V must be {(*params['W'].shape[:-2], q, m)}; got {tuple(params['V'].shape)}")
    if x.dim() != 2 + lead or y.dim() != 2 + lead or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"x and y must be ({'S, ' if lead else ''}n, d) and ({'S, ' if lead else ''}n, d'); "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    unknown = set(params) - {"A", "V", "W", "B"}
    if unknown:
        raise ValueError(f"params may only name A, V, W, B; got {sorted(unknown)}")
    spec = engine.Residual(activation, step=1 / depth, inner=q**-0.5, outer=m**-0.5)
    start = {k: v.detach().clone() for k, v in params.items()}
    p = {k: v.detach().clone().contiguous() for k, v in params.items()}
    A, B = p.get("A"), p.get("B")
    n = x.shape[-2]
    workspace = engine.Workspace()
    keep = set(int(t) for t in snapshots)
    history = {"t": [], "loss": [], "A": [], "Z": [], "B": [], "snapshots": {}}
    for t in range(steps + 1):
        h0 = x if A is None else x @ A.mT
        trace = engine.forward(h0.contiguous(), p["W"], p["V"], None, spec, workspace)
        hL = trace.states[-1]
        residual = (hL if B is None else hL @ B.mT) - y
        loss = residual.square().sum((-2, -1)) / n
        first = loss.clone() if t == 0 else first
        check_divergence(loss, first, t, "dt")
        if t % every == 0 or t == steps:
            history["t"].append(t)
            history["loss"].append(loss.numpy().copy())
            for name, value in distances(p, start).items():
                history[name].append(value.numpy().copy())
        if t in keep:
            history["snapshots"][t] = {k: v.clone() for k, v in p.items()}
        if t == steps:
            break
        grad_out = (2 / n) * (residual if B is None else residual @ B)
        grads = {}
        if B is not None:
            grads["B"] = (2 / n) * residual.mT @ hL
        g0, gW, gV, _ = engine.backward(grad_out.contiguous(), trace, p["W"], p["V"], None, spec, workspace)
        if A is not None:
            grads["A"] = g0.mT @ x
        p["W"].add_(gW, alpha=-dt * depth)
        p["V"].add_(gV, alpha=-dt * depth)
        for name, g in grads.items():
            p[name].sub_(dt * g)
    history = {k: (v if k == "snapshots" else np.array(v) if v else None) for k, v in history.items()}
    return p, history


def stack(copies: list[dict]) -> dict:
    """``S`` parameter sets as one with a copy dimension (``V``, ``W`` after depth; ``A``, ``B`` first), for
    :func:`gradient_flow`."""
    if not copies:
        raise ValueError("stack needs at least one parameter set")
    return {k: torch.stack([c[k] for c in copies], dim=1 if k in ("V", "W") else 0).contiguous() for k in copies[0]}


def select(params: dict, index: int) -> dict:
    """Copy ``index`` of parameters with a copy dimension (the inverse of :func:`stack`)."""
    if _copies(params) != 1:
        raise ValueError("select needs parameters with a copy dimension (W of shape (L, S, m, q))")
    return {k: (v[:, index] if k in ("V", "W") else v[index]).contiguous() for k, v in params.items()}


__all__ = ["Forward", "forward", "loss", "tangent_kernel", "init_kernel", "pl_constant", "pl_ratio", "initialise",
           "perturb", "sphere", "distances", "gradient_flow", "stack", "select"]
