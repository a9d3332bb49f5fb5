// Shared machinery of the fastbn CUDA kernels (stats.cu, normalize.cu, backward.cu).
//
// Kernels are C++ templates over the storage type T (float, double, __half,
// __nv_bfloat16) and the accumulation / math type A: float for float, half and
// bfloat16 data and double for double data in the statistics and element-wise
// kernels; double for every T in the backward sums (see Numerics).
// fastbn/_gpu.py loads every .cu file into one cupy.RawModule (this header is
// inlined into the source it compiles) and names the template instances it
// needs through name_expressions.
//
// Two canonical views, as on the CPU (DESIGN.md section 2):
//   channels-first: x is a C-contiguous (N, C, S) array;
//   channels-last:  x is a C-contiguous (M, C) array.
//
// Grids.  Channels-first kernels run on a (C, splits) grid of 1-D blocks:
// block (c, s) owns the s-th of `splits` equal, contiguous ranges of channel
// c's N*S elements, so a small C still fills the GPU.  Channels-last kernels
// run on a (tiles, splits) grid of (TX, TY) blocks: tile t owns TX lanes of
// VEC adjacent channels, split s a contiguous range of rows, each thread every
// TY-th row of it.  A reduction and the element-wise pass that follows it use
// the same geometry (launch_geometry in _gpu.py), and the element-wise pass
// walks each thread's range backwards, so it starts on the data the
// reduction read last (still in L2).
//
// Numerics.
// - Statistics: Welford per thread on x - shift (shift = the channel's first
//   element, as on the CPU, so a large mean costs no precision in float).
//   Values are folded in batches (one vector, or one vector of each of the
//   kUnroll loads in flight): the batch's mean and M2 by two passes in
//   registers, then one Chan merge into a short-lived local state in A, which
//   is merged into the thread's double state every kFlush values.  So the
//   per-element work is float arithmetic with one division per batch, and the
//   rounding errors of the float stages are independent and averaged by the
//   double merges.  Seen in the emulator on float32 data: the mean within
//   0.3 * 2^-24 of the spread, invstd within 0.3 * 2^-24 relative (half types:
//   100 times closer), a few units of float rounding below the CPU's float64
//   statistics' accuracy, which the GPU tests allow for.  Warp, block and
//   cross-block merges use the same merge formula in double.
// - Gradient sums: sum(dy) and sum(dy * (x - mean)) per thread in A = double
//   for every storage type (backward.cu is instantiated <T, double>).  These
//   sums cancel: a float accumulator leaves errors of eps_f * sqrt(n) * rms(term)
//   (about 1e-5 for n = 4000), far above a float32 ulp of a small dweight or
//   dbias, while float products of float inputs are exact in double.
// - Element-wise passes compute in A (float, or double for double data) with
//   the mean split in two, t = (x - hi) - lo, hi + lo = mean, as on the CPU's
//   float paths (the CPU keeps the training dx in double; here it is float,
//   within the float32 tolerance in every test).
// - Determinism: every merge happens in an order fixed by the launch geometry
//   (per-thread order, shuffle tree, shared-memory tree, cross-block partials
//   in split order); no floating-point atomics.  Same inputs and geometry give
//   the same bits.
//
// Cross-block merge: each block writes its partial to a workspace, then
// last_block_done() (threadfence + atomic counter per channel or channel tile)
// elects the block that arrives last; it merges all partials in split order
// and finalises (mean, invstd, running statistics, coefficient table) in the
// same launch.  It also resets its counter to zero, so the counters need no
// clearing between launches (the first use gets them from cupy.zeros).
#ifndef FASTBN_CUDA_FASTBN_CUH
#define FASTBN_CUDA_FASTBN_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace fbn {

constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 256;     // threads per block, every kernel
constexpr int kUnroll = 4;           // independent loads in flight per thread
constexpr int kFlush = 32;           // values per local float Welford state
constexpr int kTreeLanes = 4;        // channels-last: lanes per column-tree pass
// Channels-last block trees: kMaxThreads * kTreeLanes double states (24-byte
// Welford, 16-byte gradient sums).
constexpr int kSmemBytes = kMaxThreads * kTreeLanes * 24;

// Element-wise operations and where their per-channel coefficients come from.
enum { OP_FWD = 0, OP_BWD_TRAIN = 1, OP_BWD_EVAL = 2 };
enum { MODE_TABLE = 0, MODE_INFER = 1, MODE_EVAL = 2 };

// ---------------------------------------------------------------------------
// storage types
//   P    parameter / running-statistics type (float32 serves half types)
//   M    math type of the element-wise passes (the A they are instantiated with)
//   VEC  elements per 16-byte vector

template <class T> struct Traits;
template <> struct Traits<float> { typedef float P; typedef float M; enum { VEC = 4 }; };
template <> struct Traits<double> { typedef double P; typedef double M; enum { VEC = 2 }; };
template <> struct Traits<__half> { typedef float P; typedef float M; enum { VEC = 8 }; };
template <> struct Traits<__nv_bfloat16> { typedef float P; typedef float M; enum { VEC = 8 }; };
template <class T> using MathT = typename Traits<T>::M;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round once to the storage type (round to nearest even).
__device__ __forceinline__ void narrow(float& d, float v) { d = v; }
__device__ __forceinline__ void narrow(double& d, double v) { d = v; }
__device__ __forceinline__ void narrow(__half& d, float v) { d = __float2half_rn(v); }
__device__ __forceinline__ void narrow(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }

// V elements moved as one access: 16 bytes when V = VEC (the caller has
// checked 16-byte alignment of the pointer), one element when V = 1.
template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <int V, class T>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <int V, class T>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
}

__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------------------
// Welford state and the one merge formula (Chan et al.), used everywhere:
// thread batches, the flush into double, warp shuffles, block trees and the
// cross-block finalise.

template <class A, class I> struct Welford { A mean; A m2; I n; };
typedef Welford<double, double> WelfordD;

// (ma, m2a) <- (ma, m2a) merged with (mb, m2b), given r = nb / (na + nb) and
// w = na * r.
template <class A>
__device__ __forceinline__ void merge_moments(A& ma, A& m2a, A mb, A m2b, A r, A w) {
    const A d = mb - ma;
    ma = fma_(d, r, ma);
    m2a = m2a + m2b + d * d * w;
}

template <class A, class I>
__device__ __forceinline__ Welford<A, I> merge(const Welford<A, I>& a, const Welford<A, I>& b) {
    if (b.n == 0) return a;
    Welford<A, I> o = a;
    o.n = a.n + b.n;
    const A r = A(b.n) / A(o.n);
    merge_moments(o.mean, o.m2, b.mean, b.m2, r, A(a.n) * r);
    return o;
}

__device__ __forceinline__ WelfordD empty_state(WelfordD*) {
    WelfordD e;
    e.mean = 0.0;
    e.m2 = 0.0;
    e.n = 0.0;
    return e;
}

// A thread's statistics of L channels (lanes), which all see the same number
// of values.  Batches of K values per lane (K a power of two; values already
// shifted) fold into local states in A: the batch's mean and M2 by two passes
// in registers, then one merge.  Every kFlush values per lane the local states
// are merged into double totals.  The lanes share the counts and so the merge
// weights: one division per batch for all of them.
template <class A, int L>
struct Stats {
    A lmean[L], lm2[L];
    double tmean[L], tm2[L];
    int ln;
    double tn;

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            lmean[j] = A(0);
            lm2[j] = A(0);
            tmean[j] = 0.0;
            tm2[j] = 0.0;
        }
        ln = 0;
        tn = 0.0;
    }
    // v[j * K + i]: value i of lane j.
    template <int K>
    __device__ __forceinline__ void add(const A (&v)[L * K]) {
        const int n = ln + K;
        const A r = A(K) / A(n);
        const A w = A(ln) * r;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            A s = v[j * K];
#pragma unroll
            for (int i = 1; i < K; ++i) s += v[j * K + i];
            const A m = s * (A(1) / A(K));
            A q = A(0);
#pragma unroll
            for (int i = 0; i < K; ++i) {
                const A d = v[j * K + i] - m;
                q = fma_(d, d, q);
            }
            merge_moments(lmean[j], lm2[j], m, q, r, w);
        }
        ln = n;
        if (ln >= kFlush) flush();
    }
    __device__ __forceinline__ void flush() {
        if (ln == 0) return;
        const double n = tn + ln;
        const double r = ln / n;
        const double w = tn * r;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            merge_moments(tmean[j], tm2[j], (double)lmean[j], (double)lm2[j], r, w);
            lmean[j] = A(0);
            lm2[j] = A(0);
        }
        tn = n;
        ln = 0;
    }
    // Lane j's state, after flush().
    __device__ __forceinline__ WelfordD result(int j) const {
        WelfordD o;
        o.mean = tmean[j];
        o.m2 = tm2[j];
        o.n = tn;
        return o;
    }
};


__device__ __forceinline__ WelfordD shfl_down(const WelfordD& w, int off) {
    WelfordD o;
    o.mean = __shfl_down_sync(kFullMask, w.mean, off);
    o.m2 = __shfl_down_sync(kFullMask, w.m2, off);
    o.n = __shfl_down_sync(kFullMask, w.n, off);
    return o;
}

// Gradient sums: s = sum(dy), t = sum(dy * (x - mean)).
template <class A> struct Sum2 { A s; A t; };
typedef Sum2<double> Sum2D;

template <class A>
__device__ __forceinline__ Sum2<A> merge(const Sum2<A>& a, const Sum2<A>& b) {
    Sum2<A> o;
    o.s = a.s + b.s;
    o.t = a.t + b.t;
    return o;
}

__device__ __forceinline__ Sum2D empty_state(Sum2D*) { Sum2D e; e.s = 0.0; e.t = 0.0; return e; }

template <class A>
__device__ __forceinline__ Sum2<A> empty_sum2() { Sum2<A> e; e.s = A(0); e.t = A(0); return e; }

template <class A>
__device__ __forceinline__ Sum2D to_double(const Sum2<A>& v) { Sum2D o; o.s = v.s; o.t = v.t; return o; }

__device__ __forceinline__ Sum2D shfl_down(const Sum2D& v, int off) {
    Sum2D o;
    o.s = __shfl_down_sync(kFullMask, v.s, off);
    o.t = __shfl_down_sync(kFullMask, v.t, off);
    return o;
}

// a[j] <- a[j] merged with b[j] for every lane j of a thread's state array.
// A thread's lanes have seen the same rows, so they share their counts: the
// merge weights are computed once for all of them (the same values, and so
// the same bits, as merge() per lane).
template <int V>
__device__ __forceinline__ void merge_lanes(WelfordD (&a)[V], const WelfordD (&b)[V]) {
    if (b[0].n == 0) return;
    const double n = a[0].n + b[0].n;
    const double r = b[0].n / n;
    const double w = a[0].n * r;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        merge_moments(a[j].mean, a[j].m2, b[j].mean, b[j].m2, r, w);
        a[j].n = n;
    }
}

template <int V>
__device__ __forceinline__ void merge_lanes(Sum2D (&a)[V], const Sum2D (&b)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = merge(a[j], b[j]);
}

// ---------------------------------------------------------------------------
// Reductions over a 1-D block (blockDim.x a multiple of 32, at most 1024).

template <class S>
__device__ __forceinline__ S warp_reduce(S v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = merge(v, shfl_down(v, off));
    return v;                       // lane 0 holds the warp's merge
}

// Thread 0 gets the merge of every thread's v, in a fixed order.  smem holds
// at least 32 states; the leading barrier lets callers reuse it.
template <class S>
__device__ __forceinline__ S block_reduce(S v, S* smem) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_reduce(v);
    __syncthreads();
    if (lane == 0) smem[wid] = v;
    __syncthreads();
    if (wid == 0) {
        v = lane < nwarps ? smem[lane] : empty_state((S*)0);
        v = warp_reduce(v);
    }
    return v;
}

// Merge the states w[0..V) of every thread down the y dimension of a (TX, TY)
// block: on return, threads with ty == 0 hold in w the merge of their column's
// rows 0..TY-1 (pairs folded in a fixed tree).  sm holds TX * TY * min(V,
// kTreeLanes) states; lanes go through it kTreeLanes at a time.  Every thread
// of the block must call it.
template <int V, class S>
__device__ __forceinline__ void column_reduce(S (&w)[V], S* sm) {
    constexpr int VC = V < kTreeLanes ? V : kTreeLanes;
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
    int top = 1;
    while (2 * top < TY) top *= 2;
#pragma unroll
    for (int j0 = 0; j0 < V; j0 += VC) {
        __syncthreads();                 // the previous pass has been read
#pragma unroll
        for (int j = 0; j < VC; ++j) sm[(ty * TX + tx) * VC + j] = w[j0 + j];
        __syncthreads();
        for (int s = top; s > 0; s >>= 1) {
            if (ty < s && ty + s < TY) {
                S a[VC], b[VC];
#pragma unroll
                for (int j = 0; j < VC; ++j) {
                    a[j] = sm[(ty * TX + tx) * VC + j];
                    b[j] = sm[((ty + s) * TX + tx) * VC + j];
                }
                merge_lanes(a, b);
#pragma unroll
                for (int j = 0; j < VC; ++j) sm[(ty * TX + tx) * VC + j] = a[j];
            }
            __syncthreads();
        }
        if (ty == 0) {
#pragma unroll
            for (int j = 0; j < VC; ++j) w[j0 + j] = sm[tx * VC + j];
        }
    }
}

// ---------------------------------------------------------------------------
// Last-block-done: every block of a group calls this after writing its
// partial; it returns true in all threads of the block that arrived last.
//
// Each writer thread fences its partial stores device-wide before the barrier,
// thread 0 then counts the block in with an atomic.  The block that sees
// count == nblocks - 1 fences again before reading the partials (with __ldcg,
// which bypasses L1) and resets the counter to zero for the next launch: every
// other block of the group has already counted itself in, so nothing races
// with the reset, and the next kernel on the stream starts after it.
__device__ __forceinline__ bool last_block_done(unsigned int* counter, unsigned int nblocks) {
    __shared__ unsigned int s_prev;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) s_prev = atomicAdd(counter, 1u);
    __syncthreads();
    const bool last = s_prev == nblocks - 1;
    if (last) {
        __threadfence();
        if (threadIdx.x == 0 && threadIdx.y == 0) atomicExch(counter, 0u);
    }
    return last;
}

// Workspace partials: three (or two) arrays of `stride` doubles, struct of
// arrays, so that a group's partials are contiguous.
__device__ __forceinline__ void put_partial(double* part, long long stride, long long i,
                                            const WelfordD& w) {
    part[i] = w.mean;
    part[stride + i] = w.m2;
    part[2 * stride + i] = w.n;
}
__device__ __forceinline__ void get_partial(const double* part, long long stride, long long i,
                                            WelfordD& w) {
    w.mean = __ldcg(part + i);
    w.m2 = __ldcg(part + stride + i);
    w.n = __ldcg(part + 2 * stride + i);
}
__device__ __forceinline__ void put_partial(double* part, long long stride, long long i,
                                            const Sum2D& v) {
    part[i] = v.s;
    part[stride + i] = v.t;
}
__device__ __forceinline__ void get_partial(const double* part, long long stride, long long i,
                                            Sum2D& v) {
    v.s = __ldcg(part + i);
    v.t = __ldcg(part + stride + i);
}

// Channels-first finish across blocks: each of a channel's `splits` blocks
// publishes its block total; the last to finish merges them in split order
// (thread i takes splits i, i + blockDim.x, ...) and reduces over the block.
// True in that last block, where `total` then holds the channel's total.
template <class S>
__device__ __forceinline__ bool merge_block_splits(S& total, S* red, double* part,
                                                   long long C, long long c, long long split,
                                                   long long splits, unsigned int* counter) {
    const long long stride = C * splits;
    if (threadIdx.x == 0) put_partial(part, stride, c * splits + split, total);
    if (!last_block_done(counter + c, (unsigned int)splits)) return false;
    S acc = empty_state((S*)0);
    for (long long k = threadIdx.x; k < splits; k += blockDim.x) {
        S p;
        get_partial(part, stride, c * splits + k, p);
        acc = merge(acc, p);
    }
    total = block_reduce(acc, red);
    return true;
}

// Channels-last finish across blocks: each block publishes its per-column
// states, and the last block of the column tile to finish merges them in
// split order (row ty takes splits ty, ty + TY, ...), then reduces its
// columns.  True in that last block, where row 0 then holds the totals.
template <int V, class S>
__device__ __forceinline__ bool merge_column_splits(S (&st)[V], S* sm, double* part,
                                                    long long C, long long split,
                                                    long long splits, long long c0,
                                                    bool active, unsigned int* counter) {
    const int ty = threadIdx.y, TY = blockDim.y;
    const long long stride = C * splits;
    if (ty == 0 && active) {
#pragma unroll
        for (int j = 0; j < V; ++j) put_partial(part, stride, split * C + c0 + j, st[j]);
    }
    if (!last_block_done(counter, (unsigned int)splits)) return false;
    // Split k's partials for lanes j = 0..V-1 are loaded together (V independent
    // loads of each field), then merged with one set of weights: the chain of
    // dependent steps is splits / TY long, not V times that.
#pragma unroll
    for (int j = 0; j < V; ++j) st[j] = empty_state((S*)0);
    if (active) {
        for (long long k = ty; k < splits; k += TY) {
            S p[V];
#pragma unroll
            for (int j = 0; j < V; ++j) get_partial(part, stride, k * C + c0 + j, p[j]);
            merge_lanes(st, p);
        }
    }
    column_reduce(st, sm);
    return true;
}

// ---------------------------------------------------------------------------
// Per-channel finalisation, in double, the same formulas as fastbn/_cpu.pyx.

template <class P>
__device__ __forceinline__ double param_or(const P* p, long long c, double dflt) {
    return p ? (double)p[c] : dflt;
}

// finish_stats of _cpu.pyx: merged Welford state of x - shift -> mean, invstd,
// running statistics (unbiased variance), and the forward coefficient table
// (mean, weight * invstd, bias, 0).
template <class P>
__device__ __forceinline__ void finish_stats(long long c, double shift, const WelfordD& w,
                                             double factor, double eps, double* mean,
                                             double* invstd, P* rm, P* rv, const P* weight,
                                             const P* bias, double* coef) {
    const double dn = w.n;
    double var = w.m2 / dn;
    if (var < 0.0) var = 0.0;               // rounding only; NaN falls through
    const double m = shift + w.mean;
    const double is = 1.0 / sqrt(var + eps);
    mean[c] = m;
    invstd[c] = is;
    if (rm != 0) {
        rm[c] = (P)((1.0 - factor) * (double)rm[c] + factor * m);
        rv[c] = (P)((1.0 - factor) * (double)rv[c] + factor * (var * dn / (dn - 1.0)));
    }
    coef[4 * c] = m;
    coef[4 * c + 1] = param_or(weight, c, 1.0) * is;
    coef[4 * c + 2] = param_or(bias, c, 0.0);
    coef[4 * c + 3] = 0.0;
}

// grad_coefs of _cpu.pyx: dweight, dbias and the dx coefficients
// dx = a * dy + b * (x - mean) + k (b = k = 0 in eval mode).
template <class P>
__device__ __forceinline__ void finish_grad(long long c, const Sum2D& v, double n, long long training,
                                            const double* mean, const double* invstd,
                                            const P* weight, P* dweight, P* dbias,
                                            double* coef) {
    const double is = invstd[c];
    const double wi = param_or(weight, c, 1.0) * is;
    if (dweight != 0) dweight[c] = (P)(v.t * is);
    if (dbias != 0) dbias[c] = (P)v.s;
    coef[4 * c] = mean[c];
    coef[4 * c + 1] = wi;
    coef[4 * c + 2] = training ? -wi * is * is * v.t / n : 0.0;
    coef[4 * c + 3] = training ? -wi * v.s / n : 0.0;
}

// Coefficients of one channel in the math type: the mean split hi + lo.
template <class M> struct Coef { M hi, lo, a, b, k; };

template <class M>
__device__ __forceinline__ Coef<M> make_coef(double mean, double a, double b, double k) {
    Coef<M> o;
    o.hi = (M)mean;
    o.lo = (M)(mean - (double)o.hi);
    o.a = (M)a;
    o.b = (M)b;
    o.k = (M)k;
    return o;
}

// Where an element-wise pass gets channel c's coefficients:
//   MODE_TABLE  the table a reduction kernel just wrote (mean, a, b, k);
//   MODE_INFER  the running statistics (writer threads also store the mean and
//               invstd used, as the CPU's infer_stats);
//   MODE_EVAL   eval-mode backward without sums: a = weight * invstd.
template <class M, class P>
__device__ __forceinline__ Coef<M> channel_coef(long long mode, long long c, const double* coef,
                                                const double* mean_in, const double* invstd_in,
                                                const P* rm, const P* rv, const P* weight,
                                                const P* bias, double eps, double* mean_out,
                                                double* invstd_out, bool writer) {
    if (mode == MODE_TABLE)
        return make_coef<M>(coef[4 * c], coef[4 * c + 1], coef[4 * c + 2], coef[4 * c + 3]);
    if (mode == MODE_INFER) {
        const double m = (double)rm[c];
        const double is = 1.0 / sqrt((double)rv[c] + eps);
        if (writer) {
            mean_out[c] = m;
            invstd_out[c] = is;
        }
        return make_coef<M>(m, param_or(weight, c, 1.0) * is, param_or(bias, c, 0.0), 0.0);
    }
    return make_coef<M>(mean_in[c], param_or(weight, c, 1.0) * invstd_in[c], 0.0, 0.0);
}

// x - mean: the split mean in float; in double, hi is the mean and lo = 0.
__device__ __forceinline__ float center(float x, const Coef<float>& c) { return (x - c.hi) - c.lo; }
__device__ __forceinline__ double center(double x, const Coef<double>& c) { return x - c.hi; }

//   OP_FWD:        y  = ((x - hi) - lo) * a + b
//   OP_BWD_TRAIN:  dx = a * dy + b * ((x - hi) - lo) + k
//   OP_BWD_EVAL:   dx = a * dy
template <int OP, class M>
__device__ __forceinline__ M apply(const Coef<M>& c, M x, M g) {
    if (OP == OP_FWD) return fma_(center(x, c), c.a, c.b);
    if (OP == OP_BWD_TRAIN) return fma_(c.a, g, fma_(c.b, center(x, c), c.k));
    return c.a * g;
}

// ---------------------------------------------------------------------------
// Walking a channel of the channels-first view in vector units.
//
// Channel c's vectors are numbered v = n * SV + o (sample n, offset o < SV,
// SV = S / V); vector v lies at vector index (n * C + c) * SV + o of x.  A
// thread visits v = first, first + B, ... (B = blockDim.x) below `end`,
// forwards or backwards; the cursor keeps (o, index) and steps them with one
// compare, no division.
struct ChannelCursor {
    long long o, idx;           // offset in the sample, vector index in x
    long long step_o, step_idx; // B % SV, (B / SV) * C * SV + B % SV
    long long SV, wrap;         // SV, (C - 1) * SV
    long long count;            // vectors this thread visits

    __device__ __forceinline__ void init(long long c, long long C, long long SV_, long long first,
                                         long long end, long long B, bool reverse) {
        SV = SV_;
        count = first < end ? (end - first + B - 1) / B : 0;
        if (SV == 0) {                  // S = 0: nothing to visit (and no division)
            o = idx = step_o = step_idx = wrap = count = 0;
            return;
        }
        const long long v = reverse && count > 0 ? first + (count - 1) * B : first;
        const long long n = v / SV;
        o = v - n * SV;
        idx = (n * C + c) * SV + o;
        step_o = B % SV;
        step_idx = (B / SV) * C * SV + step_o;
        wrap = (C - 1) * SV;
    }
    __device__ __forceinline__ void next() {
        o += step_o;
        idx += step_idx;
        if (o >= SV) {
            o -= SV;
            idx += wrap;
        }
    }
    __device__ __forceinline__ void prev() {
        o -= step_o;
        idx -= step_idx;
        if (o < 0) {
            o += SV;
            idx -= wrap;
        }
    }
    __device__ __forceinline__ void step(bool reverse) {
        if (reverse) prev(); else next();
    }
};

// The s-th of `splits` equal contiguous ranges of [0, n).
__device__ __forceinline__ long long range_begin(long long n, long long s, long long splits) {
    return n / splits * s + (n % splits) * s / splits;
}

}  // namespace fbn

#endif  // FASTBN_CUDA_FASTBN_CUH
