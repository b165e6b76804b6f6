"""The WKV operator of RWKV-4, and the choice of how to compute it (notebook 06_wkv).

For one batch row and one channel, with w = -exp(time_decay) < 0 and u = time_first:

    y_t = ( sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t )
        / ( sum_{i<t} e^{(t-1-i)w + k_i}     + e^{u+k_t}     )

Backends, all behind the one entry point `wkv(...)`:

- "definition": the formula above, evaluated for every (t, i) pair at once. O(T^2) memory;
  for teaching and as the float64 oracle of the tests.
- "pytorch": the numerically stable recurrence, a Python loop over time; autograd
  differentiates it. Slow, but short and obviously right.
- "cpp" / "cuda": the hand-written C++ and CUDA kernels of `cuda/`, differentiable through
  `rwkv_lib.wkv_op` (built and loaded by `rwkv_lib.extension`).
- "auto": the kernel for the tensors' device, falling back to "pytorch" (with one warning
  that says why) when the extension cannot be built.

A state (a, b, p), each (B, C) in float32 (float64 for float64 inputs), lets a long
sequence be processed in chunks: numerator = a*e^p, denominator = b*e^p.
"""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "definition", "pytorch", "cpp", "cuda")
P_INIT = -1e38  # "minus infinity" that stays finite, so p - q never gives inf - inf = nan

WKVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_warned_fallback = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in float32: exp() and long sums need the range.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_state_types(state: WKVState | None, op: str = "wkv") -> None:
    """Raise a clear error unless `state` is None or a tuple of three floating-point tensors."""
    if state is None:
        return
    if not isinstance(state, (tuple, list)):
        raise TypeError(f"{op}: state must be a tuple (a, b, p) of three tensors, as returned "
                        f"with return_state=True, got {type(state).__name__}")
    if len(state) != 3:
        raise ValueError(f"{op}: state must be a tuple (a, b, p) of three tensors, "
                         f"got {len(state)} items")
    for name, s in zip("abp", state, strict=True):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: state {name} must be a tensor, got {type(s).__name__}")
        if not s.is_floating_point():
            raise TypeError(f"{op}: state {name} must be a floating-point tensor (float32, "
                            f"float64 for float64 inputs), got {s.dtype}")


def check_wkv_inputs(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
) -> None:
    """Raise a clear error when types, shapes, dtypes or devices do not fit together."""
    for name, t in (("time_decay", time_decay), ("time_first", time_first), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"wkv: {name} must be a tensor, got {type(t).__name__}")
    if k.dim() != 3:
        raise ValueError(f"wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"wkv: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    B, T, C = k.shape
    if T == 0:
        raise ValueError("wkv: the sequence is empty (T = 0)")
    for name, t in (("time_decay", time_decay), ("time_first", time_first)):
        if t.shape != (C,):
            raise ValueError(f"wkv: {name} must have shape ({C},) to match k, got {tuple(t.shape)}")
    tensors = {"time_decay": time_decay, "time_first": time_first, "k": k, "v": v}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"wkv: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"wkv: {name} is on {t.device} but k is on {k.device}; move both")
    check_state_types(state)
    if state is not None:
        for name, s in zip("abp", state, strict=True):
            if s.shape != (B, C):
                raise ValueError(f"wkv: state {name} must have shape ({B}, {C}), "
                                 f"got {tuple(s.shape)}")
            if s.device != k.device:
                raise ValueError(f"wkv: state {name} is on {s.device} but k is on {k.device}")


def initial_state(
    batch_size: int, n_channels: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WKVState:
    """The state before the first token: empty sums (a = b = 0) and p = -infinity."""
    a = torch.zeros(batch_size, n_channels, device=device, dtype=dtype)
    return a, a.clone(), torch.full_like(a, P_INIT)


def wkv_definition(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    safe: bool = True,
) -> torch.Tensor:
    """The formula itself, for all t at once.

    exponent[b, t, i, c] = (t-1-i)*w[c] + k[b, i, c] for i < t, u[c] + k[b, t, c] for i = t.
    With safe=False the sums of e^exponent are taken literally and overflow for large k;
    with safe=True the same weights are computed as a softmax over i, which subtracts the
    largest exponent first and never overflows.
    """
    T = k.shape[1]
    w = -torch.exp(time_decay)
    t = torch.arange(T, device=k.device)
    steps_back = (t[:, None] - 1 - t[None, :]).to(k.dtype)  # (T, T): t-1-i
    exponent = steps_back[None, :, :, None] * w + k[:, None, :, :]  # (B, T, T, C)
    diagonal = (time_first + k)[:, :, None, :]  # the current token gets u instead of -w
    is_diag = (t[:, None] == t[None, :])[None, :, :, None]
    exponent = torch.where(is_diag, diagonal.expand_as(exponent), exponent)
    future = (t[None, :] > t[:, None])[None, :, :, None]
    exponent = exponent.masked_fill(future, float("-inf"))  # token i > t is not visible at t
    if safe:
        weights = torch.softmax(exponent, dim=2)
        return (weights * v[:, None, :, :]).sum(dim=2)
    e = torch.exp(exponent)
    return (e * v[:, None, :, :]).sum(dim=2) / e.sum(dim=2)


def wkv_pytorch(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    state: WKVState | None = None, return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WKVState]:
    """The stable recurrence (docs/rwkv4.md, section 7.3), one time step per loop iteration."""
    in_dtype = k.dtype
    dtype = compute_dtype(in_dtype)
    B, _, C = k.shape
    w = -torch.exp(time_decay.to(dtype))
    u = time_first.to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    if state is None:
        a, b, p = initial_state(B, C, k.device, dtype)
    else:
        a, b, p = (s.to(dtype) for s in state)
    ys = []
    # unbind, not k[:, t]: the backward of each k[:, t] would write into a fresh (B, T, C)
    # tensor of zeros, which makes the backward pass quadratic in T
    for kt, vt in zip(k.unbind(1), v.unbind(1), strict=True):
        # output: the current token enters with bonus u, the past with its running sums
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        ys.append((e1 * a + e2 * vt) / (e1 * b + e2))
        # update: decay the past by w, then add the current token without the bonus
        q = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    y = torch.stack(ys, dim=1).to(in_dtype)
    return (y, (a, b, p)) if return_state else y


def _extension(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    state: WKVState | None, return_state: bool,
):
    from .wkv_op import wkv_extension  # imported lazily: it imports the build machinery

    return wkv_extension(time_decay, time_first, k, v, state=state, return_state=return_state)


def wkv(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    *, backend: str = "auto", state: WKVState | None = None, return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WKVState]:
    """WKV of RWKV-4: y of shape (B, T, C), and the final state when `return_state`.

    time_decay, time_first: (C,); k, v: (B, T, C). `state` is an optional (a, b, p) to
    continue from. Gradients flow to all four inputs, and through `state` when it comes
    from an earlier call (chunks then get the same gradients as one long call).
    """
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"wkv: unknown backend {backend!r}; choose one of {BACKENDS}")
    check_wkv_inputs(time_decay, time_first, k, v, state)
    if backend == "definition":
        if state is not None or return_state:
            raise ValueError("wkv: the 'definition' backend has no state; use 'pytorch'")
        dtype = compute_dtype(k.dtype)
        y = wkv_definition(*(t.to(dtype) for t in (time_decay, time_first, k, v)))
        return y.to(k.dtype)
    if backend == "pytorch":
        return wkv_pytorch(time_decay, time_first, k, v, state, return_state)
    if backend in ("cpp", "cuda"):
        wanted = "cuda" if backend == "cuda" else "cpu"
        if k.device.type != wanted:
            raise ValueError(f"wkv: backend {backend!r} needs {wanted} tensors, got {k.device}")
        return _extension(time_decay, time_first, k, v, state, return_state)
    # auto
    from .extension import ExtensionUnavailable

    if k.device.type in ("cpu", "cuda"):
        try:
            return _extension(time_decay, time_first, k, v, state, return_state)
        except ExtensionUnavailable as err:
            if not _warned_fallback:
                warnings.warn(
                    f"wkv: the C++/CUDA operator is unavailable, using the slow PyTorch "
                    f"backend instead. {err}", RuntimeWarning, stacklevel=2,
                )
                _warned_fallback = True
    return wkv_pytorch(time_decay, time_first, k, v, state, return_state)
