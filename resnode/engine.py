"""A fused forward and hand-written backward for deep fully connected ResNets.

The residual of every fully connected model of the book is one form,
``f_k(h) = outer * V_k sigma(inner * W_k h + b_k)``, integrated by ``h_{k+1} = h_k + step f_k(h_k)``:

- Marion et al. eq. (3): ``V_k`` a ``(q, m)`` matrix, ``inner = 1/sqrt(q)``, ``outer = 1/sqrt(m)``;
- Cont et al.: ``V_k = delta_k`` a scalar per layer (``m = q``), ``delta_k sigma(A_k h + b_k)``;
- linear (Sander et al. Section 3.2): no ``V``, identity ``sigma``, ``m = q``.

The forward pass keeps the states and pre-activations; the backward pass forms the state gradients
layer by layer. On the CPU both depth loops run in C, weight gradients included (``resnode.native``:
about 10 us per layer for a forward and a backward at the book's sizes). Elsewhere, or without a C
compiler, each loop is three torch calls per layer, instead of the dozens autograd dispatches, and the
weight gradients of a block of layers come from one batched matrix product each. A leading dimension
of size ``S`` after depth runs ``S`` independent networks (seeds, learning rates) in the same calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks, native
from .models import ACTIVATIONS, activation as activation_function

_EXACT_GELU = 1 / math.sqrt(2)
_GAUSS = 1 / math.sqrt(2 * math.pi)


def activation_derivative(name: str, act: Tensor, pre: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``sigma'(pre)``, from the activation ``act = sigma(pre)`` where it suffices: tanh ``1 - a^2``,
    sigmoid ``a - a^2``, ReLU ``sign(a)``, softplus ``1 - e^{-a}``; GELU needs ``pre``
    (``Phi(x) + x phi(x)``, by torch's fused GELU backward). Written into ``out`` when given."""
    _checks.one_of("activation", name, ACTIVATIONS)
    out = torch.empty_like(act) if out is None else out
    if name in ("tanh", "sigmoid"):
        torch.mul(act, act, out=out).neg_()
        return out.add_(1 if name == "tanh" else act)
    if name == "relu":
        return torch.sign(act, out=out)
    if name == "softplus":
        return torch.neg(act, out=out).expm1_().neg_()
    if name == "gelu":
        if pre is None:
            raise ValueError("the GELU derivative needs the pre-activation")
        return torch.ops.aten.gelu_backward.grad_input(out.fill_(1), pre, grad_input=out)
    return out.fill_(1)


@dataclass(frozen=True)
class Residual:
    """``f_k(h) = outer * V_k sigma(inner * W_k h + b_k)`` and the step of ``h_{k+1} = h_k + step f_k(h_k)``."""

    activation: str = "tanh"
    step: float = 1.0
    inner: float = 1.0
    outer: float = 1.0
    block: int = 256  # torch loops: layers whose weight gradients are formed by one batched product

    def __post_init__(self):
        _checks.one_of("activation", self.activation, ACTIVATIONS)
        for name in ("step", "inner", "outer"):
            _checks.positive_float(name, getattr(self, name))
        _checks.positive_int("block", self.block)


def _check(h0: Tensor, W: Tensor, V: Tensor | None, b: Tensor | None) -> None:
    lead = h0.shape[:-2]
    if h0.dim() not in (2, 3):
        raise ValueError(f"h0 must be (n, q) or (S, n, q); got shape {tuple(h0.shape)}")
    if W.dim() != 3 + len(lead) or W.shape[1:-2] != lead or W.shape[-1] != h0.shape[-1]:
        raise ValueError(f"W must be (L, {'S, ' if lead else ''}m, q={h0.shape[-1]}); got {tuple(W.shape)}")
    depth, m, q = W.shape[0], W.shape[-2], W.shape[-1]
    if V is None:
        if m != q:
            raise ValueError(f"without V the hidden width must equal the state dimension; got m={m}, q={q}")
    elif V.shape not in ((depth, *lead, q, m), (depth, *lead)):
        raise ValueError(f"V must be (L, {'S, ' if lead else ''}q, m) or one scalar per layer (L{', S' if lead else ''}); "
                         f"got {tuple(V.shape)}")
    if b is not None and b.shape != (depth, *lead, m):
        raise ValueError(f"b must be (L, {'S, ' if lead else ''}m); got {tuple(b.shape)}")


class Workspace:
    """Buffers (and their per-layer views) kept from one call to the next. Fresh memory costs a page
    fault per 4 KiB at first touch, about as much as the arithmetic at these sizes, so a training loop
    passes one workspace to every step; results written into it are valid until its next use."""

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}
        self._layers: dict[str, tuple[Tensor, ...]] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The buffer ``name`` of ``shape`` with ``like``'s dtype and device, kept from the last call if these match,
        else newly allocated (uninitialised)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = like.new_empty(shape)
            self._layers.pop(name, None)
        return buffer

    def layers(self, name: str) -> tuple[Tensor, ...]:
        """The buffer ``name`` split along its first dimension (views made once, not at every call)."""
        if name not in self._layers:
            self._layers[name] = self._buffers[name].unbind(0)
        return self._layers[name]


class Trace(NamedTuple):
    """What the backward pass needs: states ``h_0 .. h_L`` ``(L + 1, ..., n, q)``, activations
    ``sigma(p_k)`` ``(L, ..., n, m)``, and the pre-activations ``p_k`` (kept for GELU only, else ``None``)."""

    states: Tensor
    acts: Tensor
    pres: Tensor | None


def _matrix(V: Tensor | None, W: Tensor) -> bool:
    return V is not None and V.dim() == W.dim()


def _scalars(V: Tensor, c: float) -> tuple[Tensor, ...]:
    """Per-layer scalars ``c * delta_k``, shaped to broadcast against ``(..., n, m)``."""
    return (c * V).reshape(*V.shape, 1, 1).unbind(0)


def _native_v(V: Tensor | None, c: float, scaled_matrix: Tensor | None) -> tuple[int, Tensor | None]:
    """What ``resnode.native`` takes for ``V``: its kind and the tensor already scaled by ``c`` (a matrix ``V``
    comes scaled, as the workspace holds it)."""
    if scaled_matrix is not None:
        return native.V_MATRIX, scaled_matrix
    if V is not None:
        return native.V_SCALAR, (c * V).contiguous()
    return native.V_NONE, None


def forward(h0: Tensor, W: Tensor, V: Tensor | None, b: Tensor | None, spec: Residual,
            workspace: Workspace | None = None) -> Trace:
    """Run ``h_{k+1} = h_k + step outer V_k sigma(inner W_k h_k + b_k)`` for ``k < L``; ``h_L`` is ``trace.states[-1]``.

    Per layer: one ``(b)mm`` for the pre-activation, the activation, one ``addmm`` for the update (one C loop
    over all layers where ``resnode.native`` can run).
    """
    _check(h0, W, V, b)
    ws = Workspace() if workspace is None else workspace
    depth, m = W.shape[0], W.shape[-2]
    name = spec.activation
    batched = h0.dim() == 3
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    states = ws.get("states", (depth + 1, *h0.shape), h0)
    states[0] = h0
    acts = ws.get("acts", (depth, *h0.shape[:-1], m), h0)
    pres = ws.get("pres", acts.shape, h0) if name == "gelu" else None
    Wt_all = torch.mul(W.mT, spec.inner, out=ws.get("Wt", (*W.shape[:-2], W.shape[-1], m), W))
    c, matrix = spec.step * spec.outer, _matrix(V, W)
    Vt_all = torch.mul(V.mT, c, out=ws.get("Vt", (*V.shape[:-2], m, V.shape[-2]), V)) if matrix else None
    lib = native.kernels(h0.dtype, h0.shape[-1], m) if native.usable(h0, W, V, b) else None
    if lib is not None:
        v_kind, v = _native_v(V, c, Vt_all)
        bias = None if b is None else b.contiguous()  # held here: C reads it through a bare pointer
        lib.resnode_forward(depth, h0.shape[0] if batched else 1, h0.shape[-2], native.ACTIVATION_CODES[name], v_kind,
                            c, *map(native.address, (Wt_all, bias, v, states, pres, acts)))
        return Trace(states, acts, pres)
    hs, outs = ws.layers("states"), ws.layers("acts")
    if name == "identity":
        pre_k = outs  # sigma(p) = p: the activation is the pre-activation
    elif pres is not None:
        pre_k = ws.layers("pres")
    else:
        pre_k = (ws.get("pre", acts.shape[1:], h0),) * depth
    Wt = ws.layers("Wt")
    if b is not None:
        b_k = (b.unsqueeze(-2) if batched else b).unbind(0)
    if matrix:
        Vt = ws.layers("Vt")
    elif V is not None:
        Vt = _scalars(V, c)
    kept = []  # activations without an out= form, stacked into `acts` once at the end
    sigma = activation_function(name)
    for k in range(depth):
        if b is None:
            mm(hs[k], Wt[k], out=pre_k[k])
        else:
            addmm(b_k[k], hs[k], Wt[k], out=pre_k[k])
        if name == "tanh":
            act = torch.tanh(pre_k[k], out=outs[k])
        elif name == "sigmoid":
            act = torch.sigmoid(pre_k[k], out=outs[k])
        elif name == "relu":
            act = torch.clamp(pre_k[k], min=0, out=outs[k])
        elif name == "identity":
            act = outs[k]
        else:
            act = sigma(pre_k[k])
            kept.append(act)
        if V is None:
            torch.add(hs[k], act, alpha=c, out=hs[k + 1])
        elif matrix:
            addmm(hs[k], act, Vt[k], out=hs[k + 1])
        else:
            torch.addcmul(hs[k], act, Vt[k], out=hs[k + 1])
    if kept:
        torch.stack(kept, out=acts)
    return Trace(states, acts, pres)


def backward(grad_output: Tensor, trace: Trace, W: Tensor, V: Tensor | None, b: Tensor | None,
             spec: Residual, workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(d h_0, d W, d V, d b)`` of a loss whose gradient in ``h_L`` is ``grad_output``.

    Reverse recursion: ``g_k = g_{k+1} + inner * W_k^T [sigma'(p_k) * (step outer V_k^T g_{k+1})]``;
    per layer ``dV_k = step outer g_{k+1} sigma(p_k)^T``, ``dW_k = inner p'_k h_k^T``, ``db_k = p'_k``,
    with ``p'_k`` the bracket: layer by layer in C (``resnode.native``), else a block of layers at a time by
    batched products. With a ``workspace`` the weight gradients are written into it.
    """
    ws = Workspace() if workspace is None else workspace
    depth = W.shape[0]
    batched = grad_output.dim() == 3
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    name, c = spec.activation, spec.step * spec.outer
    Wi_all = torch.mul(W, spec.inner, out=ws.get("Wi", W.shape, W))
    matrix = _matrix(V, W)
    Vc_all = torch.mul(V, c, out=ws.get("Vc", V.shape, V)) if matrix else None
    gW = ws.get("gW", W.shape, W)
    gV = None if V is None else ws.get("gV", V.shape, V)
    gb = None if b is None else ws.get("gb", b.shape, b)
    lead = grad_output.shape
    lib = native.kernels(W.dtype, W.shape[-1], W.shape[-2]) if native.usable(grad_output, W, V, b) else None
    if lib is not None:
        v_kind, v = _native_v(V, c, Vc_all)
        g = grad_output.clone(memory_format=torch.contiguous_format)
        scratch = ws.get("scratch", trace.acts.shape[-2:], g)
        lib.resnode_backward(depth, lead[0] if batched else 1, lead[-2], native.ACTIVATION_CODES[name], v_kind, c,
                             spec.inner, *map(native.address, (Wi_all, v, trace.states, trace.pres, trace.acts, g,
                                                               scratch, gW, gV, gb)))
        return g, gW, gV, gb
    Wi = ws.layers("Wi")
    if matrix:
        back = ws.layers("Vc")
    elif V is not None:
        back = _scalars(V, c)
    size = min(spec.block, depth)
    Gfull = ws.get("G", (size + 1, *lead), grad_output)  # G[j] = g_{lo + j}
    Pfull = ws.get("P", (size, *trace.acts.shape[1:]), grad_output)  # P[j] = p'_{lo + j}
    Sfull = None if name == "identity" else ws.get("slope", Pfull.shape, grad_output)
    G_all, P_all = ws.layers("G"), ws.layers("P")
    g = grad_output
    for hi in range(depth, 0, -spec.block):
        lo = max(0, hi - spec.block)
        top = hi - lo
        Gfull[top] = g  # g_hi: the output gradient, then the previous block's G[0]
        acts = trace.acts[lo:hi]
        G, P = Gfull[: top + 1], Pfull[:top]
        if Sfull is not None:
            slope = activation_derivative(name, acts, None if trace.pres is None else trace.pres[lo:hi], Sfull[:top])
            s_k = slope.unbind(0)
        for k in range(hi - 1, lo - 1, -1):
            j = k - lo
            if matrix:
                mm(G_all[j + 1], back[k], out=P_all[j])
            elif V is not None:
                torch.mul(G_all[j + 1], back[k], out=P_all[j])
            else:
                torch.mul(G_all[j + 1], c, out=P_all[j])
            if Sfull is not None:
                P_all[j].mul_(s_k[j])
            addmm(G_all[j + 1], P_all[j], Wi[k], out=G_all[j])
        torch.matmul(P.mT, trace.states[lo:hi], out=gW[lo:hi]).mul_(spec.inner)
        if b is not None:
            torch.sum(P, -2, out=gb[lo:hi])
        if matrix:
            torch.matmul(G[1:].mT, acts, out=gV[lo:hi]).mul_(c)
        elif V is not None:
            torch.sum(torch.mul(G[1:], acts), (-2, -1), out=gV[lo:hi]).mul_(c)
        g = Gfull[0]
    return g.clone(), gW, gV, gb


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h0, W, V, b, spec):
        trace = forward(h0.detach(), W.detach(), None if V is None else V.detach(),
                        None if b is None else b.detach(), spec)
        ctx.spec = spec
        ctx.save_for_backward(*trace, W, V, b)
        return trace.states[-1].clone()

    @staticmethod
    def backward(ctx, grad_output):
        states, acts, pres, W, V, b = ctx.saved_tensors
        g, gW, gV, gb = backward(grad_output.contiguous(), Trace(states, acts, pres), W, V, b, ctx.spec)
        return g, gW, gV, gb, None


def resnet(h0: Tensor, W: Tensor, V: Tensor | None = None, b: Tensor | None = None, *,
           spec: Residual = Residual()) -> Tensor:
    """``h_L`` of ``h_{k+1} = h_k + step outer V_k sigma(inner W_k h_k + b_k)``, differentiable by the fused backward.

    Shapes: ``h0`` ``(n, q)`` or ``(S, n, q)``; ``W`` ``(L, [S,] m, q)``; ``V`` ``(L, [S,] q, m)``,
    ``(L[, S])`` (a scalar per layer) or ``None`` (``m = q``); ``b`` ``(L, [S,] m)`` or ``None``.
    """
    return _Fused.apply(h0, W, V, b, spec)


__all__ = ["activation_derivative", "Residual", "Workspace", "Trace", "forward", "backward", "resnet"]
