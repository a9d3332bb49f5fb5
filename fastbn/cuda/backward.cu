// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel in one
// launch, accumulated in A = double (see Numerics in fastbn.cuh).  The last
// block of each channel (channel tile) writes dweight, dbias and the dx
// coefficient table, which the element-wise pass of normalize.cu (OP_BWD_TRAIN
// / OP_BWD_EVAL, MODE_TABLE) then applies.  Same grids as stats.cu, and the
// same fusion: with one split and dx given, the block writes its channels' dx
// in the same launch.
#include "elementwise.cuh"

namespace fbn {

// Channels-first: load the next K vectors of x and dy at the cursor (K pairs of
// loads in flight) and add them to the gradient sums.
template <int K, int V, class T, class A>
__device__ __forceinline__ void sum_vectors(const T* __restrict__ x, const T* __restrict__ g,
                                            ChannelCursor& cur, const Coef<A>& m,
                                            Sum2<A>& acc) {
    Pack<T, V> px[K], pg[K];
#pragma unroll
    for (int u = 0; u < K; ++u) {
        px[u] = load<V>(x + cur.idx * V);
        pg[u] = load<V>(g + cur.idx * V);
        cur.next();
    }
#pragma unroll
    for (int u = 0; u < K; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const A gv = (A)widen(pg[u].v[j]);
            acc.s += gv;
            acc.t = fma_(gv, center((A)widen(px[u].v[j]), m), acc.t);
        }
}

template <int V, class T, class A, class P>
__device__ __forceinline__ void gsum_nchw(const T* __restrict__ x, const T* __restrict__ g,
                                          const double* mean, const double* invstd,
                                          const P* weight, P* dweight, P* dbias, double* coef,
                                          double* part, unsigned int* counter, long long N,
                                          long long C, long long S, long long training,
                                          T* dx, unsigned char* smem) {
    Sum2D* red = reinterpret_cast<Sum2D*>(smem);
    const long long c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const long long B = blockDim.x;
    const long long SV = S / V, NV = N * SV;
    const Coef<A> m = make_coef<A>(mean[c], 0.0, 0.0, 0.0);

    ChannelCursor cur;
    cur.init(c, C, SV, range_begin(NV, split, splits) + threadIdx.x,
             range_begin(NV, split + 1, splits), B, false);
    Sum2<A> acc = empty_sum2<A>();
    long long i = 0;
    for (; i + kUnroll <= cur.count; i += kUnroll) sum_vectors<kUnroll, V>(x, g, cur, m, acc);
    for (; i < cur.count; ++i) sum_vectors<1, V>(x, g, cur, m, acc);

    const double n = (double)N * (double)S;
    Sum2D total = block_reduce(to_double(acc), red);
    if (splits == 1) {
        if (threadIdx.x == 0)
            finish_grad(c, total, n, training, mean, invstd, weight, dweight, dbias, coef);
        if (dx != nullptr) {
            __syncthreads();                    // coef[c] is written
            if (training)
                ew_nchw<OP_BWD_TRAIN, V, T, MathT<T>, P>(x, g, dx, coef, nullptr, nullptr, nullptr,
                                                         nullptr, nullptr, nullptr, nullptr, nullptr,
                                                         N, C, S, 0.0, MODE_TABLE, true);
            else
                ew_nchw<OP_BWD_EVAL, V, T, MathT<T>, P>(x, g, dx, coef, nullptr, nullptr, nullptr,
                                                        nullptr, nullptr, nullptr, nullptr, nullptr,
                                                        N, C, S, 0.0, MODE_TABLE, true);
        }
        return;
    }
    if (!merge_block_splits(total, red, part, C, c, split, splits, counter)) return;
    if (threadIdx.x == 0)
        finish_grad(c, total, n, training, mean, invstd, weight, dweight, dbias, coef);
}

template <int V, class T, class A, class P>
__device__ __forceinline__ void gsum_nhwc(const T* __restrict__ x, const T* __restrict__ g,
                                          const double* mean, const double* invstd,
                                          const P* weight, P* dweight, P* dbias, double* coef,
                                          double* part, unsigned int* counter, long long M,
                                          long long C, long long training, T* dx,
                                          unsigned char* smem) {
    // smem: kSmemBytes, the column trees' double states.
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
    const long long c0 = ((long long)blockIdx.x * TX + tx) * V;
    const bool active = c0 < C;
    const long long split = blockIdx.y, splits = gridDim.y;
    const long long r1 = range_begin(M, split + 1, splits);

    Coef<A> m[V];
    Sum2<A> acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        acc[j] = empty_sum2<A>();
        m[j] = make_coef<A>(active ? mean[c0 + j] : 0.0, 0.0, 0.0, 0.0);
    }
    if (active) {
        long long r = range_begin(M, split, splits) + ty;
        for (; r + (kUnroll - 1) * (long long)TY < r1; r += kUnroll * (long long)TY) {
            Pack<T, V> px[kUnroll], pg[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const long long idx = (r + u * (long long)TY) * C + c0;
                px[u] = load<V>(x + idx);
                pg[u] = load<V>(g + idx);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    const A gv = (A)widen(pg[u].v[j]);
                    acc[j].s += gv;
                    acc[j].t = fma_(gv, center((A)widen(px[u].v[j]), m[j]), acc[j].t);
                }
        }
        for (; r < r1; r += TY) {
            const Pack<T, V> px = load<V>(x + r * C + c0);
            const Pack<T, V> pg = load<V>(g + r * C + c0);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const A gv = (A)widen(pg.v[j]);
                acc[j].s += gv;
                acc[j].t = fma_(gv, center((A)widen(px.v[j]), m[j]), acc[j].t);
            }
        }
    }

    Sum2D* sm = reinterpret_cast<Sum2D*>(smem);
    Sum2D st[V];
#pragma unroll
    for (int j = 0; j < V; ++j) st[j] = to_double(acc[j]);
    column_reduce(st, sm);

    const double n = (double)M;
    if (splits == 1) {
        if (ty == 0 && active) {
#pragma unroll
            for (int j = 0; j < V; ++j)
                finish_grad(c0 + j, st[j], n, training, mean, invstd, weight, dweight, dbias,
                            coef);
        }
        if (dx != nullptr) {
            __syncthreads();                    // the tile's coef is written
            if (training)
                ew_nhwc<OP_BWD_TRAIN, V, T, MathT<T>, P>(x, g, dx, coef, nullptr, nullptr, nullptr,
                                                         nullptr, nullptr, nullptr, nullptr, nullptr,
                                                         M, C, 0.0, MODE_TABLE, true);
            else
                ew_nhwc<OP_BWD_EVAL, V, T, MathT<T>, P>(x, g, dx, coef, nullptr, nullptr, nullptr,
                                                        nullptr, nullptr, nullptr, nullptr, nullptr,
                                                        M, C, 0.0, MODE_TABLE, true);
        }
        return;
    }
    if (!merge_column_splits<V>(st, sm, part, C, split, splits, c0, active,
                                counter + blockIdx.x))
        return;
    if (ty == 0 && active) {
#pragma unroll
        for (int j = 0; j < V; ++j)
            finish_grad(c0 + j, st[j], n, training, mean, invstd, weight, dweight, dbias, coef);
    }
}

}  // namespace fbn

// x, g: IN data and dy; mean, invstd: IN (the forward's); weight: IN or NULL;
// dweight, dbias: OUT or NULL; coef: OUT (4, C) dx coefficients; part,
// counter: workspace.  training != 0: dx flows through the batch statistics.
// dx: OUT, written in this launch when the grid has one split; else NULL.
template <class T, class A>
__global__ void __launch_bounds__(fbn::kMaxThreads)
fbn_gsum_nchw(const T* __restrict__ x, const T* __restrict__ g, const double* mean,
              const double* invstd, const typename fbn::Traits<T>::P* weight,
              typename fbn::Traits<T>::P* dweight, typename fbn::Traits<T>::P* dbias,
              double* coef, double* part, unsigned int* counter, long long N, long long C,
              long long S, long long training, long long vec, T* dx) {
    __shared__ __align__(16) unsigned char smem[32 * sizeof(fbn::Sum2D)];
    if (vec)
        fbn::gsum_nchw<fbn::Traits<T>::VEC, T, A>(x, g, mean, invstd, weight, dweight, dbias, coef,
                                                  part, counter, N, C, S, training, dx, smem);
    else
        fbn::gsum_nchw<1, T, A>(x, g, mean, invstd, weight, dweight, dbias, coef, part, counter, N,
                                C, S, training, dx, smem);
}

template <class T, class A>
__global__ void __launch_bounds__(fbn::kMaxThreads)
fbn_gsum_nhwc(const T* __restrict__ x, const T* __restrict__ g, const double* mean,
              const double* invstd, const typename fbn::Traits<T>::P* weight,
              typename fbn::Traits<T>::P* dweight, typename fbn::Traits<T>::P* dbias,
              double* coef, double* part, unsigned int* counter, long long M, long long C,
              long long training, long long vec, T* dx) {
    __shared__ __align__(16) unsigned char smem[fbn::kSmemBytes];
    if (vec)
        fbn::gsum_nhwc<fbn::Traits<T>::VEC, T, A>(x, g, mean, invstd, weight, dweight, dbias, coef,
                                                  part, counter, M, C, training, dx, smem);
    else
        fbn::gsum_nhwc<1, T, A>(x, g, mean, invstd, weight, dweight, dbias, coef, part, counter, M,
                                C, training, dx, smem);
}
