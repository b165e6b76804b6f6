// RNN mode of the whole RWKV-4 model in one call on the CPU: one token per batch row,
// the state (n_layer, 5, B, C) updated in place, the logits (B, V) returned.
//
// Why a kernel for something PyTorch already does op by op: per token, each layer runs
// about 40 small operations. At small widths each costs more in dispatch than in
// arithmetic, and at large widths the time goes into reading the weight matrices once
// per token (matrix-vector products are memory-bound). This kernel makes one pass:
// per layer four matrix-vector phases, with the element-wise work (layer norm, token
// shift mixes, the WKV step, sigmoid, squared ReLU, residual adds) folded into them, and
// one OpenMP team for the whole model, which meets at four barriers per layer instead of
// forking threads for every product.
//
// Work split: thread t owns a contiguous range of output rows of every matrix. The
// residual stream x (B x C) and the layer-norm outputs are small, so every thread keeps
// its own full copy and computes them redundantly (identical code on identical data gives
// identical values), which needs no barrier; only the outputs of the products are shared.
//
// Weights are float32 or float64 (the model's own parameters, no copy), or bfloat16 for
// the matrices (half the bytes to read per token) with float32 for everything else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The SIMD variants of expf/exp, as in wkv_cpu.cpp (see the comment there).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(__FAST_MATH__)
extern "C" float expf(float) noexcept __attribute__((__simd__("notinbranch")));
extern "C" double exp(double) noexcept __attribute__((__simd__("notinbranch")));
#endif

#include "wkv_math.h"

namespace {

#define STEP_RESTRICT __restrict__

// A weight element in the compute type. bfloat16 is the top half of a float32.
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(c10::BFloat16 x) {
    const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Four rows of a row-major matrix times one vector: four independent sums, so the
// loads of four rows are in flight together and x is read once for them.
template <typename F, typename W>
inline void dot4(const W* STEP_RESTRICT w, int64_t n, const F* STEP_RESTRICT x, F* out) {
    const W* STEP_RESTRICT w0 = w;
    const W* STEP_RESTRICT w1 = w + n;
    const W* STEP_RESTRICT w2 = w + 2 * n;
    const W* STEP_RESTRICT w3 = w + 3 * n;
    F a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < n; ++i) {
        const F xi = x[i];
        a0 += widen(w0[i]) * xi;
        a1 += widen(w1[i]) * xi;
        a2 += widen(w2[i]) * xi;
        a3 += widen(w3[i]) * xi;
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
}

template <typename F, typename W>
inline F dot1(const W* STEP_RESTRICT w, int64_t n, const F* STEP_RESTRICT x) {
    F a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < n; ++i) a += widen(w[i]) * x[i];
    return a;
}

// y(b, j) = W[j] . x[b] for rows j in [j0, j1) and every batch row b; `store(b, j, y)`
// receives each result (the epilogue: plain store, activation, residual add).
template <typename F, typename W, typename Store>
inline void matvec_rows(const W* w, int64_t n_in, int64_t j0, int64_t j1, const F* x,
                        int64_t B, const Store& store) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
        for (int64_t b = 0; b < B; ++b) {
            F o[4];
            dot4(w + j * n_in, n_in, x + b * n_in, o);
            for (int q = 0; q < 4; ++q) store(b, j + q, o[q]);
        }
    }
    for (; j < j1; ++j)
        for (int64_t b = 0; b < B; ++b) store(b, j, dot1(w + j * n_in, n_in, x + b * n_in));
}

// This thread's share [begin, end) of n rows, in multiples of 16 (a 512-bit vector of
// floats) so that shares start on whole vectors.
inline void share(int64_t n, int tid, int n_threads, int64_t& begin, int64_t& end) {
    const int64_t units = (n + 15) / 16;
    const int64_t per = units / n_threads, extra = units % n_threads;
    const int64_t u0 = tid * per + std::min<int64_t>(tid, extra);
    const int64_t u1 = u0 + per + (tid < extra ? 1 : 0);
    begin = std::min(n, u0 * 16);
    end = std::min(n, u1 * 16);
}

// LayerNorm over the last dimension (biased variance, as torch.nn.LayerNorm).
template <typename F>
inline void layer_norm(const F* STEP_RESTRICT x, const F* STEP_RESTRICT g,
                       const F* STEP_RESTRICT beta, F* STEP_RESTRICT out, int64_t B, int64_t C,
                       F eps) {
    for (int64_t b = 0; b < B; ++b) {
        const F* xr = x + b * C;
        F* o = out + b * C;
        F sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; ++c) sum += xr[c];
        const F mean = sum / F(C);
        F sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
        const F inv = F(1) / std::sqrt(sq / F(C) + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - mean) * inv * g[c] + beta[c];
    }
}

// Token shift: x * m + prev * (1 - m), per channel (model.py's `mix`).
template <typename F>
inline void mix(const F* STEP_RESTRICT x, const F* STEP_RESTRICT prev, const F* STEP_RESTRICT m,
                F* STEP_RESTRICT out, int64_t B, int64_t C) {
    for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
            out[b * C + c] = x[b * C + c] * m[c] + prev[b * C + c] * (F(1) - m[c]);
    }
}

template <typename F>
inline F sigmoid(F x) {
    return F(1) / (F(1) + wkv_exp(-x));
}

template <typename F, typename W>
struct LayerWeights {
    const F *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const F *decay, *first, *att_mix_k, *att_mix_v, *att_mix_r;
    const W *att_key, *att_value, *att_receptance, *att_output;
    const F *ffn_mix_k, *ffn_mix_r;
    const W *ffn_key, *ffn_receptance, *ffn_value;
};

template <typename F, typename W>
struct ModelWeights {
    const W* emb;
    const F *ln0_w, *ln0_b;
    std::vector<LayerWeights<F, W>> layers;
    const F *ln_out_w, *ln_out_b;
    const W* head;
};

// State slots per layer, as in rwkv_lib/model.py.
constexpr int kAttX = 0, kA = 1, kB = 2, kP = 3, kFfnX = 4, kSlots = 5;

template <typename F, typename W>
void step_impl(const ModelWeights<F, W>& mw, const int64_t* tokens, int64_t B, int64_t C,
               int64_t V, F* state, F* logits, F eps, int n_threads) {
    const int64_t L = static_cast<int64_t>(mw.layers.size());
    const int64_t H = 4 * C;  // hidden width of channel mixing
    // shared between threads: k, v, r of time mixing, its gated output ry, the products'
    // outputs, and channel mixing's hidden layer and receptance
    std::vector<F> shared(6 * B * C + B * H);
    F* const k_s = shared.data();
    F* const v_s = k_s + B * C;
    F* const r_s = v_s + B * C;
    F* const ry_s = r_s + B * C;
    F* const out_s = ry_s + B * C;
    F* const rr_s = out_s + B * C;
    F* const kk_s = rr_s + B * C;

#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        std::vector<F> buf(5 * B * C);  // this thread's own copies
        F* const x = buf.data();        // the residual stream
        F* const ln = x + B * C;        // a layer norm's output
        F* const xk = ln + B * C;       // token-shift mixes, the inputs of the products
        F* const xv = xk + B * C;
        F* const xr = xv + B * C;
        int64_t c0, c1, h0, h1, v0, v1;
        share(C, tid, nt, c0, c1);
        share(H, tid, nt, h0, h1);
        share(V, tid, nt, v0, v1);

        for (int64_t b = 0; b < B; ++b)
            for (int64_t c = 0; c < C; ++c) ln[b * C + c] = widen(mw.emb[tokens[b] * C + c]);
        layer_norm(ln, mw.ln0_w, mw.ln0_b, x, B, C, eps);

        for (int64_t l = 0; l < L; ++l) {
            const LayerWeights<F, W>& lw = mw.layers[l];
            F* const st = state + l * kSlots * B * C;
            F* const att_x = st + kAttX * B * C;
            F* const sa = st + kA * B * C;
            F* const sb = st + kB * B * C;
            F* const sp = st + kP * B * C;
            F* const ffn_x = st + kFfnX * B * C;

            // A: time mixing. k, v, r for this thread's channels, then the WKV step on them.
            layer_norm(x, lw.ln1_w, lw.ln1_b, ln, B, C, eps);
            mix(ln, att_x, lw.att_mix_k, xk, B, C);
            mix(ln, att_x, lw.att_mix_v, xv, B, C);
            mix(ln, att_x, lw.att_mix_r, xr, B, C);
            matvec_rows(lw.att_key, C, c0, c1, xk, B,
                        [&](int64_t b, int64_t j, F y) { k_s[b * C + j] = y; });
            matvec_rows(lw.att_value, C, c0, c1, xv, B,
                        [&](int64_t b, int64_t j, F y) { v_s[b * C + j] = y; });
            matvec_rows(lw.att_receptance, C, c0, c1, xr, B,
                        [&](int64_t b, int64_t j, F y) { r_s[b * C + j] = y; });
            for (int64_t b = 0; b < B; ++b) {
                const int64_t o = b * C;
#pragma omp simd
                for (int64_t c = c0; c < c1; ++c) {
                    const F w = -wkv_exp(lw.decay[c]);
                    F a = sa[o + c], bb = sb[o + c], p = sp[o + c];
                    const F y = wkv_forward_step(w, lw.first[c], k_s[o + c], v_s[o + c], a, bb,
                                                 p);
                    sa[o + c] = a;
                    sb[o + c] = bb;
                    sp[o + c] = p;
                    ry_s[o + c] = sigmoid(r_s[o + c]) * y;
                }
            }
#pragma omp barrier
            // B: the output projection; every thread has read att_x, so it may change.
            for (int64_t b = 0; b < B; ++b)
                for (int64_t c = c0; c < c1; ++c) att_x[b * C + c] = ln[b * C + c];
            matvec_rows(lw.att_output, C, c0, c1, ry_s, B,
                        [&](int64_t b, int64_t j, F y) { out_s[b * C + j] = y; });
#pragma omp barrier
            for (int64_t i = 0; i < B * C; ++i) x[i] += out_s[i];

            // C: channel mixing, the two products from the shifted input.
            layer_norm(x, lw.ln2_w, lw.ln2_b, ln, B, C, eps);
            mix(ln, ffn_x, lw.ffn_mix_k, xk, B, C);
            mix(ln, ffn_x, lw.ffn_mix_r, xr, B, C);
            matvec_rows(lw.ffn_key, C, h0, h1, xk, B, [&](int64_t b, int64_t j, F y) {
                const F relu = y > F(0) ? y : F(0);
                kk_s[b * H + j] = relu * relu;
            });
            matvec_rows(lw.ffn_receptance, C, c0, c1, xr, B,
                        [&](int64_t b, int64_t j, F y) { rr_s[b * C + j] = sigmoid(y); });
#pragma omp barrier
            // D: the value projection of the hidden layer, gated by receptance.
            for (int64_t b = 0; b < B; ++b)
                for (int64_t c = c0; c < c1; ++c) ffn_x[b * C + c] = ln[b * C + c];
            matvec_rows(lw.ffn_value, H, c0, c1, kk_s, B,
                        [&](int64_t b, int64_t j, F y) { out_s[b * C + j] = rr_s[b * C + j] * y; });
#pragma omp barrier
            for (int64_t i = 0; i < B * C; ++i) x[i] += out_s[i];
        }
        layer_norm(x, mw.ln_out_w, mw.ln_out_b, ln, B, C, eps);
        matvec_rows(mw.head, C, v0, v1, ln, B,
                    [&](int64_t b, int64_t j, F y) { logits[b * V + j] = y; });
    }
}

// ---- the op: argument checks, then dispatch on (compute dtype, weight dtype) ----

using at::Tensor;

// weights, in this order: emb, ln0.w, ln0.b; per layer the 18 of kLayerNames; then
// ln_out.w, ln_out.b, head.
constexpr int kPerLayer = 18;
const char* const kLayerNames[kPerLayer] = {
    "ln1.weight",     "ln1.bias",       "ln2.weight",         "ln2.bias",
    "att.time_decay", "att.time_first", "att.time_mix_k",     "att.time_mix_v",
    "att.time_mix_r", "att.key.weight", "att.value.weight",   "att.receptance.weight",
    "att.output.weight", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight",
    "ffn.receptance.weight", "ffn.value.weight"};
// which of them are matrices (in the weight dtype), and their shapes in units of C
const bool kIsMatrix[kPerLayer] = {false, false, false, false, false, false, false, false,
                                   false, true,  true,  true,  true,  false, false, true,
                                   true,  true};
const int kRows[kPerLayer] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 4, 1, 1};
const int kCols[kPerLayer] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 4};

void check_weight(const Tensor& t, const std::string& name, at::ScalarType dtype,
                  at::IntArrayRef shape) {
    TORCH_CHECK(t.device().is_cpu(), "rnn_step: ", name, " is on ", t.device(),
                "; the fused step runs on the CPU");
    TORCH_CHECK(t.scalar_type() == dtype, "rnn_step: ", name, " has dtype ", t.scalar_type(),
                ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), "rnn_step: ", name, " must be contiguous");
    TORCH_CHECK(t.numel() == c10::multiply_integers(shape), "rnn_step: ", name,
                " has shape ", t.sizes(), ", expected ", shape, " (or the same elements)");
}

template <typename F, typename W>
ModelWeights<F, W> gather(at::TensorList ws, int64_t L, int64_t C, int64_t V,
                          at::ScalarType fdt, at::ScalarType wdt) {
    ModelWeights<F, W> mw;
    check_weight(ws[0], "emb.weight", wdt, {V, C});
    check_weight(ws[1], "blocks.0.ln0.weight", fdt, {C});
    check_weight(ws[2], "blocks.0.ln0.bias", fdt, {C});
    mw.emb = static_cast<const W*>(ws[0].data_ptr());
    mw.ln0_w = static_cast<const F*>(ws[1].data_ptr());
    mw.ln0_b = static_cast<const F*>(ws[2].data_ptr());
    mw.layers.resize(L);
    for (int64_t l = 0; l < L; ++l) {
        const void* p[kPerLayer];
        for (int i = 0; i < kPerLayer; ++i) {
            const Tensor& t = ws[3 + l * kPerLayer + i];
            const std::string name = "blocks." + std::to_string(l) + "." + kLayerNames[i];
            if (kIsMatrix[i])
                check_weight(t, name, wdt, {kRows[i] * C, kCols[i] * C});
            else
                check_weight(t, name, fdt, {C});
            p[i] = t.data_ptr();
        }
        LayerWeights<F, W>& lw = mw.layers[l];
        const F** vec[] = {&lw.ln1_w, &lw.ln1_b, &lw.ln2_w, &lw.ln2_b, &lw.decay, &lw.first,
                           &lw.att_mix_k, &lw.att_mix_v, &lw.att_mix_r};
        for (int i = 0; i < 9; ++i) *vec[i] = static_cast<const F*>(p[i]);
        lw.att_key = static_cast<const W*>(p[9]);
        lw.att_value = static_cast<const W*>(p[10]);
        lw.att_receptance = static_cast<const W*>(p[11]);
        lw.att_output = static_cast<const W*>(p[12]);
        lw.ffn_mix_k = static_cast<const F*>(p[13]);
        lw.ffn_mix_r = static_cast<const F*>(p[14]);
        lw.ffn_key = static_cast<const W*>(p[15]);
        lw.ffn_receptance = static_cast<const W*>(p[16]);
        lw.ffn_value = static_cast<const W*>(p[17]);
    }
    const int64_t end = 3 + L * kPerLayer;
    check_weight(ws[end], "ln_out.weight", fdt, {C});
    check_weight(ws[end + 1], "ln_out.bias", fdt, {C});
    check_weight(ws[end + 2], "head.weight", wdt, {V, C});
    mw.ln_out_w = static_cast<const F*>(ws[end].data_ptr());
    mw.ln_out_b = static_cast<const F*>(ws[end + 1].data_ptr());
    mw.head = static_cast<const W*>(ws[end + 2].data_ptr());
    return mw;
}

// Fewer threads for small models: a thread joins only with at least this many bytes of
// weights per layer to read. A small model's layer takes microseconds, about what the
// four barriers cost on a quiet machine; on a busy one a barrier that waits for a thread
// the OS has put aside costs a whole time slice (a 2-thread L2-C96 step measured ms,
// against 0.05 ms of CPU time on one thread).
constexpr int64_t kMinBytesPerThread = 512 * 1024;

Tensor rnn_step(const Tensor& tokens, Tensor& state, at::TensorList weights, double eps) {
    TORCH_CHECK(weights.size() >= 6 + kPerLayer && (weights.size() - 6) % kPerLayer == 0,
                "rnn_step: expected 6 + 18 * n_layer weight tensors, got ", weights.size());
    const int64_t L = (static_cast<int64_t>(weights.size()) - 6) / kPerLayer;
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong && tokens.is_cpu(),
                "rnn_step: tokens must be a CPU int64 tensor of shape (B,), got ",
                tokens.scalar_type(), " ", tokens.sizes());
    const int64_t B = tokens.size(0);
    const Tensor& emb = weights[0];
    TORCH_CHECK(emb.dim() == 2, "rnn_step: emb.weight must be (V, C), got ", emb.sizes());
    const int64_t V = emb.size(0), C = emb.size(1);
    const at::ScalarType fdt = state.scalar_type(), wdt = emb.scalar_type();
    TORCH_CHECK(fdt == at::kFloat || fdt == at::kDouble,
                "rnn_step: the state must be float32 or float64, got ", fdt);
    TORCH_CHECK(wdt == fdt || (fdt == at::kFloat && wdt == at::kBFloat16),
                "rnn_step: weights of dtype ", wdt, " with a ", fdt,
                " state; use the state's dtype, or bfloat16 matrices with float32");
    TORCH_CHECK(state.is_cpu() && state.is_contiguous() &&
                    state.sizes() == at::IntArrayRef({L, kSlots, B, C}),
                "rnn_step: the state must be a contiguous CPU tensor of shape (", L, ", 5, ", B,
                ", ", C, "), got ", state.sizes());
    const Tensor tok = tokens.contiguous();
    const int64_t* tp = tok.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(tp[b] >= 0 && tp[b] < V, "rnn_step: token id ", tp[b], " is outside [0, ",
                    V, ")");
    Tensor logits = at::empty({B, V}, state.options());
    const int64_t layer_bytes = 13 * C * C * static_cast<int64_t>(at::elementSize(wdt));
    const int n_threads = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), layer_bytes / kMinBytesPerThread)));
    if (fdt == at::kDouble) {
        const auto mw = gather<double, double>(weights, L, C, V, fdt, wdt);
        step_impl(mw, tp, B, C, V, state.data_ptr<double>(), logits.data_ptr<double>(), eps,
                  n_threads);
    } else if (wdt == at::kFloat) {
        const auto mw = gather<float, float>(weights, L, C, V, fdt, wdt);
        step_impl(mw, tp, B, C, V, state.data_ptr<float>(), logits.data_ptr<float>(),
                  static_cast<float>(eps), n_threads);
    } else {
        const auto mw = gather<float, c10::BFloat16>(weights, L, C, V, fdt, wdt);
        step_impl(mw, tp, B, C, V, state.data_ptr<float>(), logits.data_ptr<float>(),
                  static_cast<float>(eps), n_threads);
    }
    return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rwkv, m) {
    m.def("rnn_step(Tensor tokens, Tensor(a!) state, Tensor[] weights, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rwkv, CPU, m) { m.impl("rnn_step", &rnn_step); }
