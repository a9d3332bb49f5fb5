# Cython/OpenMP batch-normalization kernels for the CPU backend.
#
# Two canonical views cover every rank and layout (DESIGN.md section 2):
#   "nchw": x is a C-contiguous (N, C, S) array, S = product of the spatial dims;
#   "nhwc": x is a C-contiguous (M, C) array, M = N * spatial.
# _api.py resolves a caller's array into one of these views; nothing here knows
# about frameworks, axes or strides.
#
# Determinism: every reduction is split into chunks whose boundaries depend only
# on the shape (never on the thread count).  Each chunk's partial sums start from
# zero, are stored, and are merged in chunk order by one thread, so results are
# bit-identical for any number of threads and any schedule.
#
# Statistics are one pass of float64 sums of (x - shift), shift being the first
# element of the channel.  The shift keeps the sums well conditioned when the
# mean is large compared with the spread (1e4 + N(0, 1) data), and float64
# accumulation keeps float32 and float16 inputs exact to their own precision.
# All element-wise arithmetic is done in float64 and rounded once on store.
#
# The Python-facing functions take numpy arrays (or None) and read raw data
# pointers: typed memoryviews and fused `def` dispatch cost microseconds per
# call, which is most of the budget for a small tensor.  _api.py has already
# checked shapes, dtypes, contiguity and writability.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cnp.import_array()

cdef extern from * nogil:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP 1
    #else
    #define FASTBN_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif

    #include <string.h>
    #include <stdint.h>

    /* IEEE binary16 <-> binary32.  GCC >= 12 and clang give x86 a native
       _Float16, which compiles to F16C instructions where the target has them
       and vectorises; otherwise a portable bit-exact version is used. */
    #if defined(__FLT16_MAX__) && !defined(FASTBN_NO_FLOAT16)
    static inline float fastbn_h2f(uint16_t h) {
        _Float16 v; memcpy(&v, &h, 2); return (float)v;
    }
    static inline uint16_t fastbn_f2h(float f) {
        _Float16 v = (_Float16)f; uint16_t h; memcpy(&h, &v, 2); return h;
    }
    #else
    static inline float fastbn_h2f(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        uint32_t expo = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
        if (expo == 0x1fu) {
            bits = sign | 0x7f800000u | (mant << 13);
        } else if (expo != 0) {
            bits = sign | ((expo + 112u) << 23) | (mant << 13);
        } else if (mant == 0) {
            bits = sign;
        } else {            /* subnormal half: normalise */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400u));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
        float f; memcpy(&f, &bits, 4); return f;
    }
    static inline uint16_t fastbn_f2h(float f) {
        uint32_t x; memcpy(&x, &f, 4);
        uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
        uint32_t absx = x & 0x7fffffffu;
        if (absx >= 0x7f800000u)              /* Inf or NaN (keep NaN quiet) */
            return sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u);
        if (absx >= 0x477ff000u)              /* rounds to >= 65520: overflow */
            return sign | 0x7c00u;
        if (absx < 0x38800000u) {             /* result is subnormal or zero */
            if (absx < 0x33000000u) return sign;
            uint32_t m = (absx & 0x7fffffu) | 0x800000u;
            int shift = 126 - (int)(absx >> 23);
            uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
            if (rem > half || (rem == half && (r & 1u))) r++;
            return sign | (uint16_t)r;
        }
        uint32_t r = absx + 0xc8000fffu + ((absx >> 13) & 1u);  /* rebias + RNE */
        return sign | (uint16_t)(r >> 13);
    }
    #endif
    """
    int omp_get_max_threads()
    int FASTBN_OPENMP
    float fastbn_h2f(unsigned short h)
    unsigned short fastbn_f2h(float f)

# Elements per statistics chunk of one channel (channels-first) and the least
# number of rows per chunk (channels-last).  Part of the numerical definition:
# changing them changes the last bits of the statistics (never the thread count).
DEF CHUNK = 8192
DEF MIN_ROWS = 64
# Channels-last reductions work on blocks of this many channels at a time.
DEF CBLOCK = 512
# Below this many elements a call runs on one thread: waking the team costs more.
DEF SERIAL_BELOW = 32768
# Element-wise passes (normalise, dx) split the work in blocks of this many.
DEF EW_BLOCK = 16384

ctypedef unsigned short half_t

ctypedef fused data_t:
    float
    double
    half_t

ctypedef fused param_t:
    float
    double

cdef enum:
    DT_F32 = 0
    DT_F64 = 1
    DT_F16 = 2

cdef enum Op:
    FWD_TRAIN_NCHW
    FWD_TRAIN_NHWC
    FWD_INFER_NCHW
    FWD_INFER_NHWC
    BWD_NCHW
    BWD_NHWC

# Everything a kernel needs, as raw pointers.  Shapes: "nchw" uses (N, C, S);
# "nhwc" uses rows = N and S = 1.          direction
ctypedef struct Job:
    int op
    int xtype                         # DT_* of x / y / dy / dx
    int ptype                         # DT_* of weight / bias / running stats
    Py_ssize_t N, C, S
    const void* x                     # IN
    void* y                           # OUT   forward output or dx
    const void* dy                    # IN    backward only
    const void* weight                # IN    or NULL (= 1)
    const void* bias                  # IN    or NULL (= 0)
    double* mean                      # OUT forward / IN backward, float64 (C,)
    double* invstd                    # OUT forward / IN backward, float64 (C,)
    void* running_mean                # INOUT or NULL
    void* running_var                 # INOUT or NULL
    void* dweight                     # OUT   or NULL
    void* dbias                       # OUT   or NULL
    double factor                     # momentum factor for the running update
    double eps
    int training                      # backward: through batch statistics?
    int n_threads


# ----------------------------------------------------------------------------
# element access

cdef inline double ld(const data_t* p, Py_ssize_t i) noexcept nogil:
    if data_t is half_t:
        return <double>fastbn_h2f(p[i])
    else:
        return <double>p[i]


cdef inline void st(data_t* p, Py_ssize_t i, double v) noexcept nogil:
    if data_t is half_t:
        p[i] = fastbn_f2h(<float>v)
    elif data_t is float:
        p[i] = <float>v
    else:
        p[i] = v


cdef inline double ldp(const param_t* p, Py_ssize_t i, double default) noexcept nogil:
    if p == NULL:
        return default
    return <double>p[i]


cdef inline int team(Py_ssize_t work, Py_ssize_t elements, int n_threads) noexcept nogil:
    """Threads worth waking for `work` independent tasks over `elements`."""
    if elements < SERIAL_BELOW or work < 2:
        return 1
    if work < n_threads:
        return <int>work
    return n_threads


# ----------------------------------------------------------------------------
# contiguous-run primitives (the hot loops)

cdef inline void run_sums(const data_t* x, Py_ssize_t n, double shift,
                          double* s1, double* s2) noexcept nogil:
    """s1 += sum(x - shift), s2 += sum((x - shift)**2) over a contiguous run.

    Eight independent lanes break the add latency chain and let the compiler
    vectorise without reassociating (no -ffast-math); the lanes are combined
    in a fixed tree, so the result depends only on the run.
    """
    cdef double a[8]
    cdef double b[8]
    cdef double d, t1 = 0.0, t2 = 0.0
    cdef Py_ssize_t i = 0, k
    for k in range(8):
        a[k] = 0.0
        b[k] = 0.0
    while i + 8 <= n:
        for k in range(8):
            d = ld(x, i + k) - shift
            a[k] += d
            b[k] += d * d
        i += 8
    while i < n:
        d = ld(x, i) - shift
        t1 += d
        t2 += d * d
        i += 1
    s1[0] += (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + t1
    s2[0] += (((b[0] + b[4]) + (b[1] + b[5])) + ((b[2] + b[6]) + (b[3] + b[7]))) + t2


cdef inline void run_grad_sums(const data_t* x, const data_t* dy, Py_ssize_t n,
                               double mean, double* s1, double* s2) noexcept nogil:
    """s1 += sum(dy), s2 += sum(dy * (x - mean)) over a contiguous run."""
    cdef double a[8]
    cdef double b[8]
    cdef double g, t1 = 0.0, t2 = 0.0
    cdef Py_ssize_t i = 0, k
    for k in range(8):
        a[k] = 0.0
        b[k] = 0.0
    while i + 8 <= n:
        for k in range(8):
            g = ld(dy, i + k)
            a[k] += g
            b[k] += g * (ld(x, i + k) - mean)
        i += 8
    while i < n:
        g = ld(dy, i)
        t1 += g
        t2 += g * (ld(x, i) - mean)
        i += 1
    s1[0] += (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + t1
    s2[0] += (((b[0] + b[4]) + (b[1] + b[5])) + ((b[2] + b[6]) + (b[3] + b[7]))) + t2


cdef inline void run_affine(const data_t* x, data_t* y, Py_ssize_t n,
                            double mean, double scale, double shift) noexcept nogil:
    """y = (x - mean) * scale + shift over a contiguous run."""
    cdef Py_ssize_t i
    for i in range(n):
        st(y, i, (ld(x, i) - mean) * scale + shift)


cdef inline void run_dx(const data_t* x, const data_t* dy, data_t* dx, Py_ssize_t n,
                        double mean, double a, double b, double c) noexcept nogil:
    """dx = a * dy + b * (x - mean) + c over a contiguous run."""
    cdef Py_ssize_t i
    for i in range(n):
        st(dx, i, a * ld(dy, i) + b * (ld(x, i) - mean) + c)


cdef inline void run_scale(const data_t* dy, data_t* dx, Py_ssize_t n, double a) noexcept nogil:
    """dx = a * dy over a contiguous run (eval-mode backward)."""
    cdef Py_ssize_t i
    for i in range(n):
        st(dx, i, a * ld(dy, i))


# ----------------------------------------------------------------------------
# per-channel bookkeeping shared by both layouts

cdef inline void finish_stats(Job* j, Py_ssize_t c, double shift, double s1, double s2,
                              Py_ssize_t n, param_t* rm, param_t* rv) noexcept nogil:
    """Merged shifted sums of channel c -> mean, invstd, running statistics.

    The biased variance normalises; the unbiased one goes to running_var."""
    cdef double dn = <double>n
    cdef double m = s1 / dn
    cdef double var = s2 / dn - m * m
    cdef double f = j.factor
    if var < 0.0:          # rounding only; NaN falls through unchanged
        var = 0.0
    m = shift + m
    j.mean[c] = m
    j.invstd[c] = 1.0 / sqrt(var + j.eps)
    if rm != NULL:
        rm[c] = <param_t>((1.0 - f) * <double>rm[c] + f * m)
        rv[c] = <param_t>((1.0 - f) * <double>rv[c] + f * (var * dn / (dn - 1.0)))


cdef inline void infer_stats(Job* j, Py_ssize_t c, const param_t* rm,
                             const param_t* rv) noexcept nogil:
    j.mean[c] = <double>rm[c]
    j.invstd[c] = 1.0 / sqrt(<double>rv[c] + j.eps)


cdef inline void affine_coefs(Job* j, Py_ssize_t c, const param_t* w, const param_t* bias,
                              double* coef) noexcept nogil:
    """coef[0:3] = (mean, scale, shift) so that y = (x - mean) * scale + shift."""
    coef[0] = j.mean[c]
    coef[1] = ldp(w, c, 1.0) * j.invstd[c]
    coef[2] = ldp(bias, c, 0.0)


cdef inline void grad_coefs(Job* j, Py_ssize_t c, double sdy, double sdyx, Py_ssize_t n,
                            const param_t* w, double* coef) noexcept nogil:
    """Write dweight / dbias of channel c from sdy = sum(dy) and
    sdyx = sum(dy * (x - mean)); coef[0:4] = (mean, a, b, k) so that
    dx = a * dy + b * (x - mean) + k (b = k = 0 in eval mode)."""
    cdef double invstd = j.invstd[c]
    cdef double wi = ldp(w, c, 1.0) * invstd
    if j.dweight != NULL:
        (<param_t*>j.dweight)[c] = <param_t>(sdyx * invstd)
    if j.dbias != NULL:
        (<param_t*>j.dbias)[c] = <param_t>sdy
    coef[0] = j.mean[c]
    coef[1] = wi
    if j.training:
        coef[2] = -wi * invstd * invstd * sdyx / <double>n
        coef[3] = -wi * sdy / <double>n
    else:
        coef[2] = 0.0
        coef[3] = 0.0


cdef inline void merge(const double* part, Py_ssize_t nq, double* s1, double* s2) noexcept nogil:
    """Sum interleaved chunk partials (part[2q], part[2q+1]) in chunk order."""
    cdef Py_ssize_t q
    cdef double a = 0.0, b = 0.0
    for q in range(nq):
        a += part[2 * q]
        b += part[2 * q + 1]
    s1[0] = a
    s2[0] = b


# ----------------------------------------------------------------------------
# channels-first (N, C, S)
#
# Channel c holds n = N*S elements: N runs of S, one per sample.  Chunk q of the
# channel is elements [q*CHUNK, (q+1)*CHUNK) of that sequence, which may span
# several runs.  With enough channels for every thread, one thread finishes a
# channel (statistics, then normalisation while it is still in cache);
# otherwise (channel, chunk) tasks are spread over all threads, merged in chunk
# order, and the element-wise pass is a second parallel loop.

cdef enum Visit:
    V_SUMS            # s += (x - shift), (x - shift)^2
    V_AFFINE          # y = (x - mean) * scale + shift
    V_GRAD_SUMS       # s += dy, dy * (x - mean)
    V_DX              # dx = a dy + b (x - mean) + k
    V_DX_EVAL         # dx = a dy


cdef inline void nchw_chunk(Job* j, const data_t* x, Py_ssize_t c, Py_ssize_t q,
                            Visit what, double shift, const double* coef,
                            double* s) noexcept nogil:
    """Visit chunk q of channel c; s[0:2] receives sums, coef holds per-channel
    coefficients for the element-wise visits."""
    cdef Py_ssize_t S = j.S, n = j.N * j.S
    cdef Py_ssize_t e = q * CHUNK
    cdef Py_ssize_t end = e + CHUNK
    cdef Py_ssize_t row, col, length, off
    cdef data_t* out = <data_t*>j.y
    cdef const data_t* dy = <const data_t*>j.dy
    if end > n:
        end = n
    row = e // S
    col = e - row * S
    while e < end:
        length = S - col
        if length > end - e:
            length = end - e
        off = (row * j.C + c) * S + col
        if what == V_SUMS:
            run_sums(x + off, length, shift, &s[0], &s[1])
        elif what == V_AFFINE:
            run_affine(x + off, out + off, length, coef[0], coef[1], coef[2])
        elif what == V_GRAD_SUMS:
            run_grad_sums(x + off, dy + off, length, shift, &s[0], &s[1])
        elif what == V_DX:
            run_dx(x + off, dy + off, out + off, length, coef[0], coef[1], coef[2], coef[3])
        else:
            run_scale(dy + off, out + off, length, coef[1])
        e += length
        row += 1
        col = 0


cdef int nchw_forward(Job* j, const data_t* x, param_t* p) noexcept nogil:
    cdef Py_ssize_t C = j.C, n = j.N * j.S
    cdef Py_ssize_t nq = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t c, t, q
    cdef int nt
    cdef bint train = j.op == FWD_TRAIN_NCHW
    cdef double s1, s2
    cdef param_t* rm = <param_t*>j.running_mean
    cdef param_t* rv = <param_t*>j.running_var
    cdef const param_t* w = <const param_t*>j.weight
    cdef const param_t* b = <const param_t*>j.bias
    # part: 2 partial sums per (channel, chunk), then 3 coefficients per channel
    cdef double* part = <double*>malloc(<size_t>(2 * C * nq + 3 * C) * sizeof(double))
    cdef double* cf = part + 2 * C * nq
    if part == NULL:
        return -1
    if train and (C >= 2 * j.n_threads or nq == 1):
        nt = team(C, C * n, j.n_threads)
        # Inside prange only assigned scalars are thread-private: per-channel
        # results go to per-channel slots of the scratch buffer.
        for c in prange(C, schedule='static', num_threads=nt):
            s1 = 0.0
            s2 = 0.0
            for q in range(nq):
                part[2 * (c * nq + q)] = 0.0
                part[2 * (c * nq + q) + 1] = 0.0
                nchw_chunk(j, x, c, q, V_SUMS, ld(x, c * j.S), NULL,
                           &part[2 * (c * nq + q)])
            merge(&part[2 * c * nq], nq, &s1, &s2)
            finish_stats(j, c, ld(x, c * j.S), s1, s2, n, rm, rv)
            affine_coefs(j, c, w, b, &cf[3 * c])
            for q in range(nq):
                nchw_chunk(j, x, c, q, V_AFFINE, 0.0, &cf[3 * c], NULL)
    else:
        nt = team(C * nq, C * n, j.n_threads)
        if train:
            for t in prange(C * nq, schedule='static', num_threads=nt):
                c = t // nq
                part[2 * t] = 0.0
                part[2 * t + 1] = 0.0
                nchw_chunk(j, x, c, t - c * nq, V_SUMS, ld(x, c * j.S), NULL, &part[2 * t])
        for c in range(C):
            if train:
                merge(&part[2 * c * nq], nq, &s1, &s2)
                finish_stats(j, c, ld(x, c * j.S), s1, s2, n, rm, rv)
            else:
                infer_stats(j, c, rm, rv)
            affine_coefs(j, c, w, b, &cf[3 * c])
        for t in prange(C * nq, schedule='static', num_threads=nt):
            c = t // nq
            nchw_chunk(j, x, c, t - c * nq, V_AFFINE, 0.0, &cf[3 * c], NULL)
    free(part)
    return 0


cdef int nchw_backward(Job* j, const data_t* x, param_t* p) noexcept nogil:
    cdef Py_ssize_t C = j.C, n = j.N * j.S
    cdef Py_ssize_t nq = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t c, t, q
    cdef int nt
    cdef bint sums = j.training or j.dweight != NULL or j.dbias != NULL
    cdef Visit what = V_DX if j.training else V_DX_EVAL
    cdef double s1, s2
    cdef const param_t* w = <const param_t*>j.weight
    cdef double* part = <double*>malloc(<size_t>(2 * C * nq + 4 * C) * sizeof(double))
    cdef double* cf = part + 2 * C * nq
    if part == NULL:
        return -1
    if C >= 2 * j.n_threads or nq == 1:
        nt = team(C, C * n, j.n_threads)
        for c in prange(C, schedule='static', num_threads=nt):
            s1 = 0.0
            s2 = 0.0
            if sums:
                for q in range(nq):
                    part[2 * (c * nq + q)] = 0.0
                    part[2 * (c * nq + q) + 1] = 0.0
                    nchw_chunk(j, x, c, q, V_GRAD_SUMS, j.mean[c], NULL,
                               &part[2 * (c * nq + q)])
                merge(&part[2 * c * nq], nq, &s1, &s2)
            grad_coefs(j, c, s1, s2, n, w, &cf[4 * c])
            for q in range(nq):
                nchw_chunk(j, x, c, q, what, 0.0, &cf[4 * c], NULL)
    else:
        nt = team(C * nq, C * n, j.n_threads)
        if sums:
            for t in prange(C * nq, schedule='static', num_threads=nt):
                c = t // nq
                part[2 * t] = 0.0
                part[2 * t + 1] = 0.0
                nchw_chunk(j, x, c, t - c * nq, V_GRAD_SUMS, j.mean[c], NULL, &part[2 * t])
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            if sums:
                merge(&part[2 * c * nq], nq, &s1, &s2)
            grad_coefs(j, c, s1, s2, n, w, &cf[4 * c])
        for t in prange(C * nq, schedule='static', num_threads=nt):
            c = t // nq
            nchw_chunk(j, x, c, t - c * nq, what, 0.0, &cf[4 * c], NULL)
    free(part)
    return 0


# ----------------------------------------------------------------------------
# channels-last (M, C)
#
# Rows are split in chunks of R rows (R depends only on C) and channels in
# blocks of CBLOCK; task (q, block) accumulates its rows into the per-chunk
# partial arrays, vectorised across channels.  Partials are merged in chunk
# order per channel; the element-wise pass runs over blocks of rows.

cdef inline Py_ssize_t nhwc_rows_per_chunk(Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t r = (CHUNK + C - 1) // C
    return r if r > MIN_ROWS else MIN_ROWS


cdef inline void nhwc_sums(const data_t* x, const data_t* dy, Py_ssize_t C,
                           Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                           const double* shift, double* ps, double* pq) noexcept nogil:
    """Rows [r0, r1), channels [c0, c1): ps += g, pq += g * (x - shift) with
    g = dy (gradient sums) or g = x - shift (statistics, dy == NULL)."""
    cdef Py_ssize_t r, c
    cdef const data_t* xr
    cdef const data_t* gr
    cdef double d, g
    for c in range(c0, c1):
        ps[c] = 0.0
        pq[c] = 0.0
    for r in range(r0, r1):
        xr = x + r * C
        if dy == NULL:
            for c in range(c0, c1):
                d = ld(xr, c) - shift[c]
                ps[c] += d
                pq[c] += d * d
        else:
            gr = dy + r * C
            for c in range(c0, c1):
                g = ld(gr, c)
                ps[c] += g
                pq[c] += g * (ld(xr, c) - shift[c])


cdef inline void nhwc_elementwise(Job* j, const data_t* x, Py_ssize_t r0, Py_ssize_t r1,
                                  Visit what, const double* cf) noexcept nogil:
    """Rows [r0, r1) of y (or dx); cf holds per-channel coefficient columns
    mean = cf[0:C], a = cf[C:2C], b = cf[2C:3C], k = cf[3C:4C]."""
    cdef Py_ssize_t C = j.C, r, c
    cdef const double* mean = cf
    cdef const double* a = cf + C
    cdef const double* b = cf + 2 * C
    cdef const double* k = cf + 3 * C
    cdef const data_t* xr
    cdef const data_t* gr
    cdef data_t* yr
    for r in range(r0, r1):
        xr = x + r * C
        gr = <const data_t*>j.dy + r * C
        yr = <data_t*>j.y + r * C
        if what == V_AFFINE:
            for c in range(C):
                st(yr, c, (ld(xr, c) - mean[c]) * a[c] + b[c])
        elif what == V_DX:
            for c in range(C):
                st(yr, c, a[c] * ld(gr, c) + b[c] * (ld(xr, c) - mean[c]) + k[c])
        else:
            for c in range(C):
                st(yr, c, a[c] * ld(gr, c))


cdef inline void nhwc_merge(const double* part, Py_ssize_t nq, Py_ssize_t C, Py_ssize_t c,
                            double* s1, double* s2) noexcept nogil:
    """Sum channel c's partials over chunks in chunk order."""
    cdef Py_ssize_t q
    cdef double a = 0.0, b = 0.0
    for q in range(nq):
        a += part[2 * q * C + c]
        b += part[(2 * q + 1) * C + c]
    s1[0] = a
    s2[0] = b


cdef int nhwc_run(Job* j, const data_t* x, param_t* p) noexcept nogil:
    cdef Py_ssize_t M = j.N, C = j.C
    cdef Py_ssize_t R = nhwc_rows_per_chunk(C)
    cdef Py_ssize_t nq = (M + R - 1) // R
    cdef Py_ssize_t nb = (C + CBLOCK - 1) // CBLOCK
    cdef Py_ssize_t rb = EW_BLOCK // C if C < EW_BLOCK else 1
    cdef Py_ssize_t nr = (M + rb - 1) // rb
    cdef Py_ssize_t t, q, c, c0, c1, r1
    cdef int nt
    cdef bint train = j.op == FWD_TRAIN_NHWC
    cdef bint fwd = j.op != BWD_NHWC
    cdef bint sums = train or (not fwd and (j.training or j.dweight != NULL or j.dbias != NULL))
    cdef Visit what
    cdef double s1, s2
    cdef double coef[4]
    cdef param_t* rm = <param_t*>j.running_mean
    cdef param_t* rv = <param_t*>j.running_var
    cdef const param_t* w = <const param_t*>j.weight
    cdef const param_t* b = <const param_t*>j.bias
    # part: 2*nq*C partial sums, then 4 coefficient columns of C
    cdef double* part = <double*>malloc(<size_t>((2 * nq + 5) * C) * sizeof(double))
    cdef double* cf = part + 2 * nq * C
    cdef double* shift = cf + 4 * C
    if part == NULL:
        return -1
    if fwd:
        what = V_AFFINE
    elif j.training:
        what = V_DX
    else:
        what = V_DX_EVAL
    if sums:
        for c in range(C):
            shift[c] = ld(x, c) if train else j.mean[c]
        nt = team(nq * nb, M * C, j.n_threads)
        for t in prange(nq * nb, schedule='static', num_threads=nt):
            q = t // nb
            c0 = (t - q * nb) * CBLOCK
            c1 = c0 + CBLOCK
            if c1 > C:
                c1 = C
            r1 = (q + 1) * R
            if r1 > M:
                r1 = M
            nhwc_sums(x, NULL if fwd else <const data_t*>j.dy, C, q * R, r1, c0, c1,
                      shift, &part[2 * q * C], &part[(2 * q + 1) * C])
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        if sums:
            nhwc_merge(part, nq, C, c, &s1, &s2)
        if train:
            finish_stats(j, c, shift[c], s1, s2, M, rm, rv)
        elif fwd:
            infer_stats(j, c, rm, rv)
        if fwd:
            affine_coefs(j, c, w, b, coef)
        else:
            grad_coefs(j, c, s1, s2, M, w, coef)
        cf[c] = coef[0]
        cf[C + c] = coef[1]
        cf[2 * C + c] = coef[2]
        cf[3 * C + c] = 0.0 if fwd else coef[3]
    nt = team(nr, M * C, j.n_threads)
    for t in prange(nr, schedule='static', num_threads=nt):
        r1 = (t + 1) * rb
        if r1 > M:
            r1 = M
        nhwc_elementwise(j, x, t * rb, r1, what, cf)
    free(part)
    return 0




# ----------------------------------------------------------------------------
# dispatch: one place turns (dtype of x, dtype of parameters) into a
# specialisation; the op switch is written once, inside it.

cdef int run_typed(Job* j, const data_t* x, param_t* p) noexcept nogil:
    if j.op == FWD_TRAIN_NCHW or j.op == FWD_INFER_NCHW:
        return nchw_forward(j, x, p)
    if j.op == BWD_NCHW:
        return nchw_backward(j, x, p)
    return nhwc_run(j, x, p)


cdef int run_job(Job* j) noexcept nogil:
    cdef const void* x = j.x
    if j.ptype == DT_F32:
        if j.xtype == DT_F32:
            return run_typed(j, <const float*>x, <float*>NULL)
        if j.xtype == DT_F64:
            return run_typed(j, <const double*>x, <float*>NULL)
        return run_typed(j, <const half_t*>x, <float*>NULL)
    if j.xtype == DT_F32:
        return run_typed(j, <const float*>x, <double*>NULL)
    if j.xtype == DT_F64:
        return run_typed(j, <const double*>x, <double*>NULL)
    return run_typed(j, <const half_t*>x, <double*>NULL)


cdef int dtype_code(cnp.ndarray a) except -1:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return DT_F32
    if t == cnp.NPY_FLOAT64:
        return DT_F64
    if t == cnp.NPY_FLOAT16:
        return DT_F16
    raise TypeError(f"fastbn._cpu: unsupported dtype {a.dtype}")


cdef inline void* data_or_null(object a):
    if a is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef object execute(int op, cnp.ndarray x, cnp.ndarray y, object dy, object weight,
                    object bias, cnp.ndarray mean, cnp.ndarray invstd, object running_mean,
                    object running_var, object dweight, object dbias, double factor,
                    double eps, bint training, int n_threads):
    cdef Job j
    cdef int rc
    cdef object p
    j.op = op
    j.xtype = dtype_code(x)
    j.ptype = DT_F64 if j.xtype == DT_F64 else DT_F32
    for p in (running_mean, weight, bias, dweight, dbias):
        if p is not None:
            j.ptype = dtype_code(<cnp.ndarray>p)
            break
    if cnp.PyArray_NDIM(x) == 3:
        j.N = x.shape[0]
        j.C = x.shape[1]
        j.S = x.shape[2]
    else:
        j.N = x.shape[0]
        j.C = x.shape[1]
        j.S = 1
    j.x = cnp.PyArray_DATA(x)
    j.y = cnp.PyArray_DATA(y)
    j.dy = data_or_null(dy)
    j.weight = data_or_null(weight)
    j.bias = data_or_null(bias)
    j.mean = <double*>cnp.PyArray_DATA(mean)
    j.invstd = <double*>cnp.PyArray_DATA(invstd)
    j.running_mean = data_or_null(running_mean)
    j.running_var = data_or_null(running_var)
    j.dweight = data_or_null(dweight)
    j.dbias = data_or_null(dbias)
    j.factor = factor
    j.eps = eps
    j.training = training
    j.n_threads = n_threads if n_threads > 0 else 1
    if j.N * j.C * j.S == 0:
        return None
    with nogil:
        rc = run_job(&j)
    if rc != 0:
        raise MemoryError("fastbn: could not allocate the kernel's scratch space")
    return None


# ----------------------------------------------------------------------------
# Python entry points.  Same names and signatures in _gpu.py.
#
# Arrays: x, y, dy, dx are C-contiguous (N, C, S) for *_nchw and (M, C) for
# *_nhwc, of one dtype (float32, float64 or float16).  weight, bias,
# running_mean, running_var, dweight, dbias are (C,) arrays of one parameter
# dtype (float32 or float64) or None.  mean and invstd are float64 (C,).

def forward_train_nchw(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double factor, double eps, int n_threads):
    """Training forward.  IN x, weight, bias; OUT y, mean, invstd (batch
    statistics); INOUT running_mean, running_var, updated with
    r <- (1 - factor) r + factor * stat (unbiased variance)."""
    execute(FWD_TRAIN_NCHW, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, factor, eps, True, n_threads)


def forward_train_nhwc(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double factor, double eps, int n_threads):
    """Channels-last twin of forward_train_nchw."""
    execute(FWD_TRAIN_NHWC, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, factor, eps, True, n_threads)


def forward_infer_nchw(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double eps, int n_threads):
    """Inference forward with the running statistics.  IN x, weight, bias,
    running_mean, running_var; OUT y, mean, invstd (the statistics used)."""
    execute(FWD_INFER_NCHW, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, 0.0, eps, False, n_threads)


def forward_infer_nhwc(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double eps, int n_threads):
    """Channels-last twin of forward_infer_nchw."""
    execute(FWD_INFER_NHWC, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, 0.0, eps, False, n_threads)


def backward_nchw(x, dy, dx, mean, invstd, weight, dweight, dbias, bint training,
                  int n_threads):
    """Backward.  IN x, dy, mean, invstd (from the forward), weight; OUT dx,
    dweight, dbias (either may be None).  training: through the batch
    statistics; otherwise the statistics were constants (eval mode)."""
    execute(BWD_NCHW, x, dx, dy, weight, None, mean, invstd, None, None, dweight,
            dbias, 0.0, 0.0, training, n_threads)


def backward_nhwc(x, dy, dx, mean, invstd, weight, dweight, dbias, bint training,
                  int n_threads):
    """Channels-last twin of backward_nchw."""
    execute(BWD_NHWC, x, dx, dy, weight, None, mean, invstd, None, None, dweight,
            dbias, 0.0, 0.0, training, n_threads)


def max_threads():
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl limits."""
    return omp_get_max_threads()


def openmp_enabled():
    """Whether this build was compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def parallel_copy(cnp.ndarray src, cnp.ndarray dst, int n_threads):
    """dst[...] = src for C-contiguous arrays of equal size, split over threads:
    the memory-bandwidth floor the benchmarks compare against."""
    cdef char* s = <char*>cnp.PyArray_DATA(src)
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(src)
    cdef Py_ssize_t block = 1 << 20
    cdef Py_ssize_t nblocks = (nbytes + block - 1) // block
    cdef Py_ssize_t i, length
    if cnp.PyArray_NBYTES(dst) != nbytes:
        raise ValueError("parallel_copy: src and dst differ in size")
    if n_threads < 1:
        n_threads = 1
    with nogil:
        for i in prange(nblocks, schedule='static', num_threads=n_threads):
            length = nbytes - i * block
            if length > block:
                length = block
            memcpy(d + i * block, s + i * block, <size_t>length)
