// The element-wise passes as device functions: the forward normalisation
// (training and inference) and the dx of the backward, for both layouts.
// normalize.cu wraps them in the fbn_ew_* kernels; stats.cu and backward.cu
// call them directly after a reduction that one block finished on its own
// (one split: the block already holds its channels' coefficients, and the
// data it re-reads, newest first, is still in cache).
//
// No barriers and no shared memory: a thread loads its channels'
// coefficients once, then streams its elements.  y may be x (in-place
// inference) and dx may be dy: every element is loaded before it is stored by
// the same thread, so the pointers are not restrict.
#ifndef FASTBN_CUDA_ELEMENTWISE_CUH
#define FASTBN_CUDA_ELEMENTWISE_CUH

#include "fastbn.cuh"

namespace fbn {

// Lane j's coefficients: one set for the whole pack (channels-first: the
// pack lies in one channel) or one per lane (channels-last).
template <class A>
__device__ __forceinline__ const Coef<A>& lane_coef(const Coef<A>& cf, int) {
    return cf;
}
template <class A, int V>
__device__ __forceinline__ const Coef<A>& lane_coef(const Coef<A> (&cf)[V], int j) {
    return cf[j];
}

// apply<OP> lane by lane over one pack of x and g (x is not read for
// OP_BWD_EVAL, g not for OP_FWD).
template <int OP, int V, class T, class A, class CF>
__device__ __forceinline__ void apply_pack(Pack<T, V>& out, const CF& cf, Pack<T, V> px,
                                           Pack<T, V> pg) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const A xv = OP != OP_BWD_EVAL ? (A)widen(px.v[j]) : A(0);
        const A gv = OP != OP_FWD ? (A)widen(pg.v[j]) : A(0);
        narrow(out.v[j], apply<OP>(lane_coef(cf, j), xv, gv));
    }
}

template <int OP, int V, class T, class A, class P>
__device__ __forceinline__ void ew_nchw(const T* x, const T* g, T* y, const double* coef,
                                        const double* mean_in, const double* invstd_in,
                                        const P* rm, const P* rv, const P* weight, const P* bias,
                                        double* mean_out, double* invstd_out, long long N,
                                        long long C, long long S, double eps, long long mode,
                                        bool reverse) {
    const long long c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const Coef<A> cf = channel_coef<A>(mode, c, coef, mean_in, invstd_in, rm, rv, weight, bias,
                                       eps, mean_out, invstd_out,
                                       split == 0 && threadIdx.x == 0);
    const long long SV = S / V, NV = N * SV;
    ChannelCursor cur;
    cur.init(c, C, SV, range_begin(NV, split, splits) + threadIdx.x,
             range_begin(NV, split + 1, splits), blockDim.x, reverse);
    long long i = 0;
    for (; i + kUnroll <= cur.count; i += kUnroll) {
        long long idx[kUnroll];
        Pack<T, V> px[kUnroll], pg[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            idx[u] = cur.idx * V;
            cur.step(reverse);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (OP != OP_BWD_EVAL) px[u] = load<V>(x + idx[u]);
            if (OP != OP_FWD) pg[u] = load<V>(g + idx[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            Pack<T, V> out;
            apply_pack<OP, V, T, A>(out, cf, px[u], pg[u]);
            store<V>(y + idx[u], out);
        }
    }
    for (; i < cur.count; ++i) {
        const long long idx = cur.idx * V;
        cur.step(reverse);
        Pack<T, V> px, pg, out;
        if (OP != OP_BWD_EVAL) px = load<V>(x + idx);
        if (OP != OP_FWD) pg = load<V>(g + idx);
        apply_pack<OP, V, T, A>(out, cf, px, pg);
        store<V>(y + idx, out);
    }
}

template <int OP, int V, class T, class A, class P>
__device__ __forceinline__ void ew_nhwc(const T* x, const T* g, T* y, const double* coef,
                                        const double* mean_in, const double* invstd_in,
                                        const P* rm, const P* rv, const P* weight, const P* bias,
                                        double* mean_out, double* invstd_out, long long M,
                                        long long C, double eps, long long mode, bool reverse) {
    const long long TY = blockDim.y;
    const long long c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c0 >= C) return;
    const long long split = blockIdx.y, splits = gridDim.y;
    const bool writer = split == 0 && threadIdx.y == 0;
    Coef<A> cf[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
        cf[j] = channel_coef<A>(mode, c0 + j, coef, mean_in, invstd_in, rm, rv, weight, bias, eps,
                                mean_out, invstd_out, writer);
    const long long first = range_begin(M, split, splits) + threadIdx.y;
    const long long end = range_begin(M, split + 1, splits);
    const long long count = first < end ? (end - first + TY - 1) / TY : 0;
    // Row of visit i: first + i * TY, or first + (count - 1 - i) * TY backwards.
    long long r = reverse ? first + (count - 1) * TY : first;
    const long long dr = reverse ? -TY : TY;
    long long i = 0;
    for (; i + kUnroll <= count; i += kUnroll) {
        Pack<T, V> px[kUnroll], pg[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const long long idx = (r + u * dr) * C + c0;
            if (OP != OP_BWD_EVAL) px[u] = load<V>(x + idx);
            if (OP != OP_FWD) pg[u] = load<V>(g + idx);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            Pack<T, V> out;
            apply_pack<OP, V, T, A>(out, cf, px[u], pg[u]);
            store<V>(y + (r + u * dr) * C + c0, out);
        }
        r += kUnroll * dr;
    }
    for (; i < count; ++i, r += dr) {
        const long long idx = r * C + c0;
        Pack<T, V> px, pg, out;
        if (OP != OP_BWD_EVAL) px = load<V>(x + idx);
        if (OP != OP_FWD) pg = load<V>(g + idx);
        apply_pack<OP, V, T, A>(out, cf, px, pg);
        store<V>(y + idx, out);
    }
}

}  // namespace fbn

#endif  // FASTBN_CUDA_ELEMENTWISE_CUH
