"""Least-squares fit of a chain of small kernels to one large kernel ("preserve" init of a CK expansion).

Kernels are ``(out, in / g, *taps)``; ``second ⊛ first`` is
``K[o,i,t] = Σ_c Σ_v second[o,c,v] first[c,i,t-v]`` per group. With ``M`` fixed, ``X ⊛ M`` is linear in
``X``: ``K[o] = X[o] D`` with the design matrix ``D[(c,v), (i,t)] = M[c,i,t-v]`` (``M`` placed at every
offset ``v``), one per group and shared by all outputs ``o``. So one batched least-squares solve gives the
best last factor and, through ``T(B ⊛ A) = T(A) ⊛ T(B)`` (``T`` swaps in/out per group and flips the taps),
the best first factor.

``fit_chain`` first peels the chain from its ends: fix a prefix (or suffix) of factors at their ``init``
values, solve for the composite of the rest, recurse into that composite. Only the innermost factor is ever
solved: the peel inverts the linear map ``X ↦ Q ⊛ X ⊛ P`` stage by stage, and each stage is exact when its
``D`` has at least as many rows as columns (and full rank), e.g. 7x7 -> three 3x3 at rate 4 (6400/3136,
then 2304/1600). A feasible fit is a few Cholesky factorisations and no iterations. Otherwise alternating
least squares on the two end factors (monotone in the residual, with an extrapolation step per sweep)
improves the fit until it stalls.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass

import torch

__all__ = ["FitResult", "fit_chain"]

_ALL = slice(None)


@dataclass
class FitResult:
    weights: list[torch.Tensor]  # fitted factor kernels, same shapes/dtype/device as `init`
    residual: float  # ||compose(weights) - target|| / ||target|| (Frobenius), 0.0 if target is zero
    iterations: int  # alternating sweeps after the direct (peeling) solve; 0 when that was exact
    seconds: float


def _shifts(ks):
    return itertools.product(*map(range, ks))


def _window(v, size):
    return tuple(slice(a, a + s) for a, s in zip(v, size, strict=True))


def _taps(shapes):  # tap shape of the composite of kernels with these tap shapes
    return tuple(sum(k) - len(k) + 1 for k in zip(*shapes, strict=True))


def _size(shapes):  # its number of taps (1 for no kernels)
    return math.prod(_taps(shapes))


def _t(w, g):
    """``T(w)``: swap out/in channels within each group and flip all taps, so ``T(B ⊛ A) = T(A) ⊛ T(B)``."""
    w2 = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
    return w2.reshape(-1, *w2.shape[2:]).flip(list(range(2, w.dim())))


def _compose(ws, g):
    """``ws[-1] ⊛ ... ⊛ ws[0]``; each step adds ``second[:, :, v] @ first`` at tap offset ``v``."""
    out = ws[0]
    for x in ws[1:]:
        m, x = out.unflatten(0, (g, -1)), x.unflatten(0, (g, -1))  # (g, c, i, *S), (g, p, c, *V)
        S, V = m.shape[3:], x.shape[3:]
        out = m.new_zeros(*x.shape[:2], m.shape[2], *_taps((S, V)))
        for v in _shifts(V):
            step = x[(...,) + v] @ m.flatten(2)  # (g, p, i * |S|)
            out[(_ALL,) * 3 + _window(v, S)] += step.view(*x.shape[:2], *m.shape[2:])
        out = out.flatten(0, 1)
    return out


def _psd_solve(G, B):
    """``X = B G⁻¹`` for batched PSD Gram matrices ``G`` (overwritten). A tiny ridge ``λ`` keeps Cholesky
    alive when ``G`` is singular (giving ≈ the minimum-norm solution); one refinement step, with the
    residual ``B - X (G + λ) + λ X``, squares the ridge's relative bias away."""
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
    ridge = 1e-12 * torch.where(scale > 0, scale, 1.0)  # G = 0 (a zero factor): X = 0 after all
    G.diagonal(dim1=-2, dim2=-1).add_(ridge)
    L = torch.linalg.cholesky(G)

    def solve(B):  # B (L Lᵀ)⁻¹
        B = torch.linalg.solve_triangular(L.mT, B, upper=True, left=False)
        return torch.linalg.solve_triangular(L, B, upper=False, left=False)

    X = solve(B)
    return X + solve(B - X @ G + ridge[..., None] * X)


def _solve_last(target, M, ks, g):
    """Least-squares ``X`` of shape ``(n, c/g, *ks)`` with ``X ⊛ M ≈ target``: ``X = Y D⁺`` per group via
    the smaller Gram matrix. ``DᵀD`` is ``MᵀM`` summed at the offsets ``v``; ``Z Dᵀ`` is a correlation."""
    Mg = M.unflatten(0, (g, -1))  # (g, c, i, *S)
    c, i, S, T = Mg.shape[1], Mg.shape[2], Mg.shape[3:], target.shape[2:]
    Y, Mf = target.unflatten(0, (g, -1)), Mg.flatten(2)  # (g, n/g, i, *T), (g, c, i*|S|)

    def corr(Z):  # Z Dᵀ: (g, q, i, *T) -> (g, q, c * |ks|)
        parts = [Z[(_ALL,) * 3 + _window(v, S)].flatten(2) @ Mf.mT for v in _shifts(ks)]
        return torch.stack(parts, -1).flatten(2)

    if c * math.prod(ks) >= i * math.prod(T):  # tall D: X = Y (DᵀD)⁻¹ Dᵀ
        A = (Mf.mT @ Mf).view(g, i, *S, i, *S)
        G = M.new_zeros(g, i, *T, i, *T)
        for v in _shifts(ks):
            G[(_ALL,) * 2 + _window(v, S) + (_ALL,) + _window(v, S)] += A
        X = corr(_psd_solve(G.view(g, i * math.prod(T), -1), Y.flatten(2)).view(Y.shape))
    else:  # wide D: X = Y Dᵀ (D Dᵀ)⁻¹
        D = M.new_zeros(g, c, *ks, i, *T)
        for v in _shifts(ks):
            D[(_ALL,) * 2 + v + (_ALL,) + _window(v, S)] = Mg
        X = _psd_solve(corr(D.view(g, -1, i, *T)), corr(Y))
    return X.reshape(-1, c, *ks)


def _solve_first(target, R, ks, g):
    """Least-squares first factor ``A`` with ``R ⊛ A ≈ target``: the last factor of the transposed chain."""
    return _t(_solve_last(_t(target, g), _t(R, g), ks, g), g)


def _plan(widths, taps):
    """``(score, plan)``: the peeling plan maximising ``score``, the worst rows/cols ratio of its designs.

    A step fixes the first ``j`` (``j > 0``) or last ``-j`` factors and solves for the composite of the
    rest. Fixing ``a..j`` of the free ``a..b`` gives ``min_k widths[k+1] * |taps of k+1..b|`` rows over
    ``k`` in ``a..j`` (the narrowest cut bounds the rank) for ``widths[a] * |taps of a..b|`` columns."""

    @functools.cache
    def best(a, b):  # factors a..b (inclusive) are still free
        if a == b:
            return math.inf, ()
        size, options = _size(taps[a : b + 1]), []
        for j in range(a, b):  # fix a..j, solve j+1..b
            rows = min(widths[k + 1] * _size(taps[k + 1 : b + 1]) for k in range(a, j + 1))
            score, sub = best(j + 1, b)
            options.append((min(rows / (widths[a] * size), score), (j - a + 1,) + sub))
        for j in range(a + 1, b + 1):  # fix j..b, solve a..j-1 (mirror image)
            rows = min(widths[k] * _size(taps[a:k]) for k in range(j, b + 1))
            score, sub = best(a, j - 1)
            options.append((min(rows / (widths[b + 1] * size), score), (j - b - 1,) + sub))
        return max(options, key=lambda o: o[0])  # of equals: the first (fewest factors fixed, from the left)

    return best(0, len(taps) - 1)


def _peel(target, ws, g, plan):
    """Follow ``plan``: fix factors at one end, solve for the composite of the others, recurse into it."""
    if not plan:
        return [target]
    j = plan[0]
    if j > 0:
        rest = _solve_last(target, _compose(ws[:j], g), _taps(w.shape[2:] for w in ws[j:]), g)
        return ws[:j] + _peel(rest, ws[j:], g, plan[1:])
    rest = _solve_first(target, _compose(ws[j:], g), _taps(w.shape[2:] for w in ws[:j]), g)
    return _peel(rest, ws[:j], g, plan[1:]) + ws[j:]


def fit_chain(
    target: torch.Tensor, init: list[torch.Tensor], groups: int = 1, *, tol: float = 1e-10, max_iter: int = 50
) -> FitResult:
    """Least-squares fit of chain factors (shapes given by `init`, which are also the starting point and are
    not modified) so that their composition equals `target`."""
    start, g = time.perf_counter(), groups
    ws = [w.detach().to(torch.float64, copy=True) for w in init]
    K = target.detach().to(device=ws[0].device, dtype=torch.float64)
    norm = K.norm().item()

    def residual(ws):
        return (_compose(ws, g) - K).norm().item() / norm if norm > 0 else 0.0

    widths = (ws[0].shape[1],) + tuple(w.shape[0] // g for w in ws)
    score, plan = _plan(widths, tuple(tuple(w.shape[2:]) for w in ws))
    if score >= 1:  # otherwise some stage is short of rows: peeling cannot be exact, go straight to ALS
        ws = _peel(K, ws, g, plan)
    res, it, beta = residual(ws), 0, 1.0
    while res > tol and it < max_iter:  # alternating least squares on the two end factors
        it, old = it + 1, list(ws)
        ws[-1] = _solve_last(K, _compose(ws[:-1], g), tuple(ws[-1].shape[2:]), g)
        ws[0] = _solve_first(K, _compose(ws[1:], g), tuple(ws[0].shape[2:]), g)
        prev, res = res, residual(ws)
        trial = [w + beta * (w - o) for w, o in zip(ws, old, strict=True)]  # extrapolate along the sweep
        if (res_trial := residual(trial)) < res:  # (ALS line search: roughly halves the sweeps needed)
            ws, res, beta = trial, res_trial, beta * 1.5
        else:
            beta = max(1.0, beta / 2)
        if res > 0.95 * prev:  # < 5 % per sweep (0.95 ** 50 = 0.08): too narrow to be exact, or a local optimum
            break
    out = [w.to(dtype=v.dtype, device=v.device) for w, v in zip(ws, init, strict=True)]
    if any(w.dtype != torch.float64 for w in out):  # report the residual of what is returned, rounding included
        res = residual([w.to(torch.float64) for w in out])
    return FitResult(out, res, it, time.perf_counter() - start)
