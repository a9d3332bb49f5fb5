// A small host emulator for the fastbn CUDA kernels (tests only).
//
// Runs the unmodified kernel source, compiled by the host C++ compiler, so the
// kernels' indexing, merges, barriers and last-block-done logic can be tested
// on machines without a GPU.  Each CUDA thread is a ucontext fiber; blocks run
// one after another in linear block order.  __syncthreads() is a block-wide
// barrier and every shuffle a warp-wide one; a barrier that can never complete
// (threads of a block waiting at different barriers, or some exited while
// others wait) is reported as an error, as are shuffles in partial warps.
// Memory ordering, occupancy and speed are out of scope: this checks logic and
// numerics (host float / double arithmetic is IEEE like the GPU's, and the
// kernels spell their fused multiply-adds explicitly).
#ifndef FASTBN_TESTS_CUDA_EMU_H
#define FASTBN_TESTS_CUDA_EMU_H

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>
#include <ucontext.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

enum Wait { RUNNING = 0, AT_BLOCK_BARRIER = 1, AT_WARP_BARRIER = 2, DONE = 3 };

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int linear;
    int state;
    std::vector<char> stack;
};

struct Launch {
    dim3 grid, block;
    uint3 block_idx;
    std::vector<Fiber> fibers;
    ucontext_t sched;
    Fiber* cur = nullptr;
    int nthreads = 0;
    unsigned long long shfl[1024];  // exchange slots, one per thread
    std::string error;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
};

inline Launch& L() {
    static Launch l;
    return l;
}

inline void fail(const char* msg) {
    if (L().error.empty()) L().error = msg;
}

inline void yield(int state) {
    Launch& l = L();
    Fiber* f = l.cur;
    f->state = state;
    swapcontext(&f->ctx, &l.sched);
}

inline void trampoline() {
    Launch& l = L();
    l.body(l.body_arg);
    l.cur->state = DONE;
    swapcontext(&l.cur->ctx, &l.sched);
}

// Run one block to completion.  Returns false on a deadlocked barrier.
inline bool run_block() {
    Launch& l = L();
    const int n = l.nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber& f = l.fibers[i];
        f.state = RUNNING;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
    }
    for (;;) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            Fiber& f = l.fibers[i];
            if (f.state != RUNNING) continue;
            l.cur = &f;
            swapcontext(&l.sched, &f.ctx);
            ran = true;
        }
        if (!l.error.empty()) return false;
        int done = 0, at_block = 0;
        for (int i = 0; i < n; ++i) {
            done += l.fibers[i].state == DONE;
            at_block += l.fibers[i].state == AT_BLOCK_BARRIER;
        }
        if (done == n) return true;
        bool released = false;
        if (at_block > 0) {
            if (at_block + done == n && done == 0) {
                for (int i = 0; i < n; ++i) l.fibers[i].state = RUNNING;
                released = true;
            } else if (at_block + done == n) {
                fail("__syncthreads() reached while other threads of the block had exited");
                return false;
            }
        }
        // Warp barriers: release a warp when all its threads wait at one.
        for (int w0 = 0; w0 < n; w0 += 32) {
            const int w1 = w0 + 32 < n ? w0 + 32 : n;
            int waiting = 0;
            for (int i = w0; i < w1; ++i) waiting += l.fibers[i].state == AT_WARP_BARRIER;
            if (waiting == 0) continue;
            if (waiting == w1 - w0) {
                for (int i = w0; i < w1; ++i) l.fibers[i].state = RUNNING;
                released = true;
            }
        }
        if (!released && !ran) {
            fail("deadlock: threads wait at barriers that cannot complete");
            return false;
        }
    }
}

template <class... A, size_t... I>
void call(void (*k)(A...), std::tuple<A...>& args, std::index_sequence<I...>) {
    k(std::get<I>(args)...);
}

template <class... A>
struct Bound {
    void (*k)(A...);
    std::tuple<A...> args;
    static void run(void* p) {
        Bound* b = static_cast<Bound*>(p);
        call(b->k, b->args, std::index_sequence_for<A...>{});
    }
};

template <class T>
T read_arg(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

// Kernel parameter sizes (the arguments CuPy would pack must match them).
template <class... A>
int arg_sizes(void (*)(A...), int* out) {
    const int sizes[] = {0, (int)sizeof(A)...};
    for (size_t i = 0; i < sizeof...(A); ++i) out[i] = sizes[i + 1];
    return (int)sizeof...(A);
}

template <class... A, size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>(read_arg<A>(args[I])...);
}

template <class... A>
int launch(void (*k)(A...), const unsigned* g, const unsigned* b, void** args, char* err,
           int errlen) {
    Launch& l = L();
    l.error.clear();
    l.grid = dim3(g[0], g[1], g[2]);
    l.block = dim3(b[0], b[1], b[2]);
    l.nthreads = (int)(b[0] * b[1] * b[2]);
    if (l.nthreads < 1 || l.nthreads > 1024) {
        std::snprintf(err, errlen, "bad block size %d", l.nthreads);
        return 1;
    }
    if ((int)l.fibers.size() < l.nthreads) l.fibers.resize(l.nthreads);
    int i = 0;
    for (unsigned z = 0; z < b[2]; ++z)
        for (unsigned y = 0; y < b[1]; ++y)
            for (unsigned x = 0; x < b[0]; ++x, ++i) {
                Fiber& f = l.fibers[i];
                f.tid = make_uint3(x, y, z);
                f.linear = i;
                if (f.stack.empty()) f.stack.resize(64 * 1024);
            }
    Bound<A...> bound{k, unpack<A...>(args, std::index_sequence_for<A...>{})};
    l.body = &Bound<A...>::run;
    l.body_arg = &bound;
    for (unsigned z = 0; z < g[2]; ++z)
        for (unsigned y = 0; y < g[1]; ++y)
            for (unsigned x = 0; x < g[0]; ++x) {
                l.block_idx = make_uint3(x, y, z);
                if (!run_block()) {
                    std::snprintf(err, errlen, "block (%u, %u, %u): %s", x, y, z,
                                  l.error.c_str());
                    return 1;
                }
            }
    return 0;
}

}  // namespace emu

#define threadIdx (emu::L().cur->tid)
#define blockIdx (emu::L().block_idx)
#define blockDim (emu::L().block)
#define gridDim (emu::L().grid)

inline void __syncthreads() { emu::yield(emu::AT_BLOCK_BARRIER); }
inline void __threadfence() {}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, int delta, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    emu::Launch& l = emu::L();
    const int me = l.cur->linear;
    if (mask != 0xffffffffu || width != 32) emu::fail("emulator: only full-warp shuffles");
    if (l.nthreads % 32) emu::fail("shuffle in a block that is not a whole number of warps");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    l.shfl[me] = bits;
    emu::yield(emu::AT_WARP_BARRIER);
    const int lane = me & 31;
    const int src = lane + delta < 32 ? me + delta : me;
    bits = l.shfl[src];
    emu::yield(emu::AT_WARP_BARRIER);    // nobody overwrites a slot before all have read
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}
inline unsigned int atomicExch(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = v;
    return old;
}
inline double __ldcg(const double* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
using std::fma;
using std::fmaf;
using std::sqrt;

#endif  // FASTBN_TESTS_CUDA_EMU_H
