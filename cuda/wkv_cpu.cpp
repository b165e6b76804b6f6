// CPU kernels of the WKV operator: forward and backward on raw, contiguous (B, T, C) arrays.
//
// Work is split over (batch row, block of channels) with at::parallel_for (a header
// template: it only uses several threads when this file is compiled with -fopenmp, which
// rwkv_lib/extension.py adds for g++ on Linux). Inside a block the loop runs over time, and
// for each time step over the block's contiguous channels: that inner loop is what must
// become SIMD code, exp included, or the kernel is ~10x slower.
//
// What makes g++ 12 vectorize it (checked with -fopt-info-vec-optimized, and by
// tests/test_extension.py):
// - exp: in the float kernels the recurrence's only exponential is wkv_exp_nonpositive
//   (wkv_math.h), plain arithmetic that is inlined into the loop. It replaced calls to
//   glibc's vector expf, which save and restore the loop's vector registers around every
//   call and send a whole vector down a scalar path when one argument is below about -87
//   (every first token, whose past is the empty state): kernels alone at (4, 256, 512) on
//   the 2-core Intel Xeon of the development machine, forward 0.88 -> 0.58 ns per element
//   and backward 1.95 -> 1.3. The float64 kernels (for gradcheck) still call exp, whose
//   SIMD variants glibc's libmvec has (_ZGVdN4v_exp for AVX2, _ZGVeN8v_exp for AVX-512);
//   <math.h> declares them only under -ffast-math (which would also let the compiler
//   assume no inf/NaN and reorder sums), so they are declared below, and the build uses
//   -fno-math-errno (a call that may set errno is not vectorized).
// - no fmaxf: without -ffinite-math-only its NaN rules block vectorization; the header
//   uses a compare-and-select max instead.
// - -fno-trapping-math: otherwise g++ keeps the compare-and-selects as branches ("control
//   flow in loop") below AVX-512, whose mask registers hide the problem.
// - -march=native (added by rwkv_lib/extension.py on x86-64) picks 512-bit or 256-bit
//   vectors instead of the 128-bit SSE2 baseline.
// - 512-bit vectors where there is AVX-512: g++ 12 tunes -march=native on many Intel
//   processors to prefer 256-bit vectors even then. The pragma below asks for 512 in this
//   file only. On the same Intel Xeon it took the forward pass at (4, 256, 512) from
//   1.04-1.10 to 0.78-0.83 ns per element and forward+backward from 3.4-3.5 to 2.6 (kernels
//   alone, three alternating runs each, with glibc's expf), while the one-token step of
//   rwkv_step_cpu.cpp, all overhead at small sizes, was ~10% slower with 512: it keeps
//   the default.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(__FAST_MATH__)
extern "C" double exp(double) noexcept __attribute__((__simd__("notinbranch")));
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")  // for the functions below, wkv_math.h's too
#endif

#include "wkv_math.h"

namespace {

// Channels per task, multiples of the widest vector (16 floats). The forward pass prefers
// wide blocks (less loop overhead per time step) but narrows them until every thread has
// work. The backward pass keeps the state before every token of its block, T x 3 x block
// values, which must stay in the core's L2 cache for the reverse sweep: its block is the
// widest of 128, 64, 32 channels whose saved state fits kBackwardScratchBytes. (On the
// 2-core development machine: forward blocks of 128 channels ran ~20% faster than 64;
// backward blocks of 32 ran faster than 64 at T = 1024, where 64 spills out of L2, and
// 64 or 128 ran ~25% faster than 32 at T = 256, where there is less work per time step.)
constexpr int64_t kMaxForwardBlock = 128;
constexpr int64_t kBackwardScratchBytes = 256 * 1024;

int64_t forward_block(int64_t B, int64_t C) {
    int64_t block = kMaxForwardBlock;
    while (block > 16 && B * ((C + block - 1) / block) < 2 * at::get_num_threads()) block /= 2;
    return block;
}

#define WKV_RESTRICT __restrict__

// A block reads (and writes) n contiguous channels of a row at each time step, C floats
// apart: a new 4 KB page every few steps, where the hardware prefetchers stop. Fetching
// the block's data kPrefetchSteps steps ahead took the forward pass at (16, 1024, 512)
// from 1.3 to 0.8 ns per element on the 2-core development machine.
constexpr int64_t kPrefetchSteps = 8;

template <typename F>
inline void prefetch_block(int64_t n, const F* x) {
    for (int64_t c = 0; c < n; c += 64 / sizeof(F)) __builtin_prefetch(x + c);
}

template <typename F>
inline void prefetch_block_for_writing(int64_t n, const F* x) {
    for (int64_t c = 0; c < n; c += 64 / sizeof(F)) __builtin_prefetch(x + c, 1);
}

// One time step of the forward pass for n contiguous channels.
template <typename F>
inline void forward_channels(int64_t n, const F* WKV_RESTRICT w, const F* WKV_RESTRICT u,
                             const F* WKV_RESTRICT k, const F* WKV_RESTRICT v,
                             F* WKV_RESTRICT y, F* WKV_RESTRICT a, F* WKV_RESTRICT b,
                             F* WKV_RESTRICT p) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
        F ac = a[c], bc = b[c], pc = p[c];
        y[c] = wkv_forward_step(w[c], u[c], k[c], v[c], ac, bc, pc);
        a[c] = ac;
        b[c] = bc;
        p[c] = pc;
    }
}

// Backward, first pass: replay the state updates and save the state before each token.
template <typename F>
inline void save_and_update_channels(int64_t n, const F* WKV_RESTRICT w,
                                     const F* WKV_RESTRICT k, const F* WKV_RESTRICT v,
                                     F* WKV_RESTRICT a, F* WKV_RESTRICT b, F* WKV_RESTRICT p,
                                     F* WKV_RESTRICT sa, F* WKV_RESTRICT sb,
                                     F* WKV_RESTRICT sp) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
        F ac = a[c], bc = b[c], pc = p[c];
        sa[c] = ac;
        sb[c] = bc;
        sp[c] = pc;
        wkv_update_step(w[c], k[c], v[c], ac, bc, pc);
        a[c] = ac;
        b[c] = bc;
        p[c] = pc;
    }
}

// Backward, second pass (reverse time), from the state saved by the first pass. With
// kCarryP, also the path of p alone (wkv_backward_p_step); without it gp is not touched,
// which is exact once gp is zero in every channel of the block: it stays zero.
template <bool kCarryP, typename F>
inline void backward_channels(int64_t n, const F* WKV_RESTRICT w, const F* WKV_RESTRICT u,
                              const F* WKV_RESTRICT k, const F* WKV_RESTRICT v,
                              const F* WKV_RESTRICT gy, const F* WKV_RESTRICT sa,
                              const F* WKV_RESTRICT sb, const F* WKV_RESTRICT sp,
                              F* WKV_RESTRICT gk, F* WKV_RESTRICT gv, F* WKV_RESTRICT ga,
                              F* WKV_RESTRICT gb, F* WKV_RESTRICT gp, F* WKV_RESTRICT gw,
                              F* WKV_RESTRICT gu) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
        F gac = ga[c], gbc = gb[c], gwc = gw[c], guc = gu[c], gkc, gvc;
        wkv_backward_step(w[c], u[c], k[c], v[c], gy[c], sa[c], sb[c], sp[c], gac, gbc, gwc,
                          guc, gkc, gvc);
        if constexpr (kCarryP) {
            F gpc = gp[c];
            wkv_backward_p_step(w[c], k[c], sp[c], gpc, gkc, gwc);
            gp[c] = gpc;
        }
        gk[c] = gkc;
        gv[c] = gvc;
        ga[c] = gac;
        gb[c] = gbc;
        gw[c] = gwc;
        gu[c] = guc;
    }
}

template <typename F>
bool any_nonzero(int64_t n, const F* x) {
    bool any = false;
    for (int64_t c = 0; c < n; ++c) any |= x[c] != F(0);
    return any;
}

// Calls fn(batch row, first channel, number of channels, scratch) for every block of
// `block` channels, in parallel. Each thread gets its own scratch buffer.
template <typename F, typename Fn>
void for_each_block(int64_t B, int64_t C, int64_t block, int64_t scratch_size, const Fn& fn) {
    const int64_t blocks_per_row = (C + block - 1) / block;
    at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> scratch(scratch_size);
        for (int64_t job = begin; job < end; ++job) {
            const int64_t row = job / blocks_per_row;
            const int64_t c0 = (job % blocks_per_row) * block;
            fn(row, c0, std::min(block, C - c0), scratch.data());
        }
    });
}

// State before the first token: given (a0, b0, p0) or the empty state.
template <typename F>
void load_state(int64_t n, const F* a0, const F* b0, const F* p0, F* a, F* b, F* p) {
    for (int64_t c = 0; c < n; ++c) {
        a[c] = a0 ? a0[c] : F(0);
        b[c] = b0 ? b0[c] : F(0);
        p[c] = p0 ? p0[c] : F(WKV_P_EMPTY);
    }
}

template <typename F>
void forward_impl(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                  const F* v, const F* a0, const F* b0, const F* p0, F* y, F* aT, F* bT,
                  F* pT) {
    const int64_t block = forward_block(B, C);
    for_each_block<F>(B, C, block, 0, [&](int64_t row, int64_t c0, int64_t n, F*) {
        alignas(64) F a[kMaxForwardBlock], b[kMaxForwardBlock], p[kMaxForwardBlock];
        const int64_t s = row * C + c0;  // offset in (B, C) arrays
        load_state(n, a0 ? a0 + s : nullptr, b0 ? b0 + s : nullptr, p0 ? p0 + s : nullptr, a,
                   b, p);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t i = (row * T + t) * C + c0;  // offset in (B, T, C) arrays
            if (t + kPrefetchSteps < T) {
                const int64_t ahead = i + kPrefetchSteps * C;
                prefetch_block(n, k + ahead);
                prefetch_block(n, v + ahead);
                prefetch_block_for_writing(n, y + ahead);
            }
            forward_channels(n, w + c0, u + c0, k + i, v + i, y + i, a, b, p);
        }
        std::copy(a, a + n, aT + s);
        std::copy(b, b + n, bT + s);
        std::copy(p, p + n, pT + s);
    });
}

template <int64_t kBlock, typename F>
void backward_blocks(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                     const F* v, const F* a0, const F* b0, const F* p0, const F* gy,
                     const F* gaT, const F* gbT, const F* gpT, F* gw, F* gu, F* gk, F* gv,
                     F* ga0, F* gb0, F* gp0) {
    // The reverse pass needs the state before every token: per block T x 3 x kBlock values
    // in a per-thread buffer, which stays in cache, instead of a (B, T, C) array.
    for_each_block<F>(B, C, kBlock, 3 * T * kBlock, [&](int64_t row, int64_t c0, int64_t n,
                                                        F* saved) {
        alignas(64) F a[kBlock], b[kBlock], p[kBlock];
        alignas(64) F ga[kBlock], gb[kBlock], gp[kBlock], gwb[kBlock], gub[kBlock];
        const int64_t s = row * C + c0;
        load_state(n, a0 ? a0 + s : nullptr, b0 ? b0 + s : nullptr, p0 ? p0 + s : nullptr, a,
                   b, p);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t i = (row * T + t) * C + c0;
            if (t + kPrefetchSteps < T) {
                const int64_t ahead = i + kPrefetchSteps * C;
                prefetch_block(n, k + ahead);
                prefetch_block(n, v + ahead);
            }
            F* st = saved + 3 * kBlock * t;  // a, b, p before token t
            save_and_update_channels(n, w + c0, k + i, v + i, a, b, p, st, st + kBlock,
                                     st + 2 * kBlock);
        }
        for (int64_t c = 0; c < n; ++c) {  // a, b: now the final state
            ga[c] = gaT ? gaT[s + c] : F(0);  // gradient arriving through the final state
            gb[c] = gbT ? gbT[s + c] : F(0);
            gp[c] = (gpT ? gpT[s + c] : F(0)) - ga[c] * a[c] - gb[c] * b[c];  // G
            gwb[c] = F(0);
            gub[c] = F(0);
        }
        // The p path usually ends within a few steps (at the first token whose key tops
        // the decayed maximum), and with no gradient of the final state it never starts.
        bool carry_p = any_nonzero(n, gp);
        for (int64_t t = T - 1; t >= 0; --t) {
            const int64_t i = (row * T + t) * C + c0;
            if (t >= kPrefetchSteps) {
                const int64_t ahead = i - kPrefetchSteps * C;  // ahead in reverse time
                prefetch_block(n, k + ahead);
                prefetch_block(n, v + ahead);
                prefetch_block(n, gy + ahead);
                prefetch_block_for_writing(n, gk + ahead);
                prefetch_block_for_writing(n, gv + ahead);
            }
            const F* st = saved + 3 * kBlock * t;
            if (carry_p) {
                backward_channels<true>(n, w + c0, u + c0, k + i, v + i, gy + i, st,
                                        st + kBlock, st + 2 * kBlock, gk + i, gv + i, ga, gb,
                                        gp, gwb, gub);
                carry_p = any_nonzero(n, gp);
            } else {
                backward_channels<false>(n, w + c0, u + c0, k + i, v + i, gy + i, st,
                                         st + kBlock, st + 2 * kBlock, gk + i, gv + i, ga, gb,
                                         gp, gwb, gub);
            }
        }
        for (int64_t c = 0; c < n; ++c) {
            gw[s + c] = gwb[c];
            gu[s + c] = gub[c];
            if (ga0) ga0[s + c] = ga[c];
            if (gb0) gb0[s + c] = gb[c];
            // p scales a and b: dL/dA * A + dL/dB * B = ga*a + gb*b, plus what is left of G
            if (gp0 && a0 && b0) gp0[s + c] = ga[c] * a0[s + c] + gb[c] * b0[s + c] + gp[c];
        }
    });
}

template <typename F>
void backward_impl(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                   const F* v, const F* a0, const F* b0, const F* p0, const F* gy,
                   const F* gaT, const F* gbT, const F* gpT, F* gw, F* gu, F* gk, F* gv,
                   F* ga0, F* gb0, F* gp0) {
    // the saved state of a block fits in cache, and every thread has work
    const auto fits = [&](int64_t block) {
        return 3 * T * block * static_cast<int64_t>(sizeof(F)) <= kBackwardScratchBytes &&
               B * ((C + block - 1) / block) >= 2 * at::get_num_threads();
    };
    if (fits(128))
        backward_blocks<128>(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, gw, gu, gk,
                             gv, ga0, gb0, gp0);
    else if (fits(64))
        backward_blocks<64>(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, gw, gu, gk,
                            gv, ga0, gb0, gp0);
    else
        backward_blocks<32>(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, gw, gu, gk,
                            gv, ga0, gb0, gp0);
}

}  // namespace

// Entry points called by wkv_ops.cpp (declared there). All arrays contiguous; w and u have
// C entries, k, v, y, gy, gk, gv are (B, T, C), states and gw, gu are (B, C).
// Optional pointers may be null: a0/b0/p0 (start from the empty state), gaT/gbT/gpT (a
// zero gradient of that part of the final state), ga0/gb0/gp0 (initial-state gradient not
// wanted).
// gw and gu are per batch row; the caller sums them over the batch.

void wkv_forward_cpu(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                     const float* k, const float* v, const float* a0, const float* b0,
                     const float* p0, float* y, float* aT, float* bT, float* pT) {
    forward_impl(B, T, C, w, u, k, v, a0, b0, p0, y, aT, bT, pT);
}

void wkv_forward_cpu(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                     const double* k, const double* v, const double* a0, const double* b0,
                     const double* p0, double* y, double* aT, double* bT, double* pT) {
    forward_impl(B, T, C, w, u, k, v, a0, b0, p0, y, aT, bT, pT);
}

void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                      const float* k, const float* v, const float* a0, const float* b0,
                      const float* p0, const float* gy, const float* gaT, const float* gbT,
                      const float* gpT, float* gw, float* gu, float* gk, float* gv,
                      float* ga0, float* gb0, float* gp0) {
    backward_impl(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, gw, gu, gk, gv, ga0, gb0,
                  gp0);
}

void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const double* w, const double* u,
                      const double* k, const double* v, const double* a0, const double* b0,
                      const double* p0, const double* gy, const double* gaT, const double* gbT,
                      const double* gpT, double* gw, double* gu, double* gk, double* gv,
                      double* ga0, double* gb0, double* gp0) {
    backward_impl(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, gw, gu, gk, gv, ga0, gb0,
                  gp0);
}
