// The WKV recurrence of RWKV-4 for one (batch, channel) pair, one time step at a time.
//
// This header is the single definition of the arithmetic: the CPU kernels (wkv_cpu.cpp,
// compiled by the host C++ compiler) and the CUDA kernels (wkv_cuda.cu, compiled by nvcc)
// both call these functions, so the CPU tests check the math the GPU runs. One part
// differs by platform: the exponential of wkv_rescale, CUDA's expf on the GPU and an
// inlined polynomial on the CPU (wkv_exp_nonpositive), both within 2 ulp of e^x.
//
// Notation (docs/rwkv4.md, section 7): w = -exp(time_decay) < 0, u = time_first. The sums
// of the past are kept as numerator A = a*e^p and denominator B = b*e^p, so that a and b
// stay of order 1 (b >= 1 after the first token) whatever the size of k.
//
//   output:  y_t = (A + e^{u+k_t} v_t) / (B + e^{u+k_t})
//   update:  A <- e^w A + e^{k_t} v_t,   B <- e^w B + e^{k_t}
//
// Backward, walking t from T-1 down to 0. Let gA, gB be dL/dA, dL/dB for the state before
// token t and gA', gB' for the state after it; gy = dL/dy_t and den = B + e^{u+k_t}:
//
//   dL/dv_t  = gy e^{u+k}/den        + gA' e^{k}
//   dL/dk_t  = gy e^{u+k}(v-y)/den   + gA' e^{k} v + gB' e^{k}
//   dL/du   += gy e^{u+k}(v-y)/den
//   dL/dw   += gA' e^w A + gB' e^w B
//   gA       = gy/den + e^w gA',     gB = -gy y/den + e^w gB'
//
// gA and gB scale like e^{-p}, so we carry ga = gA*e^p and gb = gB*e^p instead, which are
// bounded by the sum of |dL/dy|. In these scaled terms every exponential above becomes one
// of the two weights the forward step computes, each at most 1 (see wkv_backward_step),
// so nothing overflows whatever the size of k.
//
// p on its own. The outputs depend on A and B only, but a loss may also use the final
// (a, b, p) directly. With ga, gb, gp = dL/da, dL/db, dL/dp of the final state, a = A e^{-p}
// and b = B e^{-p} give dL/dA = ga e^{-p}, dL/dB = gb e^{-p} (the scaled adjoints above),
// and leave G = gp - ga a - gb b as the gradient of p with A and B held fixed (G = 0 when
// the state only feeds a next call). p follows the max chain p' = max(p + w, k_t), so
// walking back: where step t took the p + w side, G passes to the p before it and
// dL/dw += G; where it took k_t, dL/dk_t += G and G stops. What is left at t = 0 adds to
// dL/dp0 = ga a0 + gb b0. A tie (p + w == k_t) counts as the p + w side, as in
// wkv_rescale; torch.maximum would split G in halves there (both are subgradients of max).
#pragma once

#include <cmath>
#include <cstring>

#ifdef __CUDACC__
#define WKV_HD __host__ __device__ __forceinline__
#else
#define WKV_HD inline
#endif

// "Minus infinity" for p in the empty state: finite, so p - q never becomes inf - inf.
#define WKV_P_EMPTY (-1e38)

WKV_HD float wkv_exp(float x) { return expf(x); }
WKV_HD double wkv_exp(double x) { return exp(x); }

// e^x for x <= 0, the only exponential the recurrence itself takes (wkv_rescale).
#ifdef __CUDACC__
WKV_HD float wkv_exp_nonpositive(float x) { return expf(x); }
#else
// On the CPU, written out so that it is inlined into the vectorized channel loops.
// A call to glibc's vector expf costs more than the arithmetic: the call saves and
// restores the loop's vector registers, and an argument below about -87 (the empty
// state's p = -1e38 at the first token) sends its whole vector down a scalar path.
// Range reduction x = n ln2 + r, |r| <= ln2/2, and the polynomial of Cephes' expf
// (relative error below 2 ulp, tests/test_extension.py). Below -87 the result
// (< 1.7e-38, about 2^-125) is returned as 0: no subnormal numbers enter the sums, whose
// other term is at least 1 (one weight of wkv_rescale is exactly 1).
inline float wkv_exp_nonpositive(float x) {
    const bool tiny = x < -87.0f;
    const float xc = tiny ? -87.0f : x;
    // round x / ln2 to the nearest integer: adding and subtracting 1.5 * 2^23 does it in
    // round-to-nearest arithmetic (the code is not compiled with -ffast-math)
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, two parts
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    const float poly = (q * r) * r + r + 1.0f;
    const int bits = (static_cast<int>(n) + 127) << 23;  // 2^n, n in [-126, 0]
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));  // the bits as a float (compiled to a move)
    return tiny ? 0.0f : poly * scale;
}
#endif
WKV_HD double wkv_exp_nonpositive(double x) { return exp(x); }

// Two terms e^x and e^y, rescaled by the larger: m = max(x, y), ex = e^{x-m}, ey = e^{y-m}.
// One of ex, ey is exactly 1, so a single exp of -|x-y| gives both. Written with
// selects rather than branches (and without fmaxf, whose NaN rules stop g++ from
// vectorizing) so that the CPU loop over channels becomes SIMD code.
template <typename F>
WKV_HD void wkv_rescale(F x, F y, F& m, F& ex, F& ey) {
    const F d = x - y;
    const bool x_larger = d >= F(0);
    const F e = wkv_exp_nonpositive(x_larger ? -d : d);
    m = x_larger ? x : y;
    ex = x_larger ? F(1) : e;
    ey = x_larger ? e : F(1);
}

// State update only: (a, b, p) before token t -> after it.
template <typename F>
WKV_HD void wkv_update_step(F w, F k, F v, F& a, F& b, F& p) {
    F q, e1, e2;
    wkv_rescale(p + w, k, q, e1, e2);  // decay the past by e^w, add e^k
    a = e1 * a + e2 * v;
    b = e1 * b + e2;
    p = q;
}

// One forward step: returns y_t and advances the state.
template <typename F>
WKV_HD F wkv_forward_step(F w, F u, F k, F v, F& a, F& b, F& p) {
    F q, e1, e2;
    wkv_rescale(p, u + k, q, e1, e2);  // the current token gets the bonus u
    const F y = (e1 * a + e2 * v) / (e1 * b + e2);
    wkv_update_step(w, k, v, a, b, p);
    return y;
}

// One backward step at time t, walking from t = T-1 down to 0.
// In: the forward state (a, b, p) before token t, k_t, v_t, gy = dL/dy_t, and the scaled
// adjoints (ga, gb) after token t. Out: (ga, gb) before token t, gk, gv for this t;
// gw and gu are accumulated (dL/dw and dL/du for this batch row and channel).
template <typename F>
WKV_HD void wkv_backward_step(F w, F u, F k, F v, F gy, F a, F b, F p, F& ga, F& gb,
                              F& gw, F& gu, F& gk, F& gv) {
    F q, e1o, e2o;
    wkv_rescale(p, u + k, q, e1o, e2o);  // output weights, scaled by e^q
    const F inv_den = F(1) / (e1o * b + e2o);  // den = e^q / inv_den, and inv_den <= 1
    const F y = (e1o * a + e2o * v) * inv_den;
    const F g = gy * inv_den;
    F e1u, e2u;
    wkv_rescale(p + w, k, q, e1u, e2u);  // e1u = e^{w + p - p'}, e2u = e^{k - p'}
    const F g_now = g * e2o;  // dL/dy_t * e^{u+k}/den (scaled)
    const F g_uk = g_now * (v - y);  // through y_t, d/du = d/dk
    gu += g_uk;
    gk = g_uk + e2u * (ga * v + gb);
    gv = g_now + e2u * ga;
    gw += e1u * (ga * a + gb * b);
    const F g_past = g * e1o;  // dL/dy_t * e^p/den
    ga = g_past + e1u * ga;
    gb = e1u * gb - g_past * y;
}

// The rest of the backward step at time t: the path of p alone ("p on its own" above).
// In: p before token t and gp = G after it. Out: G before token t; gk (of this step's
// wkv_backward_step) and gw get their share.
template <typename F>
WKV_HD void wkv_backward_p_step(F w, F k, F p, F& gp, F& gk, F& gw) {
    const bool decayed = (p + w) - k >= F(0);  // the side wkv_rescale took for p'
    gk += decayed ? F(0) : gp;
    gw += decayed ? gp : F(0);
    gp = decayed ? gp : F(0);
}
