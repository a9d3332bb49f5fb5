// Element-wise passes: the forward normalisation (training and inference) and
// the dx of the backward.  One kernel per layout; the operation (OP_*) and the
// source of the per-channel coefficients (MODE_*) are launch arguments, each
// (op, vec) pair a separate specialisation of the inner loop
// (elementwise.cuh).
#include "elementwise.cuh"

// Arguments shared by both layouts:
//   x, g, y     IN data, IN gradient (backward), OUT result; x is not read by
//               OP_BWD_EVAL, g is not read by OP_FWD
//   coef        IN (4, C) table of MODE_TABLE
//   mean_in, invstd_in          IN (MODE_EVAL)
//   running_mean, running_var   IN (MODE_INFER)
//   weight, bias                IN or NULL
//   mean_out, invstd_out        OUT (MODE_INFER): the statistics used
#define FBN_EW_DISPATCH(LAYOUT, ...)                                                          \
    const bool rev = reverse != 0;                                                            \
    if (vec) {                                                                                \
        constexpr int V = fbn::Traits<T>::VEC;                                                \
        if (op == fbn::OP_FWD) fbn::LAYOUT<fbn::OP_FWD, V, T, A>(__VA_ARGS__, rev);           \
        else if (op == fbn::OP_BWD_TRAIN) fbn::LAYOUT<fbn::OP_BWD_TRAIN, V, T, A>(__VA_ARGS__, rev); \
        else fbn::LAYOUT<fbn::OP_BWD_EVAL, V, T, A>(__VA_ARGS__, rev);                        \
    } else {                                                                                  \
        if (op == fbn::OP_FWD) fbn::LAYOUT<fbn::OP_FWD, 1, T, A>(__VA_ARGS__, rev);           \
        else if (op == fbn::OP_BWD_TRAIN) fbn::LAYOUT<fbn::OP_BWD_TRAIN, 1, T, A>(__VA_ARGS__, rev); \
        else fbn::LAYOUT<fbn::OP_BWD_EVAL, 1, T, A>(__VA_ARGS__, rev);                        \
    }

template <class T, class A>
__global__ void __launch_bounds__(fbn::kMaxThreads)
fbn_ew_nchw(const T* x, const T* g, T* y, const double* coef, const double* mean_in,
            const double* invstd_in, const typename fbn::Traits<T>::P* running_mean,
            const typename fbn::Traits<T>::P* running_var,
            const typename fbn::Traits<T>::P* weight, const typename fbn::Traits<T>::P* bias,
            double* mean_out, double* invstd_out, long long N, long long C, long long S,
            double eps, long long op, long long mode, long long vec, long long reverse) {
    FBN_EW_DISPATCH(ew_nchw, x, g, y, coef, mean_in, invstd_in, running_mean, running_var,
                    weight, bias, mean_out, invstd_out, N, C, S, eps, mode)
}

template <class T, class A>
__global__ void __launch_bounds__(fbn::kMaxThreads)
fbn_ew_nhwc(const T* x, const T* g, T* y, const double* coef, const double* mean_in,
            const double* invstd_in, const typename fbn::Traits<T>::P* running_mean,
            const typename fbn::Traits<T>::P* running_var,
            const typename fbn::Traits<T>::P* weight, const typename fbn::Traits<T>::P* bias,
            double* mean_out, double* invstd_out, long long M, long long C, double eps,
            long long op, long long mode, long long vec, long long reverse) {
    FBN_EW_DISPATCH(ew_nhwc, x, g, y, coef, mean_in, invstd_in, running_mean, running_var,
                    weight, bias, mean_out, invstd_out, M, C, eps, mode)
}

#undef FBN_EW_DISPATCH
