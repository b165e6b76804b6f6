"""WKV computed in chunks of time, in parallel: the algorithm of the chunked CUDA kernel
(notebook 06_wkv).

The recurrence of `rwkv_lib.wkv` is sequential in time: one thread per (batch row,
channel) walks over all T tokens. At batch 1 that is only C threads, far too few for a
GPU. But the state update is linear in the unscaled state (A, B) = (a e^p, b e^p):

    A <- e^w A + e^k v,    B <- e^w B + e^k

so a chunk of n tokens maps the state it receives to

    A_out = e^{n w} A_in + A_own,    B_out = e^{n w} B_in + B_own,

where (A_own, B_own) is what the chunk computes from the empty state. In the scaled form
(a, b, p) two such pieces combine with the same max trick as a single token
(`combine`), and combining is associative. So the forward pass is:

1. every chunk computes its own state from the empty state, all chunks in parallel;
2. an inclusive scan over the chunks (here the Hillis-Steele scan the GPU runs: log2 J
   rounds, each combining chunk j with chunk j - offset) gives the state entering every
   chunk;
3. every chunk computes its outputs from its incoming state, all chunks in parallel.

The backward pass mirrors it. The adjoints (dL/dA, dL/dB) also obey a linear
recurrence, backwards in time, with the same decay: across a chunk

    ga_start = f * ga_end + ga_own,    gb_start = f * gb_end + gb_own

(scaled like a and b; f is the product of the per-token decay weights, at most 1).
So: recompute the incoming forward states (steps 1-2), let every chunk compute its own
adjoint from a zero adjoint at its end, scan those maps over the chunks from the last
one back (a suffix scan), and finally let every chunk run the ordinary backward step
over its tokens from the right incoming state and the right outgoing adjoint. That
last pass is the sequential backward pass restricted to the chunk, so the gradients of
k, v, w and u are its per-token terms, summed; no term of the chunk boundaries is
missing.

The gradient along p. The final p is the maximum chain p' = max(p + w, k): a loss that
uses p directly (not only through A and B) sends dL/dp_T - dL/da_T a_T - dL/db_T b_T
back along that chain, to the k (or the initial p) where the maximum was attained, and
to w for every step where the past won. Each chunk passes it on (s = 1) only if the past
won at all of its tokens. `exact_p=False` drops that term, which is right whenever the
final state is used only through A and B (as by a following call).

Everything here is vectorized over (B, chunk, C) and computed in the dtype of k
(float32 for half-precision inputs), so float64 inputs give a float64 reference. The
CUDA kernel (cuda/wkv_cuda_chunked.cu, with its arithmetic in cuda/wkv_chunked.h) uses
the same names for the same quantities.
"""

from __future__ import annotations

import math

import torch

from .wkv import P_INIT, WKVState, compute_dtype

DECAY_MIN = -1e38  # n*w is clamped here, so that p + n*w stays finite (p >= -1e38)
Tensor = torch.Tensor


def chunk_layout(T: int, chunk_len: int) -> tuple[int, int]:
    """(J, L): the number of chunks and the tokens per chunk; the last may be shorter."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    return max(1, math.ceil(T / chunk_len)), chunk_len


def rescale(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """m = max(x, y), e^{x-m}, e^{y-m}, and whether x won (ties go to x), as wkv_rescale."""
    d = x - y
    x_larger = d >= 0
    e = torch.exp(torch.where(x_larger, -d, d))
    one = torch.ones_like(e)
    return (torch.where(x_larger, x, y), torch.where(x_larger, one, e),
            torch.where(x_larger, e, one), x_larger)


def chunk_decay(w: Tensor, n: Tensor) -> Tensor:
    """n*w, the decay over n tokens, clamped at -1e38 (e^{-1e38} is 0 anyway)."""
    return torch.clamp(n * w, min=DECAY_MIN)


def combine(w: Tensor, a_left: Tensor, b_left: Tensor, p_left: Tensor, n_right: Tensor,
            a: Tensor, b: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The state after a left piece then a right piece of n_right tokens.

    (a, b, p) is the right piece's own state (from the empty state). The left state decays
    by e^{n_right w}; with n_right = 1 and (a, b, p) = (v, 1, k) this is one update step.
    """
    q, e_left, e_right, _ = rescale(p_left + chunk_decay(w, n_right), p)
    return e_left * a_left + e_right * a, e_left * b_left + e_right * b, q


def update_step(w, k, v, a, b, p):
    """The state after one token: decay the past by e^w, add e^k (docs/rwkv4.md, section 7.3)."""
    q, e1, e2, past = rescale(p + w, k)
    return e1 * a + e2 * v, e1 * b + e2, q, past


def forward_step(w, u, k, v, a, b, p):
    """y for one token and the state after it."""
    _, e1, e2, _ = rescale(p, u + k)
    y = (e1 * a + e2 * v) / (e1 * b + e2)
    a, b, p, _ = update_step(w, k, v, a, b, p)
    return y, a, b, p


def backward_step(w, u, k, v, gy, a, b, p, ga, gb, gP):
    """One token of the backward pass, with the gradient gP along the p chain.

    In: the state (a, b, p) before the token and the scaled adjoints (ga, gb) and gP after
    it. Out: (ga, gb, gP) before it, this token's dL/dw, dL/du, dL/dk, dL/dv terms, and
    the token's decay weight e1u (the factor the adjoints were multiplied by).
    """
    _, e1o, e2o, _ = rescale(p, u + k)  # output weights
    inv_den = 1 / (e1o * b + e2o)
    y = (e1o * a + e2o * v) * inv_den
    g = gy * inv_den
    _, e1u, e2u, past = rescale(p + w, k)  # update weights; past: p' = p + w, else p' = k
    g_now = g * e2o
    g_uk = g_now * (v - y)
    zero = torch.zeros_like(gP)
    gk = g_uk + e2u * (ga * v + gb) + torch.where(past, zero, gP)
    gv = g_now + e2u * ga
    gw = e1u * (ga * a + gb * b) + torch.where(past, gP, zero)
    g_past = g * e1o
    return (g_past + e1u * ga, e1u * gb - g_past * y, torch.where(past, gP, zero),
            gw, g_uk, gk, gv, e1u, past)


def _split(x: Tensor, J: int, L: int) -> Tensor:
    """(B, T, C) -> (B, J, L, C), zero-padded at the end."""
    B, T, C = x.shape
    padded = x.new_zeros(B, J * L, C)
    padded[:, :T] = x
    return padded.view(B, J, L, C)


def _where(mask: Tensor, new: tuple, old: tuple) -> tuple:
    return tuple(torch.where(mask, n, o) for n, o in zip(new, old, strict=True))


class _Prepared:
    """Inputs in the compute dtype, split into chunks, and the chunk bookkeeping."""

    def __init__(self, time_decay, time_first, k, v, chunk_len, state):
        self.dtype = dtype = compute_dtype(k.dtype)
        B, T, C = k.shape
        self.B, self.T, self.C = B, T, C
        self.J, self.L = J, L = chunk_layout(T, chunk_len)
        # w = -exp(time_decay), kept finite, as the C++ op does
        self.w = -torch.exp(time_decay.to(dtype)).clamp(max=1e38)
        self.u = time_first.to(dtype)
        self.k = _split(k.to(dtype), J, L)
        self.v = _split(v.to(dtype), J, L)
        t = torch.arange(J * L, device=k.device).view(J, L)
        self.valid = (t < T).view(1, J, L, 1)  # padding at the end of the last chunk
        self.n = (t < T).sum(1).to(dtype).view(1, J, 1)  # tokens per chunk (J,)
        if state is None:
            a0 = torch.zeros(B, C, dtype=dtype, device=k.device)
            state = (a0, a0.clone(), torch.full_like(a0, P_INIT))
        self.a0, self.b0, self.p0 = (s.to(dtype) for s in state)


def _own_states(P: _Prepared):
    """Step 1: the state of every chunk from the empty state, all chunks at once."""
    shape = (P.B, P.J, P.C)
    a = torch.zeros(shape, dtype=P.dtype, device=P.k.device)
    b = torch.zeros_like(a)
    p = torch.full_like(a, P_INIT)
    for i in range(P.L):
        new = update_step(P.w, P.k[:, :, i], P.v[:, :, i], a, b, p)[:3]
        a, b, p = _where(P.valid[:, :, i], new, (a, b, p))
    return a, b, p


def _incoming_states(P: _Prepared):
    """Steps 1-2: the state entering every chunk, (B, J, C) each."""
    a, b, p = _own_states(P)
    n = P.n.expand_as(a)
    # chunk 0 starts from the initial state: fold it in before the scan
    a0, b0, p0 = combine(P.w, P.a0, P.b0, P.p0, n[:, 0], a[:, 0], b[:, 0], p[:, 0])
    a, b, p = (torch.cat([x0[:, None], x[:, 1:]], 1) for x0, x in ((a0, a), (b0, b), (p0, p)))
    # Hillis-Steele inclusive scan: after the round with `offset`, chunk j holds the
    # combination of chunks max(0, j - 2*offset + 1) .. j.
    j = torch.arange(P.J, device=a.device).view(1, P.J, 1)
    offset = 1
    while offset < P.J:
        shifted = [torch.roll(x, offset, dims=1) for x in (a, b, p, n)]  # chunk j - offset
        a_l, b_l, p_l, n_l = shifted
        new = (*combine(P.w, a_l, b_l, p_l, n, a, b, p), n_l + n)
        a, b, p, n = _where(j >= offset, new, (a, b, p, n))
        offset *= 2
    # exclusive: chunk j receives the inclusive prefix of chunk j - 1
    a_in = torch.cat([P.a0[:, None], a[:, :-1]], 1)
    b_in = torch.cat([P.b0[:, None], b[:, :-1]], 1)
    p_in = torch.cat([P.p0[:, None], p[:, :-1]], 1)
    return a_in, b_in, p_in


def wkv_chunked_forward(
    time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, chunk_len: int,
    state: WKVState | None = None,
) -> tuple[Tensor, WKVState]:
    """y (B, T, C) in k's dtype and the final state (a, b, p), as rwkv_lib.wkv computes them."""
    P = _Prepared(time_decay, time_first, k, v, chunk_len, state)
    a, b, p = _incoming_states(P)
    ys = []
    for i in range(P.L):  # step 3: all chunks' outputs at once, one token position at a time
        y, *new = forward_step(P.w, P.u, P.k[:, :, i], P.v[:, :, i], a, b, p)
        a, b, p = _where(P.valid[:, :, i], tuple(new), (a, b, p))
        ys.append(y)
    y = torch.stack(ys, 2).reshape(P.B, P.J * P.L, P.C)[:, :P.T]
    # the final state is the state after the last chunk
    return y.to(k.dtype), (a[:, -1], b[:, -1], p[:, -1])


def _compose(mine: tuple, later: tuple) -> tuple:
    """The adjoint map of chunks j.. (mine) followed by later chunks (later), both
    g -> f g + o for (ga, gb), and gP -> s gP + oP for the p chain."""
    f, oa, ob, s, oP = mine
    f2, oa2, ob2, s2, oP2 = later
    return f * f2, oa + f * oa2, ob + f * ob2, s * s2, oP + s * oP2


def wkv_chunked_backward(
    time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, grad_y: Tensor,
    chunk_len: int, state: WKVState | None = None,
    grad_state: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
    exact_p: bool = True,
) -> tuple[Tensor, ...]:
    """Gradients of time_decay, time_first, k, v and of the initial state (a, b, p), by hand.

    grad_state: dL/d(a_T, b_T, p_T), any of them None for zero. With exact_p=False the
    gradient along the p chain is dropped (as if dL/dp_T = dL/da_T a_T + dL/db_T b_T).
    """
    P = _Prepared(time_decay, time_first, k, v, chunk_len, state)
    B, J, L, C, dtype = P.B, P.J, P.L, P.C, P.dtype
    gy = _split(grad_y.to(dtype), J, L)
    zeros = torch.zeros(B, C, dtype=dtype, device=k.device)
    gaT, gbT, gpT = ((zeros if g is None else g.to(dtype)) for g in (grad_state or (None,) * 3))

    # Steps 1-2: the incoming forward states.
    a, b, p = _incoming_states(P)
    # Step 3: walk every chunk forward, keeping the state before each token; s says
    # whether the past won at every token of the chunk (the p chain passes through it).
    saved = []
    s = torch.ones(B, J, C, dtype=torch.bool, device=k.device)
    for i in range(L):
        saved.append((a, b, p))
        *new, past = update_step(P.w, P.k[:, :, i], P.v[:, :, i], a, b, p)
        valid = P.valid[:, :, i]
        a, b, p = _where(valid, tuple(new), (a, b, p))
        s = s & (past | ~valid)
    aT, bT = a[:, -1], b[:, -1]
    gPT = gpT - gaT * aT - gbT * bT if exact_p else zeros  # dL/dp_T not explained by A, B

    # Step 4: every chunk's own adjoint map, from a zero adjoint at its end.
    ga = torch.zeros(B, J, C, dtype=dtype, device=k.device)
    gb, gP = torch.zeros_like(ga), torch.zeros_like(ga)
    f = torch.ones_like(ga)
    for i in reversed(range(L)):
        a_i, b_i, p_i = saved[i]
        out = backward_step(P.w, P.u, P.k[:, :, i], P.v[:, :, i], gy[:, :, i], a_i, b_i, p_i,
                            ga, gb, gP)
        valid = P.valid[:, :, i]
        ga, gb = _where(valid, out[:2], (ga, gb))
        f = torch.where(valid, f * out[7], f)
    sf = s.to(dtype)
    maps = [f, ga, gb, sf, torch.zeros_like(ga)]
    # fold the terminal adjoint (after the last token) into the last chunk's map
    last = (f[:, -1] * gaT + ga[:, -1], f[:, -1] * gbT + gb[:, -1], sf[:, -1] * gPT)
    for x, value in zip((maps[1], maps[2], maps[4]), last, strict=True):
        x[:, -1] = value
    maps[0][:, -1] = 0
    maps[3][:, -1] = 0
    # Suffix scan (Hillis-Steele, from the end): chunk j composes its map with chunk j+offset's.
    j = torch.arange(J, device=k.device).view(1, J, 1)
    offset = 1
    while offset < J:
        later = [torch.roll(x, -offset, dims=1) for x in maps]  # chunk j + offset
        maps = list(_where(j + offset < J, _compose(tuple(maps), tuple(later)), tuple(maps)))
        offset *= 2
    # the adjoint at the end of chunk j is the one at the start of chunk j + 1
    ga = torch.cat([maps[1][:, 1:], gaT[:, None]], 1)
    gb = torch.cat([maps[2][:, 1:], gbT[:, None]], 1)
    gP = torch.cat([maps[4][:, 1:], gPT[:, None]], 1)

    # Step 5: the backward step over every chunk from its true boundary values.
    gk, gv = torch.zeros_like(P.k), torch.zeros_like(P.k)
    gw = torch.zeros(B, J, C, dtype=dtype, device=k.device)
    gu = torch.zeros_like(gw)
    for i in reversed(range(L)):
        a_i, b_i, p_i = saved[i]
        out = backward_step(P.w, P.u, P.k[:, :, i], P.v[:, :, i], gy[:, :, i], a_i, b_i, p_i,
                            ga, gb, gP)
        valid = P.valid[:, :, i]
        ga, gb, gP = _where(valid, out[:3], (ga, gb, gP))
        gw = gw + torch.where(valid, out[3], 0)
        gu = gu + torch.where(valid, out[4], 0)
        gk[:, :, i], gv[:, :, i] = out[5], out[6]
    ga0, gb0, gP0 = ga[:, 0], gb[:, 0], gP[:, 0]
    gp0 = ga0 * P.a0 + gb0 * P.b0 + gP0  # p0 scales A0 and B0, and starts the chain
    grad_time_decay = gw.sum((0, 1)) * P.w  # chain rule through w = -exp(time_decay)
    grad_time_first = gu.sum((0, 1))
    gk = gk.reshape(B, J * L, C)[:, :P.T]
    gv = gv.reshape(B, J * L, C)[:, :P.T]
    return grad_time_decay, grad_time_first, gk, gv, ga0, gb0, gp0
