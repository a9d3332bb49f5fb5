// Training statistics: one launch per forward computes every channel's mean and
// invstd, updates the running statistics in place and writes the coefficient
// table of the normalise pass (normalize.cu).  See fastbn.cuh for the grids,
// the numerics and the last-block-done finalise.
//
// With one split (a block owns whole channels) and y given, the block goes on
// to normalise its channels in the same launch, re-reading its data newest
// first (from cache): the training forward is then one launch.
#include "elementwise.cuh"

namespace fbn {

// Channels-first: load the next K vectors of a channel (K loads in flight)
// and fold them into w, kUnroll vectors at a time.  (K = 8 was measured on an
// H200: 5-8 % faster on large channels, up to 20 % slower on 64x16x56x56 and
// 64x2048x7x7; not kept.)
template <int K, int V, class T, class A>
__device__ __forceinline__ void fold_vectors(const T* __restrict__ x, ChannelCursor& cur,
                                             A shift, Stats<A, 1>& w) {
    Pack<T, V> p[K];
#pragma unroll
    for (int u = 0; u < K; ++u) {
        p[u] = load<V>(x + cur.idx * V);
        cur.next();
    }
#pragma unroll
    for (int h = 0; h < K; h += kUnroll) {
        A v[kUnroll * V];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) v[u * V + j] = (A)widen(p[h + u].v[j]) - shift;
        w.template add<kUnroll * V>(v);
    }
}

// Channels-first (N, C, S): block (c, s) of a (C, splits) grid, 1-D blocks.
template <int V, class T, class A, class P>
__device__ __forceinline__ void stats_nchw(const T* __restrict__ x, const P* weight, const P* bias,
                                           double* mean, double* invstd, P* rm, P* rv,
                                           double* coef, double* part, unsigned int* counter,
                                           long long N, long long C, long long S, double factor,
                                           double eps, T* y, unsigned char* smem) {
    WelfordD* red = reinterpret_cast<WelfordD*>(smem);
    const long long c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const long long B = blockDim.x;
    const long long SV = S / V, NV = N * SV;
    const A shift = NV > 0 ? (A)widen(x[c * S]) : A(0);     // the channel's first element

    ChannelCursor cur;
    cur.init(c, C, SV, range_begin(NV, split, splits) + threadIdx.x,
             range_begin(NV, split + 1, splits), B, false);
    Stats<A, 1> w;
    w.init();
    long long i = 0;
    for (; i + kUnroll <= cur.count; i += kUnroll) fold_vectors<kUnroll, V>(x, cur, shift, w);
    for (; i < cur.count; ++i) {
        const Pack<T, V> p = load<V>(x + cur.idx * V);
        cur.next();
        A v[V];
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = (A)widen(p.v[j]) - shift;
        w.template add<V>(v);
    }

    w.flush();
    WelfordD total = block_reduce(w.result(0), red);
    if (splits == 1) {
        if (threadIdx.x == 0)
            finish_stats(c, (double)shift, total, factor, eps, mean, invstd, rm, rv, weight, bias,
                         coef);
        if (y != nullptr) {
            __syncthreads();                    // coef[c] is written
            ew_nchw<OP_FWD, V, T, MathT<T>, P>(x, nullptr, y, coef, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr, nullptr, nullptr, N,
                                               C, S, eps, MODE_TABLE, true);
        }
        return;
    }
    if (!merge_block_splits(total, red, part, C, c, split, splits, counter)) return;
    if (threadIdx.x == 0)
        finish_stats(c, (double)shift, total, factor, eps, mean, invstd, rm, rv, weight, bias, coef);
}

// Channels-last (M, C): block (t, s) of a (tiles, splits) grid, (TX, TY)
// blocks.  Thread (tx, ty) owns channels [c0, c0 + V) and every TY-th row of
// the split's rows; per-thread states merge down ty in shared memory, and the
// last block of a tile merges the splits' partials the same way.
template <int V, class T, class A, class P>
__device__ __forceinline__ void stats_nhwc(const T* __restrict__ x, const P* weight, const P* bias,
                                           double* mean, double* invstd, P* rm, P* rv,
                                           double* coef, double* part, unsigned int* counter,
                                           long long M, long long C, double factor, double eps,
                                           T* y, unsigned char* smem) {
    // smem: kSmemBytes, the column trees' double states.
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
    const long long c0 = ((long long)blockIdx.x * TX + tx) * V;
    const bool active = c0 < C;
    const long long split = blockIdx.y, splits = gridDim.y;
    const long long r1 = range_begin(M, split + 1, splits);

    A shift[V];
    Stats<A, V> w;
    w.init();
#pragma unroll
    for (int j = 0; j < V; ++j) shift[j] = A(0);
    if (active && M > 0) {
        const Pack<T, V> s0 = load<V>(x + c0);       // row 0: the channels' first elements
#pragma unroll
        for (int j = 0; j < V; ++j) shift[j] = (A)widen(s0.v[j]);
        long long r = range_begin(M, split, splits) + ty;
        for (; r + (kUnroll - 1) * (long long)TY < r1; r += kUnroll * (long long)TY) {
            Pack<T, V> p[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) p[u] = load<V>(x + (r + u * (long long)TY) * C + c0);
            A v[V * kUnroll];
#pragma unroll
            for (int j = 0; j < V; ++j)
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) v[j * kUnroll + u] = (A)widen(p[u].v[j]) - shift[j];
            w.template add<kUnroll>(v);
        }
        for (; r < r1; r += TY) {
            const Pack<T, V> p = load<V>(x + r * C + c0);
            A v[V];
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = (A)widen(p.v[j]) - shift[j];
            w.template add<1>(v);
        }
    }
    w.flush();

    WelfordD* sm = reinterpret_cast<WelfordD*>(smem);
    WelfordD st[V];
#pragma unroll
    for (int j = 0; j < V; ++j) st[j] = w.result(j);
    column_reduce(st, sm);

    if (splits == 1) {
        if (ty == 0 && active) {
#pragma unroll
            for (int j = 0; j < V; ++j)
                finish_stats(c0 + j, (double)shift[j], st[j], factor, eps, mean, invstd, rm, rv,
                             weight, bias, coef);
        }
        if (y != nullptr) {
            __syncthreads();                    // the tile's coef is written
            ew_nhwc<OP_FWD, V, T, MathT<T>, P>(x, nullptr, y, coef, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr, nullptr, nullptr, M,
                                               C, eps, MODE_TABLE, true);
        }
        return;
    }
    if (!merge_column_splits<V>(st, sm, part, C, split, splits, c0, active,
                                counter + blockIdx.x))
        return;
    if (ty == 0 && active) {
#pragma unroll
        for (int j = 0; j < V; ++j)
            finish_stats(c0 + j, (double)shift[j], st[j], factor, eps, mean, invstd, rm, rv,
                         weight, bias, coef);
    }
}

}  // namespace fbn

// vec != 0: 16-byte accesses (the host checked alignment and divisibility).
// y: OUT, normalised in this launch when the grid has one split; else NULL
// (normalize.cu's kernel follows).
template <class T, class A>
__global__ void __launch_bounds__(fbn::kMaxThreads)
fbn_stats_nchw(const T* __restrict__ x, const typename fbn::Traits<T>::P* weight,
               const typename fbn::Traits<T>::P* bias, double* mean, double* invstd,
               typename fbn::Traits<T>::P* running_mean, typename fbn::Traits<T>::P* running_var,
               double* coef, double* part, unsigned int* counter, long long N, long long C,
               long long S, double factor, double eps, long long vec, T* y) {
    __shared__ __align__(16) unsigned char smem[32 * sizeof(fbn::WelfordD)];
    if (vec)
        fbn::stats_nchw<fbn::Traits<T>::VEC, T, A>(x, weight, bias, mean, invstd, running_mean,
                                                   running_var, coef, part, counter, N, C, S,
                                                   factor, eps, y, smem);
    else
        fbn::stats_nchw<1, T, A>(x, weight, bias, mean, invstd, running_mean, running_var, coef,
                                 part, counter, N, C, S, factor, eps, y, smem);
}

template <class T, class A>
// At least 2 blocks a multiprocessor (at most 128 registers): float16 with 8
// lanes a thread needs 134 and would otherwise run one block per SM.
__global__ void __launch_bounds__(fbn::kMaxThreads, 2)
fbn_stats_nhwc(const T* __restrict__ x, const typename fbn::Traits<T>::P* weight,
               const typename fbn::Traits<T>::P* bias, double* mean, double* invstd,
               typename fbn::Traits<T>::P* running_mean, typename fbn::Traits<T>::P* running_var,
               double* coef, double* part, unsigned int* counter, long long M, long long C,
               double factor, double eps, long long vec, T* y) {
    __shared__ __align__(16) unsigned char smem[fbn::kSmemBytes];
    if (vec)
        fbn::stats_nhwc<fbn::Traits<T>::VEC, T, A>(x, weight, bias, mean, invstd, running_mean,
                                                   running_var, coef, part, counter, M, C, factor,
                                                   eps, y, smem);
    else
        fbn::stats_nhwc<1, T, A>(x, weight, bias, mean, invstd, running_mean, running_var, coef,
                                 part, counter, M, C, factor, eps, y, smem);
}
