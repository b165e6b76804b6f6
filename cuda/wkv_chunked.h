// The chunked WKV algorithm: parallel over time as well as over (batch row, channel).
//
// The sequential kernel (wkv_cuda.cu) runs one thread per (row, channel): B*C threads, all
// the parallelism it has. At batch 1 that is a few hundred threads on a GPU that holds
// a quarter of a million. Here each sequence is cut into J chunks of L = ceil(T/J) tokens,
// one thread per (row, channel, chunk), and the chunks are joined by scans inside a block
// of n_ch channels x J chunks (rwkv_lib/wkv_chunked.py is the same algorithm in PyTorch,
// with its derivation, and the same names).
//
// Forward: (1) each chunk's own state from the empty state; (2) an inclusive scan over the
// chunks gives every chunk its incoming state; (3) each chunk computes its outputs.
// Backward: (1)-(2) again; (3) each chunk walks forward from its incoming state, keeping
// the state before every token (in gk, gv and saved_p, as the sequential kernel does);
// (4) each chunk's own adjoint map from a zero adjoint at its end, and a suffix scan of
// those maps; (5) the ordinary backward step over each chunk from its true boundary values;
// (6) a sum of the per-chunk dL/dw, dL/du over the chunks.
//
// Everything below is __host__ __device__ code. The two passes are written as what one
// thread of a block does, with a `sync()` callable for the block-wide barrier: the CUDA
// kernel (wkv_cuda_chunked.cu) passes __syncthreads(); the CPU test harness
// (tests/wkv_chunked_harness.cpp) runs every thread of a block as a fiber that yields at
// sync(), in several orders, and checks that all threads meet at the same barriers. So
// the arithmetic, the indexing and the placement of the barriers of the GPU code are all
// tested on the CPU. No torch headers: this file and wkv_math.h are all a harness needs.
//
// Barrier rule, as for __syncthreads(): every thread of a block calls sync() the same
// number of times. Idle threads (channels past C) therefore never return early; they
// skip work but walk through every barrier.
#pragma once

#include <cstdint>

#include "wkv_math.h"

// Loops over compile-time bounds are unrolled on the GPU, so that their arrays stay in
// registers (host compilers unroll them on their own).
#if defined(__CUDACC__)
#define WKV_UNROLL _Pragma("unroll")
#else
#define WKV_UNROLL
#endif

// A decay n*w below this is clamped, so that p + n*w stays finite (p >= -1e38): no
// arithmetic on infinities, although e^{n w} would be 0 either way.
#define WKV_DECAY_MIN (-1e38)

// ---- the layout of the work ----

// The largest block, and so the most chunks per sequence (blocks hold n_ch >= 8 channels,
// so that a warp's loads of one time step fill whole 32-byte sectors). The kernels are
// compiled with __launch_bounds__(kWkvMaxThreads), which caps their registers to fit.
constexpr int kWkvMaxThreads = 512;
constexpr int kWkvMinChannels = 8;
constexpr int kWkvMaxChunks = kWkvMaxThreads / kWkvMinChannels;
constexpr int kWkvBlockTarget = 256;  // blocks grow to at least this many threads if C allows

struct WkvChunkLayout {
    int J;          // chunks per sequence
    int n_ch;       // channels per block
    int threads;    // n_ch * J
    int64_t L;      // tokens per chunk (the last chunks may be shorter, or empty)
    int64_t groups; // blocks per batch row: ceil(C / n_ch)
    int64_t blocks; // B * groups
};

// The block shape for J chunks (1 <= J <= kWkvMaxChunks, the caller checks).
inline WkvChunkLayout wkv_chunk_layout(int64_t B, int64_t T, int64_t C, int J) {
    WkvChunkLayout lay;
    lay.J = J;
    int n = kWkvMinChannels;
    while (n * J < kWkvBlockTarget && 2 * n * J <= kWkvMaxThreads && n < C) n *= 2;
    lay.n_ch = n;
    lay.threads = n * J;
    lay.L = (T + J - 1) / J;
    lay.groups = (C + n - 1) / n;
    lay.blocks = B * lay.groups;
    return lay;
}

// The by-shape rule: as many chunks as keep B*C*J threads within what the GPU holds at
// once (about 1024 per multiprocessor), no more than kWkvMaxChunks, and chunks of at least
// 4 tokens. It returns 1 when B*C alone fills half the GPU or more.
inline int wkv_auto_chunks(int64_t B, int64_t T, int64_t C, int multiprocessors) {
    const int64_t target = static_cast<int64_t>(multiprocessors) * 1024;
    const int64_t sequences = B * C > 0 ? B * C : 1;
    int64_t J = target / sequences;
    const int64_t by_length = (T + 3) / 4;  // ceil(T / 4)
    if (J > by_length) J = by_length;
    if (J > kWkvMaxChunks) J = kWkvMaxChunks;
    if (J < 1) J = 1;
    return static_cast<int>(J);
}

// ---- the arithmetic ----

// n*w, the decay over n tokens, clamped (see WKV_DECAY_MIN).
template <typename F>
WKV_HD F wkv_chunk_decay(F w, F n) {
    const F d = n * w;
    return d < F(WKV_DECAY_MIN) ? F(WKV_DECAY_MIN) : d;
}

// The state after a left piece then a right piece of n_right tokens. (a, b, p) holds the
// right piece's own state (from the empty state) on entry and the joined state on exit.
// With n_right = 1 and (a, b, p) = (v, 1, k) this is wkv_update_step.
template <typename F>
WKV_HD void wkv_combine(F w, F a_left, F b_left, F p_left, F n_right, F& a, F& b, F& p) {
    F q, e_left, e_right;
    wkv_rescale(p_left + wkv_chunk_decay(w, n_right), p, q, e_left, e_right);
    a = e_left * a_left + e_right * a;
    b = e_left * b_left + e_right * b;
    p = q;
}

// State update that also says whether the past won the maximum (p' = p + w; ties go to
// the past, as in wkv_rescale) or the token did (p' = k).
template <typename F>
WKV_HD bool wkv_update_step_past(F w, F k, F v, F& a, F& b, F& p) {
    const bool past = (p + w) - k >= F(0);
    wkv_update_step(w, k, v, a, b, p);
    return past;
}

// One backward step with the gradient gP along the p chain (p' = max(p + w, k)): the
// arithmetic of wkv_backward_step for (ga, gb, gw, gu, gk, gv), plus gP, which goes to k
// where the token won and stays on the chain (adding to dL/dw) where the past won.
// Returns e1u = e^{w + p - p'}, the factor this step multiplies (ga, gb) by.
template <typename F>
WKV_HD F wkv_chunk_backward_step(F w, F u, F k, F v, F gy, F a, F b, F p, F& ga, F& gb,
                                 F& gP, F& gw, F& gu, F& gk, F& gv) {
    F q, e1o, e2o;
    wkv_rescale(p, u + k, q, e1o, e2o);  // output weights, scaled by e^q
    const F inv_den = F(1) / (e1o * b + e2o);
    const F y = (e1o * a + e2o * v) * inv_den;
    const F g = gy * inv_den;
    const F x = p + w;
    const bool past = x - k >= F(0);
    F e1u, e2u;
    wkv_rescale(x, k, q, e1u, e2u);  // e1u = e^{w + p - p'}, e2u = e^{k - p'}
    const F g_now = g * e2o;
    const F g_uk = g_now * (v - y);
    gu += g_uk;
    gk = g_uk + e2u * (ga * v + gb) + (past ? F(0) : gP);
    gv = g_now + e2u * ga;
    gw += e1u * (ga * a + gb * b) + (past ? gP : F(0));
    gP = past ? gP : F(0);
    const F g_past = g * e1o;
    ga = g_past + e1u * ga;
    gb = e1u * gb - g_past * y;
    return e1u;
}

// ---- the problem and one thread's place in it ----

template <typename F>
struct WkvChunkedProblem {
    int64_t B, T, C;
    WkvChunkLayout lay;
    // inputs; all (B, T, C) arrays contiguous, w and u (C,), states (B, C)
    const F *w, *u, *k, *v;
    const F *a0, *b0, *p0;  // null: the empty state
    // forward outputs
    F *y, *aT, *bT, *pT;
    // backward inputs: dL/dy, dL/d(a_T, b_T, p_T) (any null: zero)
    const F *gy, *gaT, *gbT, *gpT;
    // 0: drop the p chain (dL/dp_T taken as gaT*aT + gbT*bT, the convention of an op that
    // has no grad_state_p); 1: exact, G_T = gpT - gaT*aT - gbT*bT flows back along it
    int exact_p;
    // backward outputs; gk, gv and saved_p also hold the state before every token
    F *saved_p, *gw, *gu, *gk, *gv;
    F *ga0, *gb0, *gp0;  // null: not wanted
};

struct WkvChunkThread {
    int64_t row, c;  // batch row and channel
    int j;           // chunk
    int tid;         // thread within the block: x + j * n_ch, with x the channel in the block
    bool valid;      // c < C: the last block of a row may have idle channels
    int64_t t0, t1;  // this chunk's tokens, [t0, t1); t0 == t1 for an empty chunk
    int64_t base;    // index of (row, t = 0, c) in a (B, T, C) array
    int64_t s;       // index of (row, c) in a (B, C) array
};

template <typename F>
WKV_HD WkvChunkThread wkv_chunk_thread(const WkvChunkedProblem<F>& P, int64_t block, int tid) {
    const WkvChunkLayout& lay = P.lay;
    WkvChunkThread th;
    th.row = block / lay.groups;
    const int x = tid % lay.n_ch;
    th.j = tid / lay.n_ch;
    th.tid = tid;
    th.c = (block % lay.groups) * lay.n_ch + x;
    th.valid = th.c < P.C;
    const int64_t t0 = th.j * lay.L;
    th.t0 = t0 < P.T ? t0 : P.T;
    th.t1 = th.t0 + lay.L < P.T ? th.t0 + lay.L : P.T;
    th.base = th.row * P.T * P.C + th.c;
    th.s = th.row * P.C + th.c;
    return th;
}

template <typename F>
WKV_HD void wkv_initial_state(const WkvChunkedProblem<F>& P, const WkvChunkThread& th, F& a,
                              F& b, F& p) {
    a = P.a0 ? P.a0[th.s] : F(0);
    b = P.b0 ? P.b0[th.s] : F(0);
    p = P.p0 ? P.p0[th.s] : F(WKV_P_EMPTY);
}

// ---- walking over a chunk's tokens ----
//
// The loads of kDepth time steps are issued together, and the next group is loaded
// before the current one is used, so each thread keeps up to 2*kDepth steps of loads in
// flight instead of waiting for memory at every step. Index math only: the arrays and
// the step function belong to the caller.

template <int D, int N, typename F>
WKV_HD void wkv_load_group(const F* const (&src)[N], int64_t base, int64_t C, int64_t t,
                           int64_t dir, int64_t t0, int64_t t1, F (&x)[D][N]) {
WKV_UNROLL
    for (int i = 0; i < D; ++i) {
        const int64_t tt = t + dir * i;
        const bool in = t0 <= tt && tt < t1;
WKV_UNROLL
        for (int n = 0; n < N; ++n) x[i][n] = in ? src[n][base + tt * C] : F(0);
    }
}

// Calls step(t, values) for t = t0 .. t1-1 (forward) or t1-1 .. t0 (backward), where
// values[n] = src[n][base + t*C].
template <int D, int N, typename F, class Step>
WKV_HD void wkv_walk(const F* const (&src)[N], int64_t base, int64_t C, int64_t t0, int64_t t1,
                     bool backward, Step step) {
    if (t0 >= t1) return;
    const int64_t dir = backward ? -1 : 1;
    int64_t t = backward ? t1 - 1 : t0;
    F cur[D][N], next[D][N];
    wkv_load_group<D, N>(src, base, C, t, dir, t0, t1, cur);
    for (int64_t done = 0; done < t1 - t0; done += D, t += dir * D) {
        wkv_load_group<D, N>(src, base, C, t + dir * D, dir, t0, t1, next);
WKV_UNROLL
        for (int i = 0; i < D; ++i) {
            if (done + i < t1 - t0) step(t + dir * i, cur[i]);
        }
WKV_UNROLL
        for (int i = 0; i < D; ++i) {
WKV_UNROLL
            for (int n = 0; n < N; ++n) cur[i][n] = next[i][n];
        }
    }
}

constexpr int kWkvForwardDepth = 8;   // k, v: 2 x 2 x 8 values in registers
constexpr int kWkvBackwardDepth = 2;  // k, v, gy, a, b, p: 2 x 6 x 2

// ---- the forward pass ----

// Shared memory holds `slots` arrays of one value per thread: value i of thread tid at
// sm[i * threads + tid] (consecutive threads, consecutive banks).
template <typename F>
WKV_HD F& wkv_slot(F* sm, const WkvChunkLayout& lay, int i, int tid) {
    return sm[i * lay.threads + tid];
}

// Steps (1) and (2), shared by both passes. On return (after a barrier), slots 0..2 of
// chunk j hold the state after chunks 0..j, the initial state folded into chunk 0.
// Called only when J > 1 (the condition is the same for the whole block).
template <typename F, class Sync>
WKV_HD void wkv_scan_states(const WkvChunkedProblem<F>& P, const WkvChunkThread& th, F* sm,
                            Sync& sync) {
    const WkvChunkLayout& lay = P.lay;
    F a = F(0), b = F(0), p = F(WKV_P_EMPTY), n = F(th.t1 - th.t0);
    if (th.valid) {
        const F w = P.w[th.c];
        const F* const src[2] = {P.k, P.v};
        wkv_walk<kWkvForwardDepth>(src, th.base, P.C, th.t0, th.t1, false,
                                   [&](int64_t, const F (&x)[2]) {
                                       wkv_update_step(w, x[0], x[1], a, b, p);
                                   });
        if (th.j == 0) {
            F a0, b0, p0;
            wkv_initial_state(P, th, a0, b0, p0);
            wkv_combine(w, a0, b0, p0, n, a, b, p);
        }
    }
    wkv_slot(sm, lay, 0, th.tid) = a;
    wkv_slot(sm, lay, 1, th.tid) = b;
    wkv_slot(sm, lay, 2, th.tid) = p;
    wkv_slot(sm, lay, 3, th.tid) = n;
    sync();
    // Hillis-Steele: after the round with `offset`, chunk j holds chunks j-2*offset+1 .. j.
    for (int offset = 1; offset < lay.J; offset *= 2) {
        const bool active = th.valid && th.j >= offset;
        F a_l = F(0), b_l = F(0), p_l = F(0), n_l = F(0);
        if (active) {  // read the partner's piece before anyone overwrites it
            const int partner = th.tid - offset * lay.n_ch;
            a_l = wkv_slot(sm, lay, 0, partner);
            b_l = wkv_slot(sm, lay, 1, partner);
            p_l = wkv_slot(sm, lay, 2, partner);
            n_l = wkv_slot(sm, lay, 3, partner);
        }
        sync();
        if (active) {
            wkv_combine(P.w[th.c], a_l, b_l, p_l, n, a, b, p);
            n += n_l;
            wkv_slot(sm, lay, 0, th.tid) = a;
            wkv_slot(sm, lay, 1, th.tid) = b;
            wkv_slot(sm, lay, 2, th.tid) = p;
            wkv_slot(sm, lay, 3, th.tid) = n;
        }
        sync();
    }
}

// The state entering this thread's chunk: the initial state for chunk 0, else the scan's
// value for chunk j-1 (shared memory is read only when J > 1, after wkv_scan_states).
template <typename F>
WKV_HD void wkv_incoming_state(const WkvChunkedProblem<F>& P, const WkvChunkThread& th,
                               const F* sm, F& a, F& b, F& p) {
    if (th.j == 0) {
        wkv_initial_state(P, th, a, b, p);
        return;
    }
    const int left = th.tid - P.lay.n_ch;
    a = sm[0 * P.lay.threads + left];
    b = sm[1 * P.lay.threads + left];
    p = sm[2 * P.lay.threads + left];
}

template <typename F, class Sync>
WKV_HD void wkv_chunked_forward_thread(const WkvChunkedProblem<F>& P, const WkvChunkThread& th,
                                       F* sm, Sync& sync) {
    if (P.lay.J > 1) wkv_scan_states(P, th, sm, sync);  // J is the same for the whole block
    if (!th.valid) return;  // no barrier follows
    // (3) this chunk's outputs, from its incoming state
    const F w = P.w[th.c], u = P.u[th.c];
    F a, b, p;
    wkv_incoming_state(P, th, sm, a, b, p);
    const F* const src[2] = {P.k, P.v};
    F* const y = P.y;
    const int64_t base = th.base, C = P.C;
    wkv_walk<kWkvForwardDepth>(src, base, C, th.t0, th.t1, false,
                               [&](int64_t t, const F (&x)[2]) {
                                   y[base + t * C] = wkv_forward_step(w, u, x[0], x[1], a, b, p);
                               });
    if (th.j == P.lay.J - 1) {  // the last chunk ends with the final state
        P.aT[th.s] = a;
        P.bT[th.s] = b;
        P.pT[th.s] = p;
    }
}

// ---- the backward pass ----

template <typename F, class Sync>
WKV_HD void wkv_chunked_backward_thread(const WkvChunkedProblem<F>& P, const WkvChunkThread& th,
                                        F* sm, Sync& sync) {
    const WkvChunkLayout& lay = P.lay;
    const int J = lay.J;
    const bool valid = th.valid;
    const F w = valid ? P.w[th.c] : F(0), u = valid ? P.u[th.c] : F(0);
    const int64_t base = th.base, C = P.C;

    // (1)-(2), then read the incoming state before shared memory is reused.
    if (J > 1) wkv_scan_states(P, th, sm, sync);
    F a_in = F(0), b_in = F(0), p_in = F(0);
    if (valid) wkv_incoming_state(P, th, sm, a_in, b_in, p_in);
    if (J > 1) sync();

    // (3) walk forward from the incoming state, keeping the state before every token (in
    // gk, gv and saved_p); `chain`: the past won at every token, so the p chain passes.
    F a = a_in, b = b_in, p = p_in;
    bool chain = true;
    if (valid) {
        const F* const src[2] = {P.k, P.v};
        F* const sa = P.gk;
        F* const sb = P.gv;
        F* const sp = P.saved_p;
        wkv_walk<kWkvForwardDepth>(src, base, C, th.t0, th.t1, false,
                                   [&](int64_t t, const F (&x)[2]) {
                                       const int64_t i = base + t * C;
                                       sa[i] = a;
                                       sb[i] = b;
                                       sp[i] = p;
                                       chain = wkv_update_step_past(w, x[0], x[1], a, b, p) && chain;
                                   });
    }
    // the terminal adjoint, after the last token; (a, b) is the final state in chunk J-1
    const F gaT = valid && P.gaT ? P.gaT[th.s] : F(0);
    const F gbT = valid && P.gbT ? P.gbT[th.s] : F(0);
    F gPT = F(0);
    if (valid && P.exact_p && th.j == J - 1) {
        const F gpT = P.gpT ? P.gpT[th.s] : F(0);
        gPT = gpT - gaT * a - gbT * b;  // the part of dL/dp_T not explained by A and B
    }

    // (4) this chunk's adjoint map g -> f g + (oa, ob) from a zero adjoint at its end, and
    // gP -> s gP + oP for the p chain; then a suffix scan of the maps over the chunks.
    F ga_end = gaT, gb_end = gbT, gP_end = gPT;  // the adjoint at the end of this chunk
    if (J > 1) {
        F f = F(1), oa = F(0), ob = F(0), s = chain ? F(1) : F(0), oP = F(0);
        if (valid) {
            F ga = F(0), gb = F(0), gP = F(0), gw = F(0), gu = F(0);
            const F* const src[6] = {P.k, P.v, P.gy, P.gk, P.gv, P.saved_p};
            wkv_walk<kWkvBackwardDepth>(src, base, C, th.t0, th.t1, true,
                                        [&](int64_t, const F (&x)[6]) {
                                            F gk_t, gv_t;
                                            f *= wkv_chunk_backward_step(w, u, x[0], x[1], x[2], x[3], x[4],
                                                                         x[5], ga, gb, gP, gw, gu, gk_t, gv_t);
                                        });
            oa = ga;
            ob = gb;
            if (th.j == J - 1) {  // fold in the terminal adjoint: the map becomes a constant
                oa = f * gaT + ga;
                ob = f * gbT + gb;
                oP = s * gPT;
                f = F(0);
                s = F(0);
            }
        }
        wkv_slot(sm, lay, 0, th.tid) = f;
        wkv_slot(sm, lay, 1, th.tid) = oa;
        wkv_slot(sm, lay, 2, th.tid) = ob;
        wkv_slot(sm, lay, 3, th.tid) = s;
        wkv_slot(sm, lay, 4, th.tid) = oP;
        sync();
        // After the round with `offset`, chunk j holds the map of chunks j .. j+2*offset-1.
        for (int offset = 1; offset < J; offset *= 2) {
            const bool active = valid && th.j + offset < J;
            F f2 = F(0), oa2 = F(0), ob2 = F(0), s2 = F(0), oP2 = F(0);
            if (active) {
                const int partner = th.tid + offset * lay.n_ch;
                f2 = wkv_slot(sm, lay, 0, partner);
                oa2 = wkv_slot(sm, lay, 1, partner);
                ob2 = wkv_slot(sm, lay, 2, partner);
                s2 = wkv_slot(sm, lay, 3, partner);
                oP2 = wkv_slot(sm, lay, 4, partner);
            }
            sync();
            if (active) {  // this chunk's map applied after the later ones'
                oa += f * oa2;
                ob += f * ob2;
                f *= f2;
                oP += s * oP2;
                s *= s2;
                wkv_slot(sm, lay, 0, th.tid) = f;
                wkv_slot(sm, lay, 1, th.tid) = oa;
                wkv_slot(sm, lay, 2, th.tid) = ob;
                wkv_slot(sm, lay, 3, th.tid) = s;
                wkv_slot(sm, lay, 4, th.tid) = oP;
            }
            sync();
        }
        // the adjoint at the end of chunk j is the (constant) map of chunks j+1..
        if (valid && th.j < J - 1) {
            const int right = th.tid + lay.n_ch;
            ga_end = wkv_slot(sm, lay, 1, right);
            gb_end = wkv_slot(sm, lay, 2, right);
            gP_end = wkv_slot(sm, lay, 4, right);
        }
        sync();
    }

    // (5) the backward step over the chunk from its true boundary values.
    F gw = F(0), gu = F(0);
    if (valid) {
        F ga = ga_end, gb = gb_end, gP = gP_end;
        const F* const src[6] = {P.k, P.v, P.gy, P.gk, P.gv, P.saved_p};
        F* const gk = P.gk;
        F* const gv = P.gv;
        wkv_walk<kWkvBackwardDepth>(src, base, C, th.t0, th.t1, true,
                                    [&](int64_t t, const F (&x)[6]) {
                                        F gk_t, gv_t;
                                        wkv_chunk_backward_step(w, u, x[0], x[1], x[2], x[3], x[4],
                                                                x[5], ga, gb, gP, gw, gu, gk_t, gv_t);
                                        gk[base + t * C] = gk_t;  // over the saved a and b
                                        gv[base + t * C] = gv_t;
                                    });
        if (th.j == 0) {
            if (P.ga0) P.ga0[th.s] = ga;
            if (P.gb0) P.gb0[th.s] = gb;
            // p0 scales A0 = a0 e^{p0} and B0 = b0 e^{p0}, and starts the p chain
            if (P.gp0) P.gp0[th.s] = ga * a_in + gb * b_in + gP;
        }
    }
    if (J == 1) {
        if (valid) {
            P.gw[th.s] = gw;  // per batch row; the caller sums the rows
            P.gu[th.s] = gu;
        }
        return;  // no barrier follows
    }

    // (6) sum dL/dw and dL/du over the chunks: a tree in shared memory (no atomics, so the
    // result does not depend on the order the threads run in).
    wkv_slot(sm, lay, 0, th.tid) = gw;
    wkv_slot(sm, lay, 1, th.tid) = gu;
    sync();
    int half = 1;
    while (2 * half < J) half *= 2;
    for (; half >= 1; half /= 2) {
        if (th.j < half && th.j + half < J) {
            const int other = th.tid + half * lay.n_ch;
            wkv_slot(sm, lay, 0, th.tid) += wkv_slot(sm, lay, 0, other);
            wkv_slot(sm, lay, 1, th.tid) += wkv_slot(sm, lay, 1, other);
        }
        sync();
    }
    if (valid && th.j == 0) {
        P.gw[th.s] = wkv_slot(sm, lay, 0, th.tid);
        P.gu[th.s] = wkv_slot(sm, lay, 1, th.tid);
    }
}

// Shared memory a block needs, in values of F: the most slots a phase uses.
inline int64_t wkv_chunked_smem_values(const WkvChunkLayout& lay, bool backward) {
    return static_cast<int64_t>(backward ? 5 : 4) * lay.threads;
}
