// Runs the chunked CUDA kernels' code (cuda/wkv_chunked.h) on the CPU, for the tests.
//
// Each thread of a CUDA block becomes a fiber (a ucontext with its own stack) running the
// very function the kernel runs, wkv_chunked_forward_thread / wkv_chunked_backward_thread.
// Its sync() -- __syncthreads() on the GPU -- yields to a scheduler, which resumes the
// threads one after another in a chosen order (0: ascending, 1: descending, 2: shuffled
// with a seed) until all of them wait at the barrier, then starts the next round. So
// between two barriers one thread may run entirely before or after another, as on a GPU:
// a missing barrier lets a thread read shared memory before, or after, another thread
// wrote it, depending on the order, and the tests compare the orders bit for bit. The
// scheduler also checks that all threads reach the same barriers (a barrier skipped by
// some threads hangs or corrupts a real block) and reports it as an error.
// Blocks run one after another, with shared memory poisoned in between.
//
// Plain C functions on raw pointers, compiled with g++ and called through ctypes.
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "wkv_chunked.h"

namespace {

constexpr size_t kStackBytes = 128 * 1024;

struct Scheduler;

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    int barriers = 0;  // barriers reached so far
    bool done = false;
};

struct Scheduler {
    ucontext_t main;
    std::vector<Fiber> fibers;
    void (*body)(Scheduler*, int tid) = nullptr;
    const void* problem = nullptr;
    int64_t block = 0;
    void* smem = nullptr;

    void yield(int tid) {
        ++fibers[tid].barriers;
        swapcontext(&fibers[tid].context, &main);
    }
};

// makecontext passes ints only: the scheduler travels through this variable.
thread_local Scheduler* g_scheduler = nullptr;

void fiber_entry(int tid) {
    Scheduler* s = g_scheduler;
    s->body(s, tid);
    s->fibers[tid].done = true;  // returning resumes uc_link, the scheduler
}

struct FiberSync {
    Scheduler* s;
    int tid;
    void operator()() const { s->yield(tid); }
};

// Runs one block; returns 0, or 2 when the threads did not meet at the same barriers.
int run_block(Scheduler& s, int threads, const std::vector<int>& order) {
    s.fibers.resize(threads);
    for (int tid = 0; tid < threads; ++tid) {
        Fiber& f = s.fibers[tid];
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
        f.barriers = 0;
        f.done = false;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &s.main;
        makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_entry), 1, tid);
    }
    g_scheduler = &s;
    for (;;) {
        for (int tid : order) {
            if (!s.fibers[tid].done) swapcontext(&s.main, &s.fibers[tid].context);
        }
        const Fiber& first = s.fibers[order[0]];
        for (int tid : order) {
            const Fiber& f = s.fibers[tid];
            if (f.done != first.done || f.barriers != first.barriers) return 2;
        }
        if (first.done) return 0;
    }
}

template <typename F, class Body>
int run_blocks(const WkvChunkedProblem<F>& P, bool backward, int order, unsigned seed) {
    const WkvChunkLayout& lay = P.lay;
    std::vector<F> smem(wkv_chunked_smem_values(lay, backward));
    std::mt19937 rng(seed);
    Scheduler s;
    s.problem = &P;
    s.smem = smem.data();
    s.body = [](Scheduler* sch, int tid) {
        const auto& Q = *static_cast<const WkvChunkedProblem<F>*>(sch->problem);
        const WkvChunkThread th = wkv_chunk_thread(Q, sch->block, tid);
        FiberSync sync{sch, tid};
        Body::run(Q, th, static_cast<F*>(sch->smem), sync);
    };
    std::vector<int> ids(lay.threads);
    for (int64_t block = 0; block < lay.blocks; ++block) {
        std::iota(ids.begin(), ids.end(), 0);
        if (order == 1) std::reverse(ids.begin(), ids.end());
        if (order == 2) std::shuffle(ids.begin(), ids.end(), rng);
        std::fill(smem.begin(), smem.end(), F(-7.25e30));  // stale values must not matter
        s.block = block;
        const int rc = run_block(s, lay.threads, ids);
        if (rc != 0) return rc;
    }
    return 0;
}

struct ForwardBody {
    template <typename F, class Sync>
    static void run(const WkvChunkedProblem<F>& P, const WkvChunkThread& th, F* sm, Sync& sync) {
        wkv_chunked_forward_thread(P, th, sm, sync);
    }
};

struct BackwardBody {
    template <typename F, class Sync>
    static void run(const WkvChunkedProblem<F>& P, const WkvChunkThread& th, F* sm, Sync& sync) {
        wkv_chunked_backward_thread(P, th, sm, sync);
    }
};

template <typename F>
WkvChunkedProblem<F> problem(int64_t B, int64_t T, int64_t C, int chunks) {
    WkvChunkedProblem<F> P{};
    P.B = B;
    P.T = T;
    P.C = C;
    P.lay = wkv_chunk_layout(B, T, C, chunks);
    return P;
}

template <typename F>
int forward(int64_t B, int64_t T, int64_t C, int chunks, int order, unsigned seed, const F* w,
            const F* u, const F* k, const F* v, const F* a0, const F* b0, const F* p0, F* y,
            F* aT, F* bT, F* pT) {
    if (chunks < 1 || chunks > kWkvMaxChunks) return 1;
    WkvChunkedProblem<F> P = problem<F>(B, T, C, chunks);
    P.w = w, P.u = u, P.k = k, P.v = v, P.a0 = a0, P.b0 = b0, P.p0 = p0;
    P.y = y, P.aT = aT, P.bT = bT, P.pT = pT;
    return run_blocks<F, ForwardBody>(P, false, order, seed);
}

template <typename F>
int backward(int64_t B, int64_t T, int64_t C, int chunks, int order, unsigned seed, const F* w,
             const F* u, const F* k, const F* v, const F* a0, const F* b0, const F* p0,
             const F* gy, const F* gaT, const F* gbT, const F* gpT, int exact_p, F* saved_p,
             F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0) {
    if (chunks < 1 || chunks > kWkvMaxChunks) return 1;
    WkvChunkedProblem<F> P = problem<F>(B, T, C, chunks);
    P.w = w, P.u = u, P.k = k, P.v = v, P.a0 = a0, P.b0 = b0, P.p0 = p0;
    P.gy = gy, P.gaT = gaT, P.gbT = gbT, P.gpT = gpT, P.exact_p = exact_p;
    P.saved_p = saved_p, P.gw = gw, P.gu = gu, P.gk = gk, P.gv = gv;
    P.ga0 = ga0, P.gb0 = gb0, P.gp0 = gp0;
    return run_blocks<F, BackwardBody>(P, true, order, seed);
}

}  // namespace

#define WKV_HARNESS(F, SUFFIX)                                                                 \
    extern "C" int wkv_harness_forward_##SUFFIX(                                               \
        int64_t B, int64_t T, int64_t C, int chunks, int order, unsigned seed, const F* w,     \
        const F* u, const F* k, const F* v, const F* a0, const F* b0, const F* p0, F* y,       \
        F* aT, F* bT, F* pT) {                                                                 \
        return forward(B, T, C, chunks, order, seed, w, u, k, v, a0, b0, p0, y, aT, bT, pT);   \
    }                                                                                          \
    extern "C" int wkv_harness_backward_##SUFFIX(                                              \
        int64_t B, int64_t T, int64_t C, int chunks, int order, unsigned seed, const F* w,     \
        const F* u, const F* k, const F* v, const F* a0, const F* b0, const F* p0,             \
        const F* gy, const F* gaT, const F* gbT, const F* gpT, int exact_p, F* saved_p,        \
        F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0) {                                  \
        return backward(B, T, C, chunks, order, seed, w, u, k, v, a0, b0, p0, gy, gaT, gbT,    \
                        gpT, exact_p, saved_p, gw, gu, gk, gv, ga0, gb0, gp0);                 \
    }

WKV_HARNESS(float, f32)
WKV_HARNESS(double, f64)

// The layout and the by-shape rule, for the tests.
extern "C" void wkv_harness_layout(int64_t B, int64_t T, int64_t C, int chunks, int64_t* out) {
    const WkvChunkLayout lay = wkv_chunk_layout(B, T, C, chunks);
    out[0] = lay.J;
    out[1] = lay.n_ch;
    out[2] = lay.threads;
    out[3] = lay.L;
    out[4] = lay.groups;
    out[5] = lay.blocks;
}

extern "C" int wkv_harness_auto_chunks(int64_t B, int64_t T, int64_t C, int multiprocessors) {
    return wkv_auto_chunks(B, T, C, multiprocessors);
}

extern "C" int wkv_harness_max_chunks() { return kWkvMaxChunks; }
extern "C" int wkv_harness_max_threads() { return kWkvMaxThreads; }
