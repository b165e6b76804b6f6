"""The RWKV-4 language model (notebooks 02_embedding, 03_token_shift and 07_model).

The same network runs in two modes:

- GPT mode, `model(idx)`: a whole (B, T) batch of sequences at once, for training.
- RNN mode, `model.step(token, state)`: one token at a time with a fixed-size state,
  for generation. Both give the same logits (tests/test_model.py checks it).

Parameter names follow RWKV-LM's RWKV-4 exactly, so state dicts move between the
two projects unchanged. The linear layers are `rwkv_lib.cpu_matmul.Linear`: nn.Linear,
except that on some CPUs their float32 products go to oneDNN instead of the BLAS. The
model is written down in docs/rwkv4.md (sections 3 to 11).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from . import rnn_step
from .cpu_matmul import Linear
from .wkv import P_INIT, compute_dtype, wkv

# RNN-mode state: one float32 tensor of shape (n_layer, 5, B, C). Per layer, the five
# C-vectors of docs/rwkv4.md, section 9, in this order:
STATE_ATT_X = 0  # previous input of time mixing (after ln1), for its token shift
STATE_A = 1  # WKV numerator / e^p
STATE_B = 2  # WKV denominator / e^p
STATE_P = 3  # the log-scale p of a and b: p <- max(p + w, k) (notebook 06), not a running max
STATE_FFN_X = 4  # previous input of channel mixing (after ln2), for its token shift
STATE_SIZE = 5


@dataclass
class RWKVConfig:
    vocab_size: int = 256
    n_layer: int = 12
    n_embd: int = 512
    ctx_len: int = 1024  # the training window; GPT mode itself has no length limit
    wkv_backend: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


class TokenShift(nn.Module):
    """xx[:, t] = x[:, t-1], xx[:, 0] = 0 (notebook 03).

    ZeroPad2d pads the last two dims (T, C) by (left, right, top, bottom) = (0, 0, 1, -1):
    nothing on the channel sides, one zero row on top of time, one row cut at the bottom.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 0, 1, -1))

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if prev is None:
            return self.pad(x)
        # Continuing a sequence: the row before t = 0 is the last input of the previous chunk.
        return torch.cat((prev.to(x.dtype).unsqueeze(1), x[:, :-1]), dim=1)


# Without autograd no intermediate is kept for a backward pass, so the helpers below write
# into a fresh tensor (one the caller made for them, or their own product) instead of
# allocating a new one: the same numbers bit for bit, and on a long prompt the allocations
# of (B, T, 4C) buffers cost more time than the arithmetic.

def mix(x: torch.Tensor, xx: torch.Tensor, mix_weight: torch.Tensor) -> torch.Tensor:
    """Per channel, interpolate between the current token and the previous one."""
    m = mix_weight.reshape(-1)  # stored as (1, 1, C); flat, it broadcasts over (B, C) too
    if torch.is_grad_enabled():
        return x * m + xx * (1 - m)
    return (x * m).add_(xx * (1 - m))  # the same sum, one buffer fewer


def sigmoid_of_fresh(r: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(r) if torch.is_grad_enabled() else torch.sigmoid_(r)


def squared_relu_of_fresh(k: torch.Tensor) -> torch.Tensor:
    return torch.square(torch.relu(k)) if torch.is_grad_enabled() else torch.relu_(k).square_()


def gate(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """r * y, where r is fresh."""
    return r * y if torch.is_grad_enabled() else r.mul_(y)


class TimeMix(nn.Module):
    """Time mixing ("att"): the WKV weighted average over the past, gated by receptance."""

    def __init__(self, config: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        self.backend = config.wkv_backend
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_shift = TokenShift()
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)

    def _kvr(self, x: torch.Tensor, xx: torch.Tensor):
        k = self.key(mix(x, xx, self.time_mix_k))
        v = self.value(mix(x, xx, self.time_mix_v))
        r = sigmoid_of_fresh(self.receptance(mix(x, xx, self.time_mix_r)))
        return k, v, r

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """GPT mode on (B, T, C). With `state` (this layer's (5, B, C) slice) the sequence
        continues from it, and the slice is updated in place."""
        if state is None:
            k, v, r = self._kvr(x, self.time_shift(x))
            y = wkv(self.time_decay, self.time_first, k, v, backend=self.backend)
            return self.output(gate(r, y))
        k, v, r = self._kvr(x, self.time_shift(x, state[STATE_ATT_X]))
        abp = (state[STATE_A], state[STATE_B], state[STATE_P])
        y, (a, b, p) = wkv(self.time_decay, self.time_first, k, v,
                           backend=self.backend, state=abp, return_state=True)
        state[STATE_ATT_X], state[STATE_A], state[STATE_B], state[STATE_P] = x[:, -1], a, b, p
        return self.output(gate(r, y))

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """RNN mode on one token x of shape (B, C); updates `state` (5, B, C) in place."""
        xx = state[STATE_ATT_X].to(x.dtype)
        k, v, r = self._kvr(x, xx)
        dtype = compute_dtype(x.dtype)  # float32 for half inputs, as in the WKV operator
        k, v = k.to(dtype), v.to(dtype)
        a, b, p = (state[i].to(dtype) for i in (STATE_A, STATE_B, STATE_P))
        w, u = -torch.exp(self.time_decay.to(dtype)), self.time_first.to(dtype)
        q = torch.maximum(p, u + k)
        e1, e2 = torch.exp(p - q), torch.exp(u + k - q)
        y = (e1 * a + e2 * v) / (e1 * b + e2)
        q = torch.maximum(p + w, k)
        e1, e2 = torch.exp(p + w - q), torch.exp(k - q)
        state[STATE_A], state[STATE_B], state[STATE_P] = e1 * a + e2 * v, e1 * b + e2, q
        state[STATE_ATT_X] = x
        return self.output(r * y.to(x.dtype))


class ChannelMix(nn.Module):
    """Channel mixing ("ffn"): a squared-ReLU MLP on the shifted input, gated by receptance."""

    def __init__(self, config: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        self.time_shift = TokenShift()
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, 4 * C, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(4 * C, C, bias=False)

    def _mlp(self, x: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        k = squared_relu_of_fresh(self.key(mix(x, xx, self.time_mix_k)))
        r = sigmoid_of_fresh(self.receptance(mix(x, xx, self.time_mix_r)))
        return gate(r, self.value(k))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if state is None:
            return self._mlp(x, self.time_shift(x))
        out = self._mlp(x, self.time_shift(x, state[STATE_FFN_X]))
        state[STATE_FFN_X] = x[:, -1]
        return out

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out = self._mlp(x, state[STATE_FFN_X].to(x.dtype))
        state[STATE_FFN_X] = x
        return out


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + att(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, config: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # normalizes the tiny embedding; named as in RWKV-LM
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + self.att(self.ln1(x), state)
        return x + self.ffn(self.ln2(x), state)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + self.att.step(self.ln1(x), state)
        return x + self.ffn.step(self.ln2(x), state)


class RWKV(nn.Module):
    def __init__(self, config: RWKVConfig) -> None:
        super().__init__()
        if config.n_layer < 1 or config.n_embd < 1 or config.vocab_size < 1:
            raise ValueError(f"RWKVConfig needs n_layer, n_embd, vocab_size >= 1, got {config}")
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self)

    def _check_idx(self, idx: torch.Tensor, dims: int) -> None:
        shape = "(B, T)" if dims == 2 else "(B,)"
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"RWKV: token ids must be a torch.Tensor of shape {shape}, got "
                            f"{type(idx).__name__}; convert with torch.as_tensor(ids)")
        if idx.dim() != dims or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"RWKV: expected integer token ids of shape {shape}, "
                             f"got {idx.dtype} {tuple(idx.shape)}")
        if idx.shape[0] == 0:
            raise ValueError("RWKV: the batch is empty (B = 0); give at least one sequence")
        if dims == 2 and idx.shape[1] == 0:
            raise ValueError("RWKV: the sequences are empty (T = 0); give at least one token")
        device = self.head.weight.device
        if idx.device != device:
            raise ValueError(f"RWKV: token ids are on {idx.device} but the model is on "
                             f"{device}; move them with .to({str(device)!r})")
        # Reading the ids' values would split a compiled graph in two; under torch.compile
        # an out-of-range id still fails, in the embedding lookup.
        if torch.compiler.is_compiling():
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size:
            raise ValueError(f"RWKV: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]; was the text encoded with "
                             f"the model's vocabulary?")

    def _check_state(self, state: torch.Tensor, batch_size: int) -> None:
        expected = (self.config.n_layer, STATE_SIZE, batch_size, self.config.n_embd)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"RWKV: state must be a tensor of shape {expected}, got "
                            f"{type(state).__name__}; make one with model.init_state(B)")
        if tuple(state.shape) != expected:
            raise ValueError(f"RWKV: state must have shape {expected} (n_layer, 5, B, C), "
                             f"got {tuple(state.shape)}; make one with model.init_state(B)")
        # The state is updated in place, in its own dtype: an integer or half-precision
        # state would silently round what it stores. It must be what init_state makes.
        weight = self.head.weight
        dtype = compute_dtype(weight.dtype)
        if state.dtype != dtype:
            raise TypeError(f"RWKV: state must be {dtype} for a {weight.dtype} model, got "
                            f"{state.dtype}; make one with model.init_state(B)")
        if state.device != weight.device:
            raise ValueError(f"RWKV: state is on {state.device} but the model is on "
                             f"{weight.device}; move it with .to({str(weight.device)!r})")

    def forward(
        self, idx: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """GPT mode: logits (B, T, V) for token ids (B, T).

        With `state` (from `init_state` or an earlier call) the sequences continue from it;
        `return_state=True` also returns the state after the last token (a new tensor).
        """
        self._check_idx(idx, 2)
        if return_state and state is None:
            state = self.init_state(idx.shape[0], idx.device)
        if state is not None:
            self._check_state(state, idx.shape[0])
        if state is not None:
            state = state.clone()
        x = self.emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, None if state is None else state[i])
        logits = self.head(self.ln_out(x))
        return (logits, state) if return_state else logits

    def init_state(
        self, batch_size: int = 1, device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The zero state of RNN mode: (n_layer, 5, B, C) with p = -infinity; float32
        (float64 for a float64 model), whatever the model's dtype."""
        weight = self.head.weight
        device = weight.device if device is None else device
        c = self.config
        state = torch.zeros(c.n_layer, STATE_SIZE, batch_size, c.n_embd, device=device,
                            dtype=compute_dtype(weight.dtype))
        state[:, STATE_P] = P_INIT
        return state

    def step(self, token: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RNN mode: logits (B, V) for one token per row (B,), and the next state (a new
        tensor; `state` is left as it was). `step_` saves that copy."""
        self._check_idx(token, 1)
        self._check_state(state, token.shape[0])
        state = state.clone()
        return self._step_in_place(token, state), state

    def step_(self, token: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """RNN mode in place: logits (B, V) for one token per row (B,); `state` becomes the
        next state. For a loop that has no use for the old state (generation)."""
        self._check_idx(token, 1)
        self._check_state(state, token.shape[0])
        return self._step_in_place(token, state)

    def _step_in_place(self, token: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # One C++ call for the whole model where it applies (rwkv_lib.rnn_step), else the
        # PyTorch ops of the blocks' step methods; the two agree to float rounding.
        weights = rnn_step.fused_weights(self, state)
        if weights is not None:
            return rnn_step.run(weights, token, state, self.ln_out.eps)
        x = self.emb(token)
        for i, block in enumerate(self.blocks):
            x = block.step(x, state[i])
        return self.head(self.ln_out(x))


def count_parameters(config: RWKVConfig) -> int:
    """Parameters of a model with this config, from the formula (no model is built).

    Per layer: 4 C x C (att) + C x 4C, 4C x C, C x C (ffn) + 5 C mixes/decays
    + 2 LayerNorms; plus embedding, head, ln0 and ln_out.
    """
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    per_layer = 4 * C * C + (4 * C * C + 4 * C * C + C * C) + 5 * C + 2 * 2 * C + 2 * C
    return 2 * V * C + L * per_layer + 2 * 2 * C


@torch.no_grad()
def init_weights(model: RWKV) -> None:
    """RWKV-4's initialization (docs/rwkv4.md, section 11)."""
    c = model.config
    L, C, V = c.n_layer, c.n_embd, c.vocab_size
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    head_gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
    nn.init.orthogonal_(model.head.weight, gain=head_gain)
    channel = torch.arange(C, dtype=torch.float64)
    d = channel / C
    for l, block in enumerate(model.blocks):
        r0 = l / (L - 1) if L > 1 else 0.0
        r1 = 1.0 - l / L
        att, ffn = block.att, block.ffn
        ramp = channel / (C - 1) if C > 1 else torch.zeros(C, dtype=torch.float64)
        att.time_decay.copy_(-5 + 8 * ramp ** (0.7 + 1.3 * r0))
        att.time_first.copy_(math.log(0.3) + 0.5 * ((channel + 1) % 3 - 1))
        att.time_mix_k.copy_((d ** r1).view(1, 1, C))
        att.time_mix_v.copy_((d ** r1 + 0.3 * r0).view(1, 1, C))
        att.time_mix_r.copy_((d ** (0.5 * r1)).view(1, 1, C))
        ffn.time_mix_k.copy_((d ** r1).view(1, 1, C))
        ffn.time_mix_r.copy_((d ** r1).view(1, 1, C))
        for linear in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
            nn.init.zeros_(linear.weight)
        for linear in (att.value, ffn.key):
            out_f, in_f = linear.weight.shape
            gain = math.sqrt(out_f / in_f) if out_f > in_f else 1.0
            nn.init.orthogonal_(linear.weight, gain=gain)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def state_dict_names(config: RWKVConfig) -> list[str]:
    """The parameter names of docs/rwkv4.md, section 10, in RWKV-LM's order."""
    names = ["emb.weight"]
    for l in range(config.n_layer):
        p = f"blocks.{l}."
        if l == 0:
            names += [p + "ln0.weight", p + "ln0.bias"]
        names += [p + "ln1.weight", p + "ln1.bias", p + "ln2.weight", p + "ln2.bias"]
        names += [p + "att." + n for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v",
                                           "time_mix_r", "key.weight", "value.weight",
                                           "receptance.weight", "output.weight")]
        names += [p + "ffn." + n for n in ("time_mix_k", "time_mix_r", "key.weight",
                                           "receptance.weight", "value.weight")]
    return names + ["ln_out.weight", "ln_out.bias", "head.weight"]
