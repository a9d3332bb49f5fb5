# Cython/OpenMP batch-normalization kernels for the CPU backend.
#
# Two canonical views cover every rank and layout (DESIGN.md section 2):
#   "nchw": x is a C-contiguous (N, C, S) array, S = product of the spatial dims;
#   "nhwc": x is a C-contiguous (M, C) array, M = N * spatial.
# _api.py resolves a caller's array into one of these views; nothing here knows
# about frameworks, axes or strides, except the plain lanes (forward_plain,
# backward_plain), which take whole numpy calls of the common kind.
#
# Determinism: every reduction is split into chunks whose boundaries depend only
# on the shape (never on the thread count).  Each chunk's partial sums start from
# zero, are stored, and are merged in chunk order by one thread, so results are
# bit-identical for any number of threads and any schedule.
#
# Statistics are one pass of float64 sums of (x - shift), shift being the first
# element of the channel (0 if that is not finite: shift_at).  The shift keeps the sums well conditioned when the
# mean is large compared with the spread (1e4 + N(0, 1) data), and float64
# accumulation keeps float32 and float16 inputs exact to their own precision.
# Element-wise passes: see _simd.h (float32 math for float32 / float16 data,
# float64 lanes for the training dx).  Outputs of FASTBN_STREAM_BYTES or more
# are written with streaming stores (execute).
#
# The Python-facing functions take numpy arrays (or None) and read raw data
# pointers: typed memoryviews and fused `def` dispatch cost microseconds per
# call, which is most of the budget for a small tensor.  _api.py has already
# checked shapes, dtypes, contiguity and writability.  Serial calls never enter
# an OpenMP region (a one-thread region still ends in a futex system call).

cimport numpy as cnp
from cython.parallel cimport prange
import numpy
from libc.math cimport fabs, fma, sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cnp.import_array()

xp = numpy          # the array module of this backend's arrays (_gpu.py: cupy)

cdef extern from * nogil:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP 1
    #else
    #define FASTBN_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int omp_get_max_threads()
    int FASTBN_OPENMP

cdef extern from * nogil:
    """
    /* Outputs of at least this many bytes are written with streaming stores
     * where the kernels can (see execute).  Half this machine's 32 MiB L3; the
     * OS's view of the cache is no guide (a VM here reports the host's 320 MiB). */
    #ifndef FASTBN_STREAM_BYTES
    #define FASTBN_STREAM_BYTES (16 << 20)
    #endif
    """
    Py_ssize_t FASTBN_STREAM_BYTES

cdef extern from "_simd.h" nogil:
    float fastbn_h2f(unsigned short h)
    void fbn_merge16(const double* part, Py_ssize_t nq, double* s1, double* s2)
    void fbn_sfence()
    void fbn_stream_copy(char* d, const char* s, size_t n)
    void fbn_copy_fence()
    unsigned long long fbn_read_all(const char* s, size_t n)
    void fbn_fill(char* d, size_t n, int stream)
    void fbn_xfold_f16(double* m, double* k, double b)
    void fbn_put_cols_s16(const double* cf, float* cols, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1)
    void fbn_put_cols_f64(const double* cf, double* cols, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1)
    Py_ssize_t FBN_COLPAD
    void fbn_cl_dx_f32(const float* x, const float* g, float* y, Py_ssize_t n, Py_ssize_t C, const double* dcols)
    void fbn_cl_dx_f64(const double* x, const double* g, double* y, Py_ssize_t n, Py_ssize_t C, const double* dcols)
    void fbn_cl_dx_f16(const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t n, Py_ssize_t C, const double* dcols)
    void fbn_cl_dx_lineo_f16(const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t n, Py_ssize_t C, const double* dcols)
    void fbn_span_dx_nt_f32(const float* x, const float* g, float* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    void fbn_span_dx_nt_f64(const double* x, const double* g, double* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    void fbn_span_dx_nt_f16(const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    void fbn_cl_nt_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, const float* cols)
    void fbn_cl_nt_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t C, const double* cols)
    void fbn_cl_nt_f16(const unsigned short* x, unsigned short* y, Py_ssize_t n, Py_ssize_t C, const float* cols)
    void fbn_cl_nt2_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t off, Py_ssize_t C, const float* cols)
    void fbn_cl_nt2_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t off, Py_ssize_t C, const double* cols)
    void fbn_cl_nt4_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t off, Py_ssize_t C, const float* cols)
    void fbn_cl_nt4_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t off, Py_ssize_t C, const double* cols)
    void fbn_cl_nt2l_f16(const unsigned short* x, unsigned short* y, Py_ssize_t n, Py_ssize_t off, Py_ssize_t C, const float* cols)
    int fbn_cl_ntv_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, const float* cols)
    int fbn_cl_ntv_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t C, const double* cols)
    int fbn_cl_ntv_f16(const unsigned short* x, unsigned short* y, Py_ssize_t n, Py_ssize_t C, const float* cols)
    bint fbn_near(const void* x, const void* y)
    Py_ssize_t fbn_gcd(Py_ssize_t a, Py_ssize_t b)
    void fbn_cl_ntl_f16(const unsigned short* x, unsigned short* y, Py_ssize_t n, Py_ssize_t C, const float* cols)
    Py_ssize_t fbn_span_ag_f32(const float* g, float* y, Py_ssize_t i, Py_ssize_t n, Py_ssize_t r, Py_ssize_t nr, const double* cf)
    Py_ssize_t fbn_span_ag_f64(const double* g, double* y, Py_ssize_t i, Py_ssize_t n, Py_ssize_t r, Py_ssize_t nr, const double* cf)
    Py_ssize_t fbn_span_ag_f16(const unsigned short* g, unsigned short* y, Py_ssize_t i, Py_ssize_t n, Py_ssize_t r, Py_ssize_t nr, const double* cf)
    void fbn_span_nt_f32(const float* x, float* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    void fbn_span_nt_f64(const double* x, double* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    void fbn_span_nt_f16(const unsigned short* x, unsigned short* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C, const double* cf)
    bint fbn_span_down_f32(const float* x, const float* y)
    bint fbn_span_down_f64(const double* x, const double* y)
    bint fbn_span_down_f16(const unsigned short* x, const unsigned short* y)
    bint fbn_dx_down_f32(const float* x, const float* g, const float* y)
    bint fbn_dx_down_f64(const double* x, const double* g, const double* y)
    bint fbn_dx_down_f16(const unsigned short* x, const unsigned short* g, const unsigned short* y)
    void fbn_sums_f32(const float* x, Py_ssize_t n, double shift, float fill, double* acc)
    void fbn_gsums_f32(const float* x, const float* g, Py_ssize_t n, double mean, double* acc)
    void fbn_ew_f32(int op, const float* x, const float* g, float* y, Py_ssize_t n, double mean, double a, double b, double k)
    void fbn_tsums_f32(const float* x, const float* g, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const double* shift, double* ps, double* pq)
    void fbn_tew_f32(int op, const float* x, const float* g, float* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const float* cols, const double* cf, int cached)
    void fbn_sums_f64(const double* x, Py_ssize_t n, double shift, double fill, double* acc)
    void fbn_gsums_f64(const double* x, const double* g, Py_ssize_t n, double mean, double* acc)
    void fbn_ew_f64(int op, const double* x, const double* g, double* y, Py_ssize_t n, double mean, double a, double b, double k)
    void fbn_tsums_f64(const double* x, const double* g, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const double* shift, double* ps, double* pq)
    void fbn_tew_f64(int op, const double* x, const double* g, double* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const double* cols, const double* cf, int cached)
    void fbn_sums_f16(const unsigned short* x, Py_ssize_t n, double shift, unsigned short fill, double* acc)
    void fbn_gsums_f16(const unsigned short* x, const unsigned short* g, Py_ssize_t n, double mean, double* acc)
    void fbn_ew_f16(int op, const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t n, double mean, double a, double b, double k)
    int fbn_evf_f32(const float* x, const float* g, float* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, const double* shift, double* ps, double* pq, const float* cols, int nt)
    int fbn_evf_f64(const double* x, const double* g, double* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, const double* shift, double* ps, double* pq, const double* cols, int nt)
    int fbn_evf_f16(const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, const double* shift, double* ps, double* pq, const float* cols, int nt)
    void fbn_tsums_f16(const unsigned short* x, const unsigned short* g, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const double* shift, double* ps, double* pq)
    void fbn_tew_f16(int op, const unsigned short* x, const unsigned short* g, unsigned short* y, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const float* cols, const double* cf, int cached)

# Elements per statistics chunk of one channel (channels-first) and the least
# number of rows per chunk (channels-last).  Part of the numerical definition:
# changing them changes the last bits of the statistics (never the thread count).
DEF CHUNK = 8192
DEF NHWC_CHUNK = 65536
DEF MIN_ROWS = 64
DEF MAX_ROWS = 1024      # a lane sums at most this many rows before the merge
# Below this many elements a call runs on one thread: waking the team costs more.
DEF SERIAL_BELOW = 32768
# Channels-first element-wise passes split the work in tasks of about this
# many elements (64K measured the same).
DEF EW_BLOCK = 16384
# Channels-last element-wise passes take blocks of whole rows of about this
# many bytes of x, the same number per thread.  Each block starts new
# prefetch streams (and, after a reduction, blocks go last first); with 64 KiB
# blocks the restarts cost 3-12 % of a 26-51 MB pass at one thread.
DEF NHWC_EW_BYTES = 1048576
# Channels-first blocks hold enough channels for runs of at least this many
# contiguous bytes (the prefetchers need a few KiB to stream).
DEF RUN_BYTES = 131072
# Channels-first float32 and float16 runs shorter than this many bytes take
# each thread's channels as one block in the training forward, and at one
# thread in the backward: two passes over memory.  The blocks of RUN_BYTES
# spans are capped at a quarter of a thread's channels, which leaves spans of
# 50-100 KiB, and every span restarts the prefetch streams; one block reads
# whole samples' spans for the statistics, then writes the output in one
# stream from memory, as inference does.  The cache the blocks saved did not
# pay for their restarts on this VM (it gets about 16 MiB of the L3).  A/B of
# two builds, medians of 21-31, time with one block / with blocks, 1 thread:
# training forward 256x256x14x14 0.84-0.92, 128x64x28x28 0.88-0.91,
# 64x2048x7x7 0.95-1.00, 32x256x14x14 0.91, float16 256x256x14x14 0.94,
# 16x512x7x7 0.92; backward 0.86-0.92, 0.88-0.98, 0.96, 0.93, float16 0.86,
# 0.85.  2 threads, training forward: 0.93-1.02, 0.83-0.91, 1.00-1.10,
# float16 0.88-0.91 (the backward was 1.02-1.13 there: it keeps its blocks).
# Longer runs (32x64x56x56: 12.5 KiB) and float64 keep their blocks: their
# spans are long enough, and their backward was 2-24 % slower in one block.
DEF TWO_PASS_RUN = 4096
# Channels-first blocks are reduced a few samples at a time (channel c of
# samples n..n+3, then channel c + 1): STREAMS address streams at once
# (backward: two samples of x and of dy) rather than one per sample span, and
# each channel's partial sums stay hot across its runs.  Measured at 1 thread:
# 64x2048x7x7 training forward 21 % faster, 256x256x14x14 6-9 %; 8 streams
# were 15-33 % slower than 4.
DEF STREAMS = 4
# Channels-last: channel tiles of the reduction tasks.
DEF CTASK = 256
# Channels-last reduction calls with fewer row chunks than threads go by
# channel tiles (nhwc_tiled) when each thread's share of a row spans at least
# this many bytes.  Narrower shares lost: the threads' tiles interleave in
# every row, and each core's prefetchers run into the other's lines at every
# boundary ((64, 512) float32, 1 KiB a thread: 1.3-2.1x slower at 2 threads,
# though one thread took the same tiles in 0.89-1.06 of the time).
DEF TILED_SPAN = 4096
# One thread takes the channel tiles too for training work of one row chunk
# whose x is at least this big: x and y (or dy) then outgrow the 1 MiB L2, and
# a tile's second read comes from L2 rather than L3.  A/B, 1 thread, rotated
# medians of 15-21, float32, time tiled / two passes: backward (64, 2048)
# 0.94-0.97 (three runs), (48, 2048) 0.97, (32, 4096) 0.95-0.97, (12, 8192)
# 0.95, (16, 16384) 0.93-0.98; training forward 0.91-0.95, 0.95, 0.93-0.96,
# 0.94, 0.92-0.97.  (64, 1024), 256 KiB: training forward 1.04-1.05x slower
# tiled, so it keeps the two passes (its untouched rows move 0.95-1.05 from
# run to run).  float64 (64, 1024), (64, 2048), (48, 1024): backward 0.95,
# 0.95, 1.01, training forward 0.97, 0.90, 0.87; float16 (48-64, 4096-8192):
# backward 0.78-0.80, training forward 0.96-1.00.  The eval-mode backward
# keeps its one pass.
DEF TILED_ONE_BYTES = 393216
DEF COL_SLACK = 520          # doubles: col_phase moves the columns up to 4 KiB + 64 B
DEF NT4_ROW = 8192          # channels-last forward rows streamed four quarters at
                            # once from here (cl_nt); A/B, 1 thread: 2048-4096 float32
                            # channels inference 0.88-0.90, training 0.90-0.97;
                            # 4 KiB rows 1.23-1.54x slower (128x1024x7x7)
# On one thread, rows of 1-2 KiB (256-512 float32 channels, 128-256 float64)
# streamed take the four quarters too: their three coefficient loads per
# vector held the loop at 0.89-0.91 of a copy.  A/B of the raw kernels,
# rotated, medians of 15-21, time four quarters / two halves, three runs:
# inference 256x256x14x14 0.90-0.97, 64x256x28x28 0.91, 128x512x14x14
# 0.91-0.94; training 0.95-0.98, 0.97, 0.93-0.99; in cache or under 13 MB
# 0.98-1.04; float64 256x128x14x14 and 128x256x14x14 0.98-1.00.  Called cold
# (after other work, --method cold) 256x256x14x14 inference 0.99, training
# 0.96: the cold misses hide most of what the loads cost.  Two threads
# were even to noisy (0.94-1.09 either way); 4 KiB rows lost up to 7 %
# (1.00-1.07 on 128x1024x7x7 inference, against 1.23-1.54 when NT4_ROW was set).
DEF NT4_ALONE_ROW = 1024
# Channels-first runs at least this long go through the streaming span writer
# (fbn_span_nt: a vector crosses at most one run boundary, and the aligned
# head fits in the first run for every dtype).
DEF SPAN_MIN = 32
# The eval-mode backward with dweight / dbias (nchw_eval_fused) reduces a
# thread's runs of a sample and writes their dx in pieces of about this many
# bytes when dx is not streamed (in cache): 1-4 KiB pieces took 0.66-0.76 of
# the time of whole spans (1 thread, 0.5-6.4 MB).  Streamed, such pieces were
# slower (1 KiB 1.10-1.38x, 8 KiB 1.03-1.21x: each began and ended with a
# partial line of ordinary stores); there each run's dx follows its sums
# through one span writer (fbn_span_ag), whole lines only.
DEF FUSED_BYTES = 1024
# Channels-last calls with at least this many channels share the per-channel
# coefficients (statistics, running update, columns: a few ns a channel)
# among the threads.  Done by one thread, (16, 16384) float32 inference took
# longer at 2 threads than at 1 (the spinning worker slows the other vCPU).
DEF PAR_CHANNELS = 2048
# The float32 training dx folds a channel's mean into its constant when the
# mean lies within this many of its standard deviations (coefs_range).
DEF FOLD_SIGMAS = 16.0


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
    double* mean_lo                   # OUT training forward / IN training backward,
                                      # float64 (C,), or NULL: mean's rounding error
    void* running_mean                # INOUT or NULL
    void* running_var                 # INOUT or NULL
    void* dweight                     # OUT   or NULL
    void* dbias                       # OUT   or NULL
    double factor                     # momentum factor for the running update
    double eps
    int training                      # backward: through batch statistics?
    int n_threads
    int stream                        # write y with streaming stores (see execute)
    int cached                        # x, y (and dy) fit in cache (see execute)


# ----------------------------------------------------------------------------
# typed access to the SIMD primitives of _simd.h

cdef inline double ld(const data_t* p, Py_ssize_t i) noexcept nogil:
    if data_t is half_t:
        return <double>fastbn_h2f(p[i])
    else:
        return <double>p[i]


cdef inline double shift_at(const data_t* x, Py_ssize_t i) noexcept nogil:
    """A channel's reduction shift: its element i (the first), or 0 where that
    is Inf or NaN.  An Inf shift would make every shifted term NaN, where an
    Inf anywhere else gives the channel an Inf mean (as PyTorch does)."""
    cdef double v = ld(x, i)
    return v if v - v == 0.0 else 0.0


cdef inline void sums(const data_t* x, Py_ssize_t n, double shift, data_t fill,
                      double* s) noexcept nogil:
    if data_t is float:
        fbn_sums_f32(x, n, shift, fill, s)
    elif data_t is double:
        fbn_sums_f64(x, n, shift, fill, s)
    else:
        fbn_sums_f16(x, n, shift, fill, s)


cdef inline void gsums(const data_t* x, const data_t* g, Py_ssize_t n, double mean,
                       double* s) noexcept nogil:
    if data_t is float:
        fbn_gsums_f32(x, g, n, mean, s)
    elif data_t is double:
        fbn_gsums_f64(x, g, n, mean, s)
    else:
        fbn_gsums_f16(x, g, n, mean, s)


cdef inline void run_ew(int op, const data_t* x, const data_t* g, data_t* y, Py_ssize_t n,
                        const double* cf) noexcept nogil:
    """One contiguous run, coefficients cf = (mean, a, b, k):
    op 0: y = (x - mean) a + b;  op 1: y = a g + b (x - mean) + k;  op 2: y = a g."""
    if data_t is float:
        fbn_ew_f32(op, x, g, y, n, cf[0], cf[1], cf[2], cf[3])
    elif data_t is double:
        fbn_ew_f64(op, x, g, y, n, cf[0], cf[1], cf[2], cf[3])
    else:
        fbn_ew_f16(op, x, g, y, n, cf[0], cf[1], cf[2], cf[3])


cdef inline void span_nt(const data_t* x, data_t* y, Py_ssize_t n, Py_ssize_t nr, Py_ssize_t c,
                         Py_ssize_t C, const double* cf) noexcept nogil:
    """Forward element-wise over nr consecutive runs of n (the first of channel
    c) with streaming stores (fbn_span_nt; n >= 32)."""
    if data_t is float:
        fbn_span_nt_f32(x, y, n, nr, c, C, cf)
    elif data_t is double:
        fbn_span_nt_f64(x, y, n, nr, c, C, cf)
    else:
        fbn_span_nt_f16(x, y, n, nr, c, C, cf)


cdef inline bint span_down(const data_t* x, const data_t* g, const data_t* y,
                           int op) noexcept nogil:
    """Whether span_nt (op 0: from x, op 2: from g) or span_dx_nt (op 1) walks
    down the addresses (fbn_span_down, fbn_dx_down)."""
    if op == 1:
        if data_t is float:
            return fbn_dx_down_f32(x, g, y)
        elif data_t is double:
            return fbn_dx_down_f64(x, g, y)
        else:
            return fbn_dx_down_f16(x, g, y)
    if op == 2:
        x = g
    if data_t is float:
        return fbn_span_down_f32(x, y)
    elif data_t is double:
        return fbn_span_down_f64(x, y)
    else:
        return fbn_span_down_f16(x, y)


cdef inline Py_ssize_t span_ag(const data_t* g, data_t* y, Py_ssize_t i, Py_ssize_t n,
                               Py_ssize_t r, Py_ssize_t nr, const double* cf) noexcept nogil:
    """Eval-mode dx of a span's runs up to the end of run r, after its sums
    (fbn_span_ag; n >= 32): returns the first element not yet written."""
    if data_t is float:
        return fbn_span_ag_f32(g, y, i, n, r, nr, cf)
    elif data_t is double:
        return fbn_span_ag_f64(g, y, i, n, r, nr, cf)
    else:
        return fbn_span_ag_f16(g, y, i, n, r, nr, cf)


cdef inline void span_dx_nt(const data_t* x, const data_t* g, data_t* y, Py_ssize_t n,
                            Py_ssize_t nr, Py_ssize_t c, Py_ssize_t C,
                            const double* cf) noexcept nogil:
    """Training dx over nr consecutive runs of n with streaming stores
    (fbn_span_dx_nt)."""
    if data_t is float:
        fbn_span_dx_nt_f32(x, g, y, n, nr, c, C, cf)
    elif data_t is double:
        fbn_span_dx_nt_f64(x, g, y, n, nr, c, C, cf)
    else:
        fbn_span_dx_nt_f16(x, g, y, n, nr, c, C, cf)


cdef inline void cl_dx_nt(const data_t* x, const data_t* g, data_t* y, Py_ssize_t n,
                          Py_ssize_t C, const double* dcols) noexcept nogil:
    """Channels-last training dx over n elements of whole rows with streaming
    stores (fbn_cl_dx: the period's columns in registers where they fit;
    rows of 4 KiB and more two half-blocks at once, sharing each column load;
    down the addresses a line a step when y starts just after x or g modulo
    4 KiB; float16: fbn_cl_dx_f16, a line per step)."""
    if data_t is float:
        fbn_cl_dx_f32(x, g, y, n, C, dcols)
    elif data_t is double:
        fbn_cl_dx_f64(x, g, y, n, C, dcols)
    else:
        fbn_cl_dx_f16(x, g, y, n, C, dcols)


cdef inline void cl_dx_cached(const data_t* x, const data_t* g, data_t* y, Py_ssize_t n,
                              Py_ssize_t C, const double* dcols) noexcept nogil:
    """Channels-last float16 training dx with ordinary stores, a line per step
    in float32 lanes from the float32 dcols (fbn_cl_dx_lineo_f16), where
    fbn_tew op 1 converts float64 columns to 8 lanes at each load.  Backward,
    1 thread, A/B: 0.71-0.89 of the time with 128-1024 channels (0.7-6.4 MB)
    and 0.93-1.04 with 2048 from memory; 2048 channels in cache 1.06-1.09
    (their 32 KiB of float32 columns against four rows per load in fbn_tew),
    which keep fbn_tew.  Other types: fbn_tew."""
    if data_t is half_t:
        fbn_cl_dx_lineo_f16(x, g, y, n, C, dcols)


cdef inline void cl_nt(const data_t* x, data_t* y, Py_ssize_t nr, Py_ssize_t C,
                       const void* cols, bint trained, bint alone) noexcept nogil:
    """Channels-last forward element-wise over nr whole rows with streaming
    stores, in the first of these ways that applies (each walks down the
    addresses or up, see fbn_walk_down):
    - rows of NT4_ROW bytes or more (2048 float32 channels), whose coefficient
      columns share L1 badly with the stream, and, on one thread (alone), rows
      of NT4_ALONE_ROW to twice that: four quarters at once (fbn_cl_nt4), one
      coefficient load per four vectors;
    - few channels (a period of at most eight vectors, e.g. 128 float32 or 64
      float64; four for float16, but for its near placements below): one span
      with the coefficients in registers (fbn_cl_ntv);
    - two halves at once when the second starts on the same 64-byte phase:
      float32 / float64 a vector of each at a time (fbn_cl_nt2), float16 a
      whole line of each, two vectors (fbn_cl_nt2l_f16: half-line streaming
      stores in two streams ran 2.6x slower than one); not for float16 after
      the statistics (trained) with rows of 4 KiB or more (3-6 % slower);
    - else one span (fbn_cl_nt; float16 with y up to 256 bytes after x
      modulo 4 KiB, fbn_near: whole lines, walking down, fbn_cl_ntl_f16)."""
    cdef Py_ssize_t h = nr // 2
    cdef Py_ssize_t q = nr // 4
    cdef bint near = data_t is half_t and fbn_near(x, y)
    cdef Py_ssize_t row = C * <Py_ssize_t>sizeof(data_t)
    if data_t is not half_t and q > 0 and (q * row) % 64 == 0 and (
            row >= NT4_ROW or (alone and NT4_ALONE_ROW <= row <= 2 * NT4_ALONE_ROW)):
        if data_t is float:
            fbn_cl_nt4_f32(x, y, q * C, q * C, C, <const float*>cols)
        else:
            fbn_cl_nt4_f64(x, y, q * C, q * C, C, <const double*>cols)
        x += 4 * q * C
        y += 4 * q * C
        nr -= 4 * q
        h = nr // 2
        if nr == 0:
            return
    if data_t is float:
        if fbn_cl_ntv_f32(x, y, nr * C, C, <const float*>cols):
            return
    elif data_t is double:
        if fbn_cl_ntv_f64(x, y, nr * C, C, <const double*>cols):
            return
    elif not near:
        if fbn_cl_ntv_f16(x, y, nr * C, C, <const float*>cols):
            return
    if h > 0 and (h * C * <Py_ssize_t>sizeof(data_t)) % 64 == 0 and not (
            data_t is half_t and trained and C * <Py_ssize_t>sizeof(data_t) >= 4096):
        if data_t is float:
            fbn_cl_nt2_f32(x, y, h * C, h * C, C, <const float*>cols)
        elif data_t is double:
            fbn_cl_nt2_f64(x, y, h * C, h * C, C, <const double*>cols)
        else:
            fbn_cl_nt2l_f16(x, y, h * C, h * C, C, <const float*>cols)
        if nr == 2 * h:
            return
        x += 2 * h * C
        y += 2 * h * C
        nr -= 2 * h
    if data_t is float:
        fbn_cl_nt_f32(x, y, nr * C, C, <const float*>cols)
    elif data_t is double:
        fbn_cl_nt_f64(x, y, nr * C, C, <const double*>cols)
    elif near:
        fbn_cl_ntl_f16(x, y, nr * C, C, <const float*>cols)
    else:
        fbn_cl_nt_f16(x, y, nr * C, C, <const float*>cols)


cdef inline void tile_sums(const data_t* x, const data_t* g, Py_ssize_t C, Py_ssize_t r0,
                           Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const double* shift,
                           double* ps, double* pq) noexcept nogil:
    if data_t is float:
        fbn_tsums_f32(x, g, C, r0, r1, c0, c1, shift, ps, pq)
    elif data_t is double:
        fbn_tsums_f64(x, g, C, r0, r1, c0, c1, shift, ps, pq)
    else:
        fbn_tsums_f16(x, g, C, r0, r1, c0, c1, shift, ps, pq)


cdef inline void tile_ew(int op, const data_t* x, const data_t* g, data_t* y, Py_ssize_t C,
                         Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                         const void* cols, const double* cf, int cached) noexcept nogil:
    """Element-wise op (as run_ew) on rows [r0, r1) x channels [c0, c1); cols
    holds the math-type columns hi, a, bf (see put_cols) and cf the float64 columns
    mean, a, b, k, each of length C.  cached: the tensors fit in cache (see execute)."""
    if data_t is float:
        fbn_tew_f32(op, x, g, y, C, r0, r1, c0, c1, <const float*>cols, cf, cached)
    elif data_t is double:
        fbn_tew_f64(op, x, g, y, C, r0, r1, c0, c1, <const double*>cols, cf, cached)
    else:
        fbn_tew_f16(op, x, g, y, C, r0, r1, c0, c1, <const float*>cols, cf, cached)


cdef inline int team(Py_ssize_t work, Py_ssize_t elements, int n_threads) noexcept nogil:
    """Threads worth waking for `work` independent tasks over `elements`."""
    if elements < SERIAL_BELOW or work < 2:
        return 1
    if work < n_threads:
        return <int>work
    return n_threads


cdef inline Py_ssize_t cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------
# per-channel bookkeeping shared by both layouts

cdef void stats_range(Job* j, Py_ssize_t c0, Py_ssize_t c1, bint train, const double* s1,
                      const double* s2, const double* shift, Py_ssize_t n, param_t* rm,
                      param_t* rv) noexcept nogil:
    """The forward's statistics of channels [c0, c1) into j.mean / j.invstd:
    in training from the merged shifted sums s1, s2 (shift: each channel's
    shift), also updating the running ones; in inference the running ones.
    The biased variance normalises; the unbiased one goes to running_var.
    Array loops with no call inside, which the compiler turns into vector
    divisions and square roots (the same bits as one channel at a time); the
    biased variance waits in j.invstd for the running update."""
    cdef double dn = <double>n, f = j.factor, eps = j.eps, m, var, t
    cdef double* mean = j.mean
    cdef double* inv = j.invstd
    cdef Py_ssize_t c
    if not train:
        for c in range(c0, c1):
            mean[c] = <double>rm[c]
            inv[c] = 1.0 / sqrt(<double>rv[c] + eps)
        return
    for c in range(c0, c1):
        m = s1[c] / dn
        var = s2[c] / dn - m * m
        if var < 0.0:          # rounding only; NaN falls through unchanged
            var = 0.0
        mean[c] = shift[c] + m
        inv[c] = var
    if j.mean_lo != NULL:      # what rounding shift + m lost (TwoSum): see MEAN_LO
        for c in range(c0, c1):
            m = s1[c] / dn
            t = mean[c] - shift[c]
            j.mean_lo[c] = (shift[c] - (mean[c] - t)) + (m - t)
    if rm != NULL:
        for c in range(c0, c1):
            rm[c] = <param_t>((1.0 - f) * <double>rm[c] + f * mean[c])
            rv[c] = <param_t>((1.0 - f) * <double>rv[c] + f * (inv[c] * dn / (dn - 1.0)))
    for c in range(c0, c1):
        inv[c] = 1.0 / sqrt(inv[c] + eps)


cdef inline void grad_outputs(Job* j, Py_ssize_t c, double sdy, double sdyx,
                              const param_t* w) noexcept nogil:
    """dweight / dbias of channel c from sdy = sum(dy), sdyx = sum(dy * (x - mean))
    (w only selects the parameter type)."""
    if j.dweight != NULL:
        (<param_t*>j.dweight)[c] = <param_t>(sdyx * j.invstd[c])
    if j.dbias != NULL:
        (<param_t*>j.dbias)[c] = <param_t>sdy


cdef void coefs_range(Job* j, Py_ssize_t c0, Py_ssize_t c1, bint train, bint fwd,
                      const double* s1, const double* s2, const double* shift, Py_ssize_t n,
                      param_t* rm, param_t* rv, const param_t* w, const param_t* bias,
                      double* cm, double* ca, double* cb, double* ck,
                      Py_ssize_t cs, bint fold) noexcept nogil:
    """The element-wise coefficients of channels [c0, c1), channel c's at
    cm[c cs], ca[c cs], cb[c cs], ck[c cs] (mean, a, b, k):
    - forward, y = (x - mean) a + b: from the statistics (stats_range; s1, s2,
      shift: the merged sums and shifts in training, else unread); with
      j.mean_lo (training) about mean + mean_lo: b less a mean_lo (MEAN_LO);
    - backward, dx = a dy + b (x - mean) + k: from the gradient sums s1 =
      sum(dy), s2 = sum(dy (x - mean)), also writing dweight / dbias (not when
      s1 is NULL: the eval-mode one pass writes them after); in eval mode
      b = k = 0, as the forward's y = (dy - 0) a + b with b = -0, which is a dy
      exactly (see fbn_fold_s16), so the streamed writers take it.  With
      j.mean_lo (training), s2 and the dx are taken about mean + mean_lo
      (MEAN_LO): b from s2 - mean_lo s1, and k less b mean_lo.
      With fold (float32 data), the training dx of a channel whose mean lies
      within FOLD_SIGMAS of its standard deviations (|mean| invstd, eps
      included) takes the mean into the constant: mean 0 and k - b mean with
      one rounding, dx = a dy + (b x + k'), and the dx kernels leave out the
      subtraction where the mean is +0 (x - (+0) is x, the same bits).  The
      constant's rounding is then 2^-53 |k - b mean| <= 2^-53 (FOLD_SIGMAS + 1)
      |a| rms(dy) (|k| <= |a| rms(dy), |b mean| = |a| invstd^2 |mean(dy (x -
      mean))| |mean| and |mean(dy (x - mean))| <= rms(dy) / invstd): 1.9e-15 of
      the a dy term's scale, half a float32 ulp of dx only where dx cancels that
      term by about 3e7.  Other channels stay centred, b (x - mean) + k: one
      float32 ulp of spread 2e7 standard deviations from zero, folded, came out
      1.95x the float32 tolerance off.
    Loops without calls, each writing one array, for the compiler's vector
    units (divisions, square roots; a loop writing four arrays needs more
    run-time overlap checks than it will version for, and stays scalar): the
    same bits as one channel at a time."""
    cdef double dn = <double>n
    cdef const double* mean = j.mean
    cdef const double* invstd = j.invstd
    cdef const double* lo = j.mean_lo
    cdef Py_ssize_t c
    if fwd:
        stats_range(j, c0, c1, train, s1, s2, shift, n, rm, rv)
    elif s1 != NULL:       # with lo: sum(dy (x - (mean + lo))) = s2 - lo s1
        for c in range(c0, c1):
            grad_outputs(j, c, s1[c], s2[c] if lo == NULL else fma(-lo[c], s1[c], s2[c]), w)
    for c in range(c0, c1):
        cm[c * cs] = mean[c] if fwd or j.training else 0.0
    if w == NULL:
        for c in range(c0, c1):
            ca[c * cs] = invstd[c]
    else:
        for c in range(c0, c1):
            ca[c * cs] = <double>w[c] * invstd[c]
    if fwd:
        if bias == NULL:
            for c in range(c0, c1):
                cb[c * cs] = 0.0
        else:
            for c in range(c0, c1):
                cb[c * cs] = <double>bias[c]
        if train and lo != NULL:    # y = (x - (mean + lo)) a + b = (x - mean) a + (b - lo a)
            for c in range(c0, c1):
                cb[c * cs] = fma(-lo[c], ca[c * cs], cb[c * cs])
        for c in range(c0, c1):
            ck[c * cs] = 0.0
    elif j.training:
        if lo == NULL:
            for c in range(c0, c1):
                cb[c * cs] = -ca[c * cs] * invstd[c] * invstd[c] * s2[c] / dn
        else:                  # about mean + lo (MEAN_LO)
            for c in range(c0, c1):
                cb[c * cs] = -ca[c * cs] * invstd[c] * invstd[c] * fma(-lo[c], s1[c], s2[c]) / dn
        for c in range(c0, c1):
            ck[c * cs] = -ca[c * cs] * s1[c] / dn
        if lo != NULL:         # b (x - (mean + lo)) = b (x - mean) - b lo
            for c in range(c0, c1):
                ck[c * cs] = fma(-cb[c * cs], lo[c], ck[c * cs])
        if fold:
            for c in range(c0, c1):
                if fabs(cm[c * cs]) * invstd[c] <= FOLD_SIGMAS:
                    ck[c * cs] = fma(-cb[c * cs], cm[c * cs], ck[c * cs])
                    cm[c * cs] = 0.0
    else:
        for c in range(c0, c1):
            cb[c * cs] = -0.0
        for c in range(c0, c1):
            ck[c * cs] = 0.0


# ----------------------------------------------------------------------------
# channels-first (N, C, S)
#
# Channel c holds n = N*S elements: N runs of S, one per sample.  Chunk q of
# the channel is its elements [q*CHUNK, (q+1)*CHUNK), which may cut runs into
# pieces; each piece is summed by the same primitive wherever it is visited
# from, so the partial of a chunk is the same in every traversal.
#
# Large tensors with enough channels: each thread takes blocks of adjacent
# channels (contiguous spans of a few KiB per sample), reduces them, then
# normalises them while they are still in cache.  Otherwise: (channel, chunk)
# reduction tasks over all threads, then one element-wise pass in memory order.

cdef inline void nchw_reduce_run(Job* j, const data_t* x, Py_ssize_t nn, Py_ssize_t c,
                                 Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t q, bint grad,
                                 double shift, double* part_c) noexcept nogil:
    """Sum elements [lo, hi) of run (nn, c) (offsets within the run) into the
    chunk partials of channel c, splitting at chunk boundaries; q is the chunk
    of element lo (passed in: a division per run costs more than a short run)."""
    cdef Py_ssize_t e = nn * j.S + lo, end = nn * j.S + hi
    cdef Py_ssize_t base = (nn * j.C + c) * j.S - nn * j.S
    cdef Py_ssize_t stop
    while e < end:
        stop = (q + 1) * CHUNK
        if stop > end:
            stop = end
        if grad:
            gsums(x + base + e, <const data_t*>j.dy + base + e, stop - e, shift, &part_c[16 * q])
        else:
            # fill: an element equal to the shift (+0 for a shift of 0)
            sums(x + base + e, stop - e, shift, x[c * j.S] if shift != 0.0 else <data_t>0,
                 &part_c[16 * q])
        e = stop
        q += 1


cdef inline void nchw_reduce_chunk(Job* j, const data_t* x, Py_ssize_t c, Py_ssize_t q,
                                   bint grad, double shift, double* part_c) noexcept nogil:
    """Chunk q of channel c, piece by piece in run order."""
    cdef Py_ssize_t S = j.S
    cdef Py_ssize_t e0 = q * CHUNK, e1 = (q + 1) * CHUNK
    cdef Py_ssize_t nn, lo, hi
    if e1 > j.N * S:
        e1 = j.N * S
    for nn in range(16):
        part_c[16 * q + nn] = 0.0
    for nn in range(e0 // S, cdiv(e1, S)):
        lo = e0 - nn * S if e0 > nn * S else 0
        hi = e1 - nn * S if e1 < (nn + 1) * S else S
        nchw_reduce_run(j, x, nn, c, lo, hi, q, grad, shift, part_c)


cdef inline bint ew_down(Job* j, const data_t* x, int op) noexcept nogil:
    """Whether nchw_ew_runs's op walks down the addresses (span_down), so that
    its callers take their spans last first: a walk down each span but up
    across them ran 7-15 % slower than up throughout (float64 64x64x32x32
    inference, one thread)."""
    return j.stream and j.S >= SPAN_MIN and span_down(x, <const data_t*>j.dy,
                                                      <const data_t*>j.y, op)


cdef inline void nchw_ew_runs(Job* j, const data_t* x, int op, Py_ssize_t r0, Py_ssize_t r1,
                              const double* cf) noexcept nogil:
    """Element-wise op on runs r0..r1 in memory order (run r is sample r // C,
    channel r % C); cf holds 4 coefficients per channel."""
    cdef Py_ssize_t r, off
    cdef Py_ssize_t c = r0 % j.C
    if j.stream and j.S >= SPAN_MIN:
        # one span, streaming stores (see Job.stream); op 2 is the forward's
        # writer on dy (coefs_range)
        if op != 1:
            span_nt((x if op == 0 else <const data_t*>j.dy) + r0 * j.S,
                    <data_t*>j.y + r0 * j.S, j.S, r1 - r0, c, j.C, cf)
        else:
            span_dx_nt(x + r0 * j.S, <const data_t*>j.dy + r0 * j.S, <data_t*>j.y + r0 * j.S,
                       j.S, r1 - r0, c, j.C, cf)
        fbn_sfence()
        return
    for r in range(r0, r1):
        off = r * j.S
        run_ew(op, x + off, <const data_t*>j.dy + off, <data_t*>j.y + off, j.S, &cf[4 * c])
        c += 1
        if c == j.C:
            c = 0


cdef int nchw_run(Job* j, const data_t* x, param_t* p) noexcept nogil:
    cdef Py_ssize_t N = j.N, C = j.C, S = j.S
    cdef Py_ssize_t n = N * S
    cdef Py_ssize_t nq = cdiv(n, CHUNK)
    cdef bint fwd = j.op != BWD_NCHW
    cdef bint train = j.op == FWD_TRAIN_NCHW
    cdef bint grad = not fwd
    cdef bint reduce = train or (grad and (j.training or j.dweight != NULL or j.dbias != NULL))
    cdef int op = 0 if fwd else (1 if j.training else 2)
    cdef int nt = team(C * nq, C * n, j.n_threads)
    cdef Py_ssize_t k, ds, nblk, blk, c, t, rpt, nr, tid
    cdef double s1, s2
    cdef param_t* rm = <param_t*>j.running_mean
    cdef param_t* rv = <param_t*>j.running_var
    cdef const param_t* w = <const param_t*>j.weight
    cdef const param_t* b = <const param_t*>j.bias
    # scratch: 16 partial-sum lanes per (channel, chunk), 4 coefficients per
    # channel, the merged sums and shifts (tot: s1, s2, shift, C each)
    cdef double* part = <double*>malloc(<size_t>(16 * C * nq + 7 * C + 1) * sizeof(double))
    cdef double* cf = part + 16 * C * nq
    cdef double* tot = cf + 4 * C
    if part == NULL:
        return -1
    # Eval mode with dweight / dbias: one pass (nchw_eval_fused), each thread
    # on whole channels, so only with enough of them to go round (else the
    # two passes below, which share chunks of channels: 64x1x224x224 at 2
    # threads took 2.1x, 8x3x224x224 1.4x their time in one pass).
    cdef bint fused = op == 2 and reduce and (nt == 1 or C >= 4 * nt)

    # Channels per block: contiguous spans of RUN_BYTES, but at least 4 blocks a
    # thread; one block a thread for the short runs of TWO_PASS_RUN (below).
    ds = <Py_ssize_t>sizeof(data_t)
    k = cdiv(RUN_BYTES, S * ds)
    if k > C // (4 * nt):
        k = C // (4 * nt)
    if k < 1:
        k = 1
    nblk = cdiv(C, k)

    # Serial calls stay out of OpenMP: even a one-thread parallel region ends
    # in a futex system call, a measurable part of a small tensor's time.
    if reduce and not fused and (nt == 1 or nblk >= 4 * nt):
        if ds <= 4 and S * ds < TWO_PASS_RUN and (train or nt == 1):
            k = cdiv(C, nt)             # each thread's channels in one block
            nblk = cdiv(C, k)
        if nt == 1:
            for blk in range(nblk):
                nchw_block(j, x, blk * k, (blk + 1) * k, nq, train, fwd, grad, op, part, cf,
                           tot, rm, rv, w, b)
        else:
            for tid in prange(nt, schedule='static', chunksize=1, num_threads=nt):
                nchw_staggered(j, x, tid, nt, k, nq, train, fwd, grad, op, part, cf, tot,
                               rm, rv, w, b)
        free(part)
        return 0

    if reduce and not fused:
        if nt == 1:
            for t in range(C * nq):
                nchw_reduce_task(j, x, t, nq, grad, part)
        else:
            for t in prange(C * nq, schedule='static', num_threads=nt):
                nchw_reduce_task(j, x, t, nq, grad, part)
    # fused: dweight / dbias rewritten after
    nchw_coefs(j, x, 0, C, nq, train, fwd, reduce and not fused, part, tot, cf, rm, rv, w, b)
    if fused:
        nchw_eval_fused(j, x, nt, nq, part, cf, w)
        free(part)
        return 0
    rpt = cdiv(EW_BLOCK, S)
    nr = cdiv(N * C, rpt)
    nt = team(nr, C * n, j.n_threads)
    if nt == 1:
        nchw_ew_share(j, x, op, 0, 1, nr, rpt, reduce, cf)
    else:
        for tid in prange(nt, schedule='static', chunksize=1, num_threads=nt):
            nchw_ew_share(j, x, op, tid, nt, nr, rpt, reduce, cf)
    free(part)
    return 0


cdef inline void nchw_coefs(Job* j, const data_t* x, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t nq, bint train, bint fwd, bint summed, double* part,
                            double* tot, double* cf, param_t* rm, param_t* rv,
                            const param_t* w, const param_t* b) noexcept nogil:
    """Channels [c0, c1): their merged sums (when summed) and, in the training
    forward, shifts into tot, the forward's statistics, the coefficients into cf."""
    cdef Py_ssize_t C = j.C, c
    for c in range(c0, c1):
        if summed:
            fbn_merge16(&part[16 * c * nq], nq, &tot[c], &tot[C + c])
        if train:
            tot[2 * C + c] = shift_at(x, c * j.S)
    coefs_range(j, c0, c1, train, fwd, tot if summed else NULL, tot + C, tot + 2 * C,
                j.N * j.S, rm, rv, w, b, cf, cf + 1, cf + 2, cf + 3, 4, data_t is float)


cdef void nchw_eval_fused(Job* j, const data_t* x, int nt, Py_ssize_t nq, double* part,
                          const double* cf, const param_t* w) noexcept nogil:
    """Eval-mode backward with dweight / dbias: dx = a dy needs no sums, so
    each of the nt threads takes its channels sample by sample, reducing a
    sample's runs and writing their dx while they are in cache: one pass over
    memory instead of two.  Streamed, each run's dx goes right after its sums
    (A/B against the sample's whole span after all its sums: 0.65-0.95 of the
    time, float32).  Each channel's runs are reduced in sample order,
    as in the two passes: the same bits.  cf holds the coefficients."""
    cdef Py_ssize_t C = j.C, c
    cdef int tid
    cdef double s1, s2
    for c in range(16 * C * nq):
        part[c] = 0.0
    if nt == 1:
        nchw_fused_share(j, x, 0, C, nq, part, cf)
    else:
        for tid in prange(nt, schedule='static', chunksize=1, num_threads=nt):
            nchw_fused_share(j, x, (C * tid) // nt, (C * (tid + 1)) // nt, nq, part, cf)
    for c in range(C):
        fbn_merge16(&part[16 * c * nq], nq, &s1, &s2)
        grad_outputs(j, c, s1, s2, w)


cdef inline void nchw_fused_share(Job* j, const data_t* x, Py_ssize_t c0, Py_ssize_t c1,
                                  Py_ssize_t nq, double* part,
                                  const double* cf) noexcept nogil:
    """Channels [c0, c1) of nchw_eval_fused, one sample at a time."""
    cdef Py_ssize_t nn, c, b0, b1, i, off
    cdef Py_ssize_t step = c1 - c0                 # streamed: the whole span
    if j.stream and j.S >= SPAN_MIN:
        # each run's dx right after its sums, streamed (fbn_span_ag)
        for nn in range(j.N):
            off = (nn * j.C + c0) * j.S
            i = 0
            for c in range(c0, c1):
                nchw_reduce_run(j, x, nn, c, 0, j.S, (nn * j.S) // CHUNK, True, j.mean[c],
                                &part[16 * c * nq])
                i = span_ag(<const data_t*>j.dy + off, <data_t*>j.y + off, i, j.S, c - c0,
                            c1 - c0, cf + 4 * c0)
        fbn_sfence()
        return
    if not j.stream:
        step = cdiv(FUSED_BYTES, j.S * <Py_ssize_t>sizeof(data_t))
    for nn in range(j.N):
        b0 = c0
        while b0 < c1:
            b1 = b0 + step if b0 + step < c1 else c1
            for c in range(b0, b1):
                nchw_reduce_run(j, x, nn, c, 0, j.S, (nn * j.S) // CHUNK, True, j.mean[c],
                                &part[16 * c * nq])
            nchw_ew_runs(j, x, 2, nn * j.C + b0, nn * j.C + b1, cf)
            b0 = b1


cdef inline void nchw_staggered(Job* j, const data_t* x, Py_ssize_t tid, Py_ssize_t nt,
                                Py_ssize_t k, Py_ssize_t nq, bint train, bint fwd, bint grad,
                                int op, double* part, double* cf, double* tot, param_t* rm,
                                param_t* rv, const param_t* w, const param_t* b) noexcept nogil:
    """Thread tid's share of the channels, [C tid / nt, C (tid + 1) / nt), in
    blocks of k whose first is shortened by k tid / nt, so that the threads'
    read phases (statistics) and write phases (output) are staggered rather than
    in step: one thread's reads overlap another's writes.  Measured at 2 threads:
    training forward 4-15 % faster (32x64x56x56 1.45 -> 1.23 ms), backward up to
    11 %.  Blocks only set the traversal: the bits do not depend on them."""
    cdef Py_ssize_t lo = (j.C * tid) // nt, hi = (j.C * (tid + 1)) // nt
    cdef Py_ssize_t c0 = lo, c1 = lo + k - (k * tid) // nt
    while c0 < hi:
        if c1 > hi:
            c1 = hi
        nchw_block(j, x, c0, c1, nq, train, fwd, grad, op, part, cf, tot, rm, rv, w, b)
        c0 = c1
        c1 = c0 + k


cdef inline void nchw_block(Job* j, const data_t* x, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t nq, bint train, bint fwd, bint grad, int op,
                            double* part, double* cf, double* tot, param_t* rm, param_t* rv,
                            const param_t* w, const param_t* b) noexcept nogil:
    """Channels [c0, c1): reduce, coefficients, element-wise (while in cache,
    unless the block is all of a thread's channels: see TWO_PASS_RUN)."""
    cdef Py_ssize_t N = j.N, S = j.S, c, nn, n0, n1
    cdef Py_ssize_t ns = STREAMS // 2 if grad else STREAMS     # samples at a time
    cdef Py_ssize_t qs[STREAMS]                                 # their first chunks
    cdef double shift
    if c1 > j.C:
        c1 = j.C
    for c in range(16 * c0 * nq, 16 * c1 * nq):
        part[c] = 0.0
    n0 = 0
    while n0 < N:
        n1 = n0 + ns if n0 + ns < N else N
        for nn in range(n0, n1):
            qs[nn - n0] = (nn * S) // CHUNK
        for c in range(c0, c1):
            shift = j.mean[c] if grad else shift_at(x, c * S)
            for nn in range(n0, n1):
                nchw_reduce_run(j, x, nn, c, 0, S, qs[nn - n0], grad, shift,
                                &part[16 * c * nq])
        n0 = n1
    nchw_coefs(j, x, c0, c1, nq, train, fwd, True, part, tot, cf, rm, rv, w, b)
    cdef bint down = ew_down(j, x, op)
    for nn in range(N):
        n0 = N - 1 - nn if down else nn
        nchw_ew_runs(j, x, op, n0 * j.C + c0, n0 * j.C + c1, cf)


cdef inline void nchw_reduce_task(Job* j, const data_t* x, Py_ssize_t t, Py_ssize_t nq,
                                  bint grad, double* part) noexcept nogil:
    """Reduction task t: chunk t % nq of channel t // nq."""
    cdef Py_ssize_t c = t // nq
    cdef double shift = j.mean[c] if grad else shift_at(x, c * j.S)
    nchw_reduce_chunk(j, x, c, t - c * nq, grad, shift, &part[16 * c * nq])


cdef inline void nchw_ew_share(Job* j, const data_t* x, int op, Py_ssize_t tid, Py_ssize_t nt,
                               Py_ssize_t nr, Py_ssize_t rpt, bint reduce,
                               const double* cf) noexcept nogil:
    """Thread tid's share of the nr element-wise tasks of rpt runs; last first
    after a reduction (see nhwc_run) and where the spans walk down (ew_down)."""
    cdef Py_ssize_t u, t, r1
    cdef bint down = reduce or ew_down(j, x, op)
    for u in range((tid * nr) // nt, ((tid + 1) * nr) // nt):
        t = ((tid + 1) * nr) // nt - 1 - (u - (tid * nr) // nt) if down else u
        r1 = (t + 1) * rpt
        if r1 > j.N * j.C:
            r1 = j.N * j.C
        nchw_ew_runs(j, x, op, t * rpt, r1, cf)


# ----------------------------------------------------------------------------
# channels-last (M, C)
#
# Rows are cut in chunks of R rows (R depends only on C).  A chunk's partial of
# channel c is the sum down the column in row order, computed by one SIMD lane
# whatever the tiling.  Large tensors: each thread takes blocks of channels,
# reduces all rows of the block, then normalises the block while it is still
# in cache.  Otherwise: (row chunk, channel tile) reduction tasks, then an
# element-wise pass over blocks of rows.

cdef int nhwc_run(Job* j, const data_t* x, param_t* p) noexcept nogil:
    cdef Py_ssize_t M = j.N, C = j.C
    cdef Py_ssize_t R = cdiv(NHWC_CHUNK, C)
    cdef Py_ssize_t nq, ntile, ctask, c, t, rb, nr, tid
    cdef bint fwd = j.op != BWD_NHWC
    cdef bint train = j.op == FWD_TRAIN_NHWC
    cdef bint grad = not fwd
    cdef bint reduce = train or (grad and (j.training or j.dweight != NULL or j.dbias != NULL))
    cdef int op = 0 if fwd else (1 if j.training else 2)
    cdef int nt
    cdef double s1, s2
    cdef const data_t* g = NULL if fwd else <const data_t*>j.dy
    cdef param_t* rm = <param_t*>j.running_mean
    cdef param_t* rv = <param_t*>j.running_var
    cdef const param_t* w = <const param_t*>j.weight
    cdef const param_t* b = <const param_t*>j.bias
    if R < MIN_ROWS:
        R = MIN_ROWS
    if R > MAX_ROWS:
        R = MAX_ROWS
    nq = cdiv(M, R)
    # scratch: per chunk q the rows ps = part[2qC:], pq = part[(2q+1)C:];
    # float64 coefficients (mean, a, b, k) per channel, the reduction shift,
    # the merged sums and the math-type columns of the element-wise pass (hi,
    # a, bf, each C + FBN_COLPAD long: at most that many doubles each).
    # Streamed training dx: its float64 columns, padded as cols (dcols).
    # cols starts up to 4 KiB + 64 bytes in (see col_phase).
    cdef double* part = <double*>malloc(
        <size_t>((2 * nq + 14) * C + 7 * FBN_COLPAD + 8 + COL_SLACK) * sizeof(double))
    cdef double* cf = part + 2 * nq * C
    cdef double* shift = cf + 4 * C
    cdef double* tot = cf + 5 * C           # merged sums: tot[0:C], tot[C:2C]
    cdef double* dcols = cf + 7 * C
    cdef void* cols
    if part == NULL:
        return -1
    cols = col_phase(x, dcols + 4 * (C + FBN_COLPAD), j.y, C)
    if reduce:
        for c in range(C):
            shift[c] = j.mean[c] if grad else shift_at(x, c)
    # Fewer row chunks than threads (short, wide tensors), in cache, with
    # TILED_SPAN bytes of each row a thread: each thread takes whole channel
    # tiles through every phase (nhwc_tiled); in eval mode, whose one pass
    # would run on one thread here, and in training.  Training at 64 rows (one
    # chunk) measured 1.08-1.15x slower tiled in CPU session 11; in session 20,
    # 2 threads, time tiled / two passes, rotated and best of 15: float32
    # (64, 2048) / (64, 4096) / (64, 8192) / (64, 16384) training forward
    # 0.84-0.90, backward 0.87-1.01; float64 training forward 0.84-0.88,
    # backward 0.96-0.98; float16 (64, 4096-8192) backward 0.65, training forward
    # 0.89.  From memory (cold) float32 took 1.01-1.05x.  One thread: training
    # work of one row chunk from TILED_ONE_BYTES.
    cdef bint one_tiled = (j.n_threads == 1 and nq == 1 and op != 2
                           and M * C * <Py_ssize_t>sizeof(data_t) >= TILED_ONE_BYTES)
    if (reduce and not j.stream and ((j.n_threads > 1 and nq < j.n_threads) or one_tiled)
            and C * <Py_ssize_t>sizeof(data_t) >= TILED_SPAN * j.n_threads
            and team(cdiv(C, CTASK), M * C, j.n_threads) == j.n_threads):
        nhwc_tiled(j, x, g, op, train, fwd, nq, R, shift, part, cf, tot, cols, rm, rv, w, b)
        free(part)
        return 0
    # Eval mode with dweight / dbias: one pass over row chunks (nhwc_eval_fused)
    # with enough of them to go round the threads (else the two passes below,
    # which share channel tiles too: (64, 4096) at 2 threads took 1.9x,
    # (256, 1024) 1.3x their time in one pass).
    cdef bint fused = op == 2 and reduce and (nq >= 4 * j.n_threads
                                              or team(nq, M * C, j.n_threads) == 1)
    if reduce and not fused:
        # Whole rows per task when there are enough row chunks to share out
        # (a row is then read as one stream); otherwise tiles of channels too.
        ctask = C if nq >= 4 * j.n_threads else CTASK
        ntile = cdiv(C, ctask)
        nt = team(nq * ntile, M * C, j.n_threads)
        if nt == 1:          # no OpenMP region: see nchw_run
            for t in range(nq * ntile):
                nhwc_reduce_task(j, x, g, t, ntile, ctask, R, shift, part)
        else:
            for t in prange(nq * ntile, schedule='static', num_threads=nt):
                nhwc_reduce_task(j, x, g, t, ntile, ctask, R, shift, part)
    if reduce and not fused:
        nhwc_merge(part, nq, C, 0, C, tot, tot + C)
    nhwc_coefs(j, x, train, fwd, reduce and not fused, tot, shift, rm, rv, w, b, cf,
               cols if op != 1 else NULL)     # the training dx takes cf and dcols
    if op == 1:
        fold_dx_cols(x, j, cf, dcols, C)
    if fused:
        nhwc_eval_fused(j, x, g, nq, R, shift, part, cf, tot, cols, w)
        free(part)
        return 0
    nr = cdiv(M * C * <Py_ssize_t>sizeof(data_t), NHWC_EW_BYTES)
    nr = cdiv(nr, j.n_threads) * j.n_threads      # as many blocks per thread
    rb = cdiv(M, nr)
    nr = cdiv(M, rb)
    nt = team(nr, M * C, j.n_threads)
    if nt == 1:
        nhwc_ew_share(j, x, g, op, 0, 1, nr, rb, reduce, cols, cf, dcols)
    else:
        for tid in prange(nt, schedule='static', chunksize=1, num_threads=nt):
            nhwc_ew_share(j, x, g, op, tid, nt, nr, rb, reduce, cols, cf, dcols)
    free(part)
    return 0


cdef void nhwc_tiled(Job* j, const data_t* x, const data_t* g, int op, bint train, bint fwd,
                     Py_ssize_t nq, Py_ssize_t R, const double* shift, double* part,
                     double* cf, double* tot, void* cols, param_t* rm, param_t* rv,
                     const param_t* w, const param_t* b) noexcept nogil:
    """Every phase of a reduction call by channel tiles of CTASK, the threads
    sharing the tiles: a tile's sums over all row chunks, their merge, its
    coefficients, then its element-wise op while its rows are in cache.  For
    short, wide tensors, whose few row chunks cannot go round the threads:
    there the two passes share the channels out for the sums but the rows for
    the element-wise op (half of each thread's second pass reads what the
    other core cached), and the eval-mode one pass runs on one thread.  The
    same sums, merges and coefficients per channel as the other paths: the
    same bits."""
    cdef Py_ssize_t ntile = cdiv(j.C, CTASK), t
    cdef int nt = team(ntile, j.N * j.C, j.n_threads)
    if nt == 1:
        for t in range(ntile):
            nhwc_tile(j, x, g, op, train, fwd, nq, R, t * CTASK, shift, part, cf, tot, cols,
                      rm, rv, w, b)
    else:
        for t in prange(ntile, schedule='static', num_threads=nt):
            nhwc_tile(j, x, g, op, train, fwd, nq, R, t * CTASK, shift, part, cf, tot, cols,
                      rm, rv, w, b)


cdef inline void nhwc_tile(Job* j, const data_t* x, const data_t* g, int op, bint train,
                           bint fwd, Py_ssize_t nq, Py_ssize_t R, Py_ssize_t c0,
                           const double* shift, double* part, double* cf, double* tot,
                           void* cols, param_t* rm, param_t* rv, const param_t* w,
                           const param_t* b) noexcept nogil:
    """Channels [c0, c0 + CTASK) of nhwc_tiled."""
    cdef Py_ssize_t C = j.C, q, r1
    cdef Py_ssize_t c1 = c0 + CTASK if c0 + CTASK < C else C
    for q in range(nq):
        r1 = (q + 1) * R if (q + 1) * R < j.N else j.N
        tile_sums(x, g, C, q * R, r1, c0, c1, shift, &part[2 * q * C], &part[(2 * q + 1) * C])
    nhwc_merge(part, nq, C, c0, c1, tot, tot + C)
    nhwc_coefs_range(j, x, train, fwd, True, tot, shift, rm, rv, w, b, cf,
                     cols if op != 1 else NULL, c0, c1)
    if op == 1:
        fold_dx_range(x, cf, C, c0, c1)
    tile_ew(op, x, g, <data_t*>j.y, C, 0, j.N, c0, c1, cols, cf, j.cached)


cdef void nhwc_eval_fused(Job* j, const data_t* x, const data_t* g, Py_ssize_t nq,
                          Py_ssize_t R, const double* shift, double* part, const double* cf,
                          double* tot, const void* cols, const param_t* w) noexcept nogil:
    """Eval-mode backward with dweight / dbias: dx = a dy needs no sums, so
    each chunk of rows is reduced and its dx written while the chunk is in
    cache, one pass over memory instead of two (see nchw_eval_fused); when dx
    is streamed and rows are whole lines, the sums and dx of a chunk share one
    loop (fbn_evf).  The chunks' partials are the two-pass ones: the same bits.
    cols and cf hold the coefficients."""
    cdef Py_ssize_t C = j.C, c, q
    cdef int nt = team(nq, j.N * C, j.n_threads)
    if nt == 1:
        for q in range(nq):
            nhwc_fused_chunk(j, x, g, q, R, shift, part, cols, cf)
    else:
        for q in prange(nq, schedule='static', num_threads=nt):
            nhwc_fused_chunk(j, x, g, q, R, shift, part, cols, cf)
    nhwc_merge(part, nq, C, 0, C, tot, tot + C)
    for c in range(C):
        grad_outputs(j, c, tot[c], tot[C + c], w)


cdef inline void nhwc_fused_chunk(Job* j, const data_t* x, const data_t* g, Py_ssize_t q,
                                  Py_ssize_t R, const double* shift, double* part,
                                  const void* cols, const double* cf) noexcept nogil:
    """Rows [q R, (q + 1) R) of nhwc_eval_fused: their gradient sums and dx in
    one loop (fbn_evf) where it applies, streamed or, when x, dy and dx
    together reach a quarter of FASTBN_STREAM_BYTES, with ordinary stores;
    else the sums, then dx.  From 16 MiB (A/B, float32, 5.3-8 MB: 0.72-0.92
    of the two phases' time at 1 thread, 0.79-0.95 at 2, but for 64
    channels, 1.01-1.04, whose two phases keep their sums in registers).
    From 4 MiB: an A/B of back-to-back calls had read 1.06-1.18x slower at
    4 MB, but one of single calls after other work (tools/ab.py --method
    cold, as the bench times them) read 0.72-0.93 at 1.6-4 MB, back-to-back
    0.88-1.04 (4 KiB rows at 1 thread: 1.10-1.13), and bench rows under
    torch went over it (16x256x14x14: 0.75-1.00x -> 1.11-1.18x)."""
    cdef Py_ssize_t C = j.C, r0 = q * R, r1 = (q + 1) * R
    if r1 > j.N:
        r1 = j.N
    if ((j.stream or 3 * j.N * C * <Py_ssize_t>sizeof(data_t) >= stream_bytes // 4)
            and evf(x, g, <data_t*>j.y, C, r0, r1, shift, &part[2 * q * C],
                    &part[(2 * q + 1) * C], cols, j.stream)):
        if j.stream:
            fbn_sfence()
        return
    tile_sums(x, g, C, r0, r1, 0, C, shift, &part[2 * q * C], &part[(2 * q + 1) * C])
    nhwc_ew_rows(j, x, g, 2, r0, r1, False, cols, cf, <const double*>NULL, False)
    if j.stream:
        fbn_sfence()


cdef inline int evf(const data_t* x, const data_t* g, data_t* y, Py_ssize_t C, Py_ssize_t r0,
                    Py_ssize_t r1, const double* shift, double* ps, double* pq,
                    const void* cols, bint nt) noexcept nogil:
    """Rows [r0, r1) of the eval-mode backward in one loop (fbn_evf), dx
    streamed (nt) or not: 1 where it applies, else 0 with nothing done."""
    if data_t is float:
        return fbn_evf_f32(x, g, y, C, r0, r1, shift, ps, pq, <const float*>cols, nt)
    elif data_t is double:
        return fbn_evf_f64(x, g, y, C, r0, r1, shift, ps, pq, <const double*>cols, nt)
    else:
        return fbn_evf_f16(x, g, y, C, r0, r1, shift, ps, pq, <const float*>cols, nt)


cdef void nhwc_coefs(Job* j, const data_t* x, bint train, bint fwd, bint summed,
                     const double* tot, const double* shift, param_t* rm, param_t* rv,
                     const param_t* w, const param_t* b, double* cf,
                     void* cols) noexcept nogil:
    """Every channel's coefficients (cf) and element-wise columns (cols,
    unless NULL), from the merged sums tot
    when summed (else none: inference, or the eval-mode backward, whose
    dweight / dbias nhwc_eval_fused writes after).
    Channels are independent: with PAR_CHANNELS or more the threads share
    them (see there)."""
    cdef Py_ssize_t C = j.C
    cdef int nt = j.n_threads if C >= PAR_CHANNELS else 1
    cdef int tid
    if nt == 1:
        nhwc_coefs_range(j, x, train, fwd, summed, tot, shift, rm, rv, w, b, cf, cols, 0, C)
    else:
        for tid in prange(nt, schedule='static', chunksize=1, num_threads=nt):
            nhwc_coefs_range(j, x, train, fwd, summed, tot, shift, rm, rv, w, b, cf, cols,
                             (C * tid) // nt, (C * (tid + 1)) // nt)
    if cols != NULL:
        pad_cols(x, cols, C)


cdef inline void nhwc_coefs_range(Job* j, const data_t* x, bint train, bint fwd, bint summed,
                                  const double* tot, const double* shift, param_t* rm,
                                  param_t* rv, const param_t* w, const param_t* b, double* cf,
                                  void* cols, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t C = j.C, c
    coefs_range(j, c0, c1, train, fwd, tot if summed else NULL, tot + C, shift, j.N,
                rm, rv, w, b, cf, cf + C, cf + 2 * C, cf + 3 * C, 1, data_t is float)
    if cols != NULL:
        put_cols(x, cols, cf, C, c0, c1)


cdef inline void nhwc_reduce_task(Job* j, const data_t* x, const data_t* g, Py_ssize_t t,
                                  Py_ssize_t ntile, Py_ssize_t ctask, Py_ssize_t R,
                                  const double* shift, double* part) noexcept nogil:
    """Reduction task t: channel tile t % ntile of row chunk t // ntile."""
    cdef Py_ssize_t C = j.C, q = t // ntile
    cdef Py_ssize_t c0 = (t - q * ntile) * ctask
    cdef Py_ssize_t c1 = c0 + ctask, r1 = (q + 1) * R
    if c1 > C:
        c1 = C
    if r1 > j.N:
        r1 = j.N
    tile_sums(x, g, C, q * R, r1, c0, c1, shift, &part[2 * q * C], &part[(2 * q + 1) * C])


cdef inline void nhwc_ew_share(Job* j, const data_t* x, const data_t* g, int op,
                               Py_ssize_t tid, Py_ssize_t nt, Py_ssize_t nr, Py_ssize_t rb,
                               bint reduce, const void* cols, const double* cf,
                               const double* dcols) noexcept nogil:
    """Thread tid's share of the nr blocks of rb rows; after a reduction last
    first: it just read them in order, so the most recent ones are in cache."""
    cdef Py_ssize_t u, t, r1
    for u in range((tid * nr) // nt, ((tid + 1) * nr) // nt):
        t = ((tid + 1) * nr) // nt - 1 - (u - (tid * nr) // nt) if reduce else u
        r1 = (t + 1) * rb
        if r1 > j.N:
            r1 = j.N
        nhwc_ew_rows(j, x, g, op, t * rb, r1, reduce, cols, cf, dcols, nt == 1)
    if j.stream:
        fbn_sfence()


cdef inline void nhwc_ew_rows(Job* j, const data_t* x, const data_t* g, int op, Py_ssize_t r0,
                              Py_ssize_t r1, bint trained, const void* cols, const double* cf,
                              const double* dcols, bint alone) noexcept nogil:
    """The element-wise op on rows [r0, r1): streamed (see Job.stream) by the
    forward's writer (op 2, a dy, as y = (dy - 0) a + b: see coefs_range) or
    the training dx's; else the float16 dx line kernel or the tile pass."""
    cdef Py_ssize_t o = r0 * j.C
    if op != 1 and j.stream:
        cl_nt((x if op == 0 else g) + o, <data_t*>j.y + o, r1 - r0, j.C, cols, trained, alone)
    elif op == 1 and j.stream:
        cl_dx_nt(x + o, g + o, <data_t*>j.y + o, (r1 - r0) * j.C, j.C, dcols)
    elif op == 1 and data_t is half_t and (j.C <= 1024 or not j.cached):
        cl_dx_cached(x + o, g + o, <data_t*>j.y + o, (r1 - r0) * j.C, j.C, dcols)
    else:
        tile_ew(op, x, g, <data_t*>j.y, j.C, r0, r1, 0, j.C, cols, cf, j.cached)


cdef inline void* col_phase(const data_t* x, double* p, const void* y,
                            Py_ssize_t C) noexcept nogil:
    """Where in [p, p + COL_SLACK doubles) the columns of the forward
    element-wise pass start.  The coefficients of its aligned vectors of y are
    aligned too: the channel of y's first 64-byte boundary lands on one (and so
    do those of all of them when a vector divides C).  No split loads: 2-4 %
    off the channels-last inference of 256x256x14x14 float32 (A/B, 1 thread).
    And where a column advances as y does (float32, float64), its loads stay
    about half of g = gcd(row bytes, 4 KiB) from y's stores modulo 4 KiB
    (g >= 128): the row offsets of y against a column are a multiple of g
    apart, and a load that matches a recent streaming store in address bits
    0-11 waits for it (see fbn_walk_down).  Placed at random, the columns of
    (4096, 1024) float32 inference cost up to 1.4x at some placements."""
    cdef size_t sz = sizeof(double) if data_t is double else sizeof(float)
    cdef size_t yl = (<size_t>y + 63) & ~(<size_t>63)          # y's first line
    cdef size_t e = (yl - <size_t>y) // sizeof(data_t) % <size_t>C
    cdef size_t lo = <size_t>p + e * sz                      # channel e's least place
    cdef size_t g = <size_t>fbn_gcd(4096, C * <Py_ssize_t>sizeof(data_t))
    cdef size_t t
    if sz != sizeof(data_t) or g < 128:
        return <void*>(((lo + 63) & ~(<size_t>63)) - e * sz)
    # channel e at y's line less half of g and the padding (the three
    # columns, FBN_COLPAD elements apart modulo g, then straddle g / 2)
    t = yl - g // 2 - FBN_COLPAD * sz
    return <void*>(lo + ((t - lo) & (g - 1)) - e * sz)


cdef inline void put_cols(const data_t* x, void* cols, const double* cf, Py_ssize_t C,
                          Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels [c0, c1)'s float64 coefficients (mean, a, b columns of cf) into the
    math-type columns (hi, a, bf) of the element-wise pass: y = (x - hi) a + bf
    with hi the mean rounded and bf = b - (mean - hi) a (fbn_put_cols, fbn_fold);
    float64 math takes the mean and bias as they are."""
    if data_t is double:
        fbn_put_cols_f64(cf, <double*>cols, C, c0, c1)
    else:
        fbn_put_cols_s16(cf, <float*>cols, C, c0, c1)


cdef inline void fold_dx_range(const data_t* x, double* cf, Py_ssize_t C, Py_ssize_t c0,
                               Py_ssize_t c1) noexcept nogil:
    """Channels [c0, c1) of cf's mean and k columns as fbn_xfold gives them for
    the data type (see fold_dx_cols): float16 only; float32 takes them as
    coefs_range left them (folded where the mean is near zero), float64 as
    they are."""
    cdef Py_ssize_t c
    if data_t is half_t:
        for c in range(c0, c1):
            fbn_xfold_f16(&cf[c], &cf[3 * C + c], cf[2 * C + c])


cdef inline void fold_dx_cols(const data_t* x, Job* j, double* cf, double* dcols,
                              Py_ssize_t C) noexcept nogil:
    """Training dx columns (mean, a, b, k of cf) as fbn_tew op 1 wants them:
    mean and k as fbn_xfold gives them for the data type (float16: the mean
    rounded to float and k with the rest; float32 as coefs_range folded them,
    float64 as they are),
    as fbn_dx8 does; and, for the streamed dx (fbn_cl_dx_nt) and every
    float16 dx (fbn_cl_dx_line*), their padded copy dcols (stride C +
    FBN_COLPAD; float32 for float16 data)."""
    cdef Py_ssize_t L = C + FBN_COLPAD, i, k
    fold_dx_range(x, cf, C, 0, C)
    if j.stream or data_t is half_t:
        for k in range(4):
            for i in range(L):
                if data_t is half_t:
                    (<float*>dcols)[k * L + i] = <float>cf[k * C + i % C]
                else:
                    dcols[k * L + i] = cf[k * C + i % C]


cdef inline void pad_cols(const data_t* x, void* cols, Py_ssize_t C) noexcept nogil:
    """The padding of each column: entry C + i repeats entry i mod C."""
    cdef Py_ssize_t L = C + FBN_COLPAD, k, i
    for k in range(3):
        for i in range(C, L):
            if data_t is double:
                (<double*>cols)[k * L + i] = (<double*>cols)[k * L + i % C]
            else:
                (<float*>cols)[k * L + i] = (<float*>cols)[k * L + i % C]


cdef inline void nhwc_merge(const double* part, Py_ssize_t nq, Py_ssize_t C, Py_ssize_t c0,
                            Py_ssize_t c1, double* s1, double* s2) noexcept nogil:
    """s1[c], s2[c] = channel c's chunk partials summed in chunk order, for
    c in [c0, c1); row by row, so the partials are read in memory order."""
    cdef Py_ssize_t q, c
    for c in range(c0, c1):
        s1[c] = 0.0
        s2[c] = 0.0
    for q in range(nq):
        for c in range(c0, c1):
            s1[c] += part[2 * q * C + c]
            s2[c] += part[(2 * q + 1) * C + c]


# ----------------------------------------------------------------------------
# dispatch: one place turns (dtype of x, dtype of parameters) into a
# specialisation; the op switch is written once, inside it.

cdef int run_typed(Job* j, const data_t* x, param_t* p) noexcept nogil:
    if j.op == FWD_TRAIN_NCHW or j.op == FWD_INFER_NCHW or j.op == BWD_NCHW:
        return nchw_run(j, x, p)
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


cdef Py_ssize_t stream_bytes = FASTBN_STREAM_BYTES


def _set_stream_bytes(Py_ssize_t nbytes):
    """Set the output size from which stores stream; returns the old one.
    For the tests, which check that both kinds of store give the same bits."""
    global stream_bytes
    old = stream_bytes
    stream_bytes = nbytes
    return old


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
                    double eps, bint training, int n_threads, Py_ssize_t N=-1,
                    Py_ssize_t C=0, Py_ssize_t S=0, object mean_lo=None):
    """Run one kernel; (N, C, S) given for arrays that are not kernel views
    (the plain lanes), else read from x's shape.  mean_lo: float64 (C,) or
    None, written by the training forward, read by the training backward
    (MEAN_LO); ignored by the other ops."""
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
    if N < 0:               # dims from the kernel view: (N, C, S) or (M, C)
        N = x.shape[0]
        C = x.shape[1]
        S = x.shape[2] if cnp.PyArray_NDIM(x) == 3 else 1
    j.N = N
    j.C = C
    j.S = S
    j.x = cnp.PyArray_DATA(x)
    j.y = cnp.PyArray_DATA(y)
    j.dy = data_or_null(dy)
    j.weight = data_or_null(weight)
    j.bias = data_or_null(bias)
    j.mean = <double*>cnp.PyArray_DATA(mean)
    j.invstd = <double*>cnp.PyArray_DATA(invstd)
    j.mean_lo = NULL
    if mean_lo is not None and (op == FWD_TRAIN_NCHW or op == FWD_TRAIN_NHWC
                                or ((op == BWD_NCHW or op == BWD_NHWC) and training)):
        j.mean_lo = <double*>cnp.PyArray_DATA(<cnp.ndarray>mean_lo)
    j.running_mean = data_or_null(running_mean)
    j.running_var = data_or_null(running_var)
    j.dweight = data_or_null(dweight)
    j.dbias = data_or_null(dbias)
    j.factor = factor
    j.eps = eps
    j.training = training
    j.n_threads = n_threads if n_threads > 0 else 1
    # Outputs of FASTBN_STREAM_BYTES or more are written with streaming stores
    # where the kernels can (forward element-wise, channels-first): such a y
    # leaves the cache anyway, and a line written without being read first
    # saves a third of the pass's memory traffic (measured: training forward
    # 256x256x14x14 float32 6.2 -> 5.3 ms on one core; a 6 MiB y was 13%
    # slower streamed).  Smaller outputs stay in cache for their next reader.
    # The channels-last forward streams from half that, where x and y together
    # outgrow the cache share: its ordinary-store pass (fbn_tew) is the slower
    # one from memory (12 MiB y, one thread: inference 0.85 -> 0.51 ms float32
    # and 1.83 -> 0.89 ms float16 with 2048 channels, training 10-30 % faster).
    # Channels-first gained less at one thread and lost at two (inference
    # 0.42 -> 0.49 ms), float16 up to 25 %; the training backward was mixed in
    # both layouts.  The channels-last eval-mode backward streams from half too
    # (x, dy and dx outgrow the cache; A/B, float32 eval-mode backward with
    # dweight, 8-12.8 MB: 0.76-0.86 of the time at 1 thread, 0.84-1.00 at 2).
    nb = cnp.PyArray_NBYTES(y)
    j.stream = nb >= (stream_bytes // 2 if op == FWD_TRAIN_NHWC or op == FWD_INFER_NHWC
                      or (op == BWD_NHWC and not training) else stream_bytes)
    # The streaming writers store whole aligned vectors from an element-aligned
    # head: an output off the element grid (numpy allows one, aligned=False)
    # takes ordinary stores (a streaming store there faults).
    if <size_t>cnp.PyArray_DATA(y) % <size_t>cnp.PyArray_ITEMSIZE(y):
        j.stream = False
    # Calls that touch less than 3/4 of FASTBN_STREAM_BYTES (x, y and dy together) are taken
    # to run in cache (the caller just wrote x).  Only float16 looks at it now: its
    # channels-last forward and eval-mode dx rows of at most 256 B or of 4 KiB and more
    # then go four at a time (fbn_tew), and its training dx picks its loop (nhwc_ew_rows).
    # Rows in between, which every dtype used to take four at a time in cache and one
    # from memory, now take four from four parts of the block either way (fbn_rparts).
    j.cached = nb * (2 if dy is None else 3) < stream_bytes - stream_bytes // 4
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
#
# MEAN_LO: the training forward can also write mean_lo, float64 (C,), what
# rounding the batch mean to float64 lost (mean = shift + sum / n, rounded to
# ulp(mean); mean_lo is that rounding's error, by TwoSum).  The forward's y
# then takes x - mean about mean + mean_lo (its constant less a mean_lo), and
# so does the training backward: its gradient sum sum(dy (x - mean)) less
# mean_lo sum(dy), and dx's constant less b mean_lo.
# Without it, data far from zero with a small spread lose |mean| 2^-53 in
# every x - mean, which the training dx's cancellation amplifies: float32
# values near -1e4, one ulp apart (5 a channel, eps 1e-12, no weight) gave dx
# 2.0x the float32 tolerance off (the hypothesis 'thorough' profile found
# it), where the mean's rounding error was 9e-13 against a spread of 4e-4.
MEAN_LO = True


def forward_train_nchw(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double factor, double eps, int n_threads, mean_lo=None):
    """Training forward.  IN x, weight, bias; OUT y, mean, invstd (batch
    statistics), mean_lo (MEAN_LO; or None); INOUT running_mean,
    running_var, updated with r <- (1 - factor) r + factor * stat (unbiased
    variance)."""
    execute(FWD_TRAIN_NCHW, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, factor, eps, True, n_threads, -1, 0, 0, mean_lo)


def forward_train_nhwc(x, y, weight, bias, mean, invstd, running_mean, running_var,
                       double factor, double eps, int n_threads, mean_lo=None):
    """Channels-last twin of forward_train_nchw."""
    execute(FWD_TRAIN_NHWC, x, y, None, weight, bias, mean, invstd, running_mean,
            running_var, None, None, factor, eps, True, n_threads, -1, 0, 0, mean_lo)


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
                  int n_threads, mean_lo=None):
    """Backward.  IN x, dy, mean, invstd, mean_lo (from the forward; mean_lo
    may be None), weight; OUT dx, dweight, dbias (either may be None).
    training: through the batch statistics; otherwise the statistics were
    constants (eval mode)."""
    execute(BWD_NCHW, x, dx, dy, weight, None, mean, invstd, None, None, dweight,
            dbias, 0.0, 0.0, training, n_threads, -1, 0, 0, mean_lo)


def backward_nhwc(x, dy, dx, mean, invstd, weight, dweight, dbias, bint training,
                  int n_threads, mean_lo=None):
    """Channels-last twin of backward_nchw."""
    execute(BWD_NHWC, x, dx, dy, weight, None, mean, invstd, None, None, dweight,
            dbias, 0.0, 0.0, training, n_threads, -1, 0, 0, mean_lo)


# ----------------------------------------------------------------------------
# Plain lanes: the whole call for the common case of plain numpy arrays.
#
# _api.forward / _api.backward offer a call to these first.  They only accept:
# exact numpy arrays, C-contiguous, aligned, native byte order, of the kernel
# dtypes; parameters already in the parameter dtype; out= of x's shape and
# dtype, writable, not overlapping x (or x itself for in-place inference).
# For anything else they return None without having touched anything, and
# _api's general path takes the call (and raises the errors, naming the
# argument).  The checks here are pointer and flag reads: a few hundred
# nanoseconds of numpy attribute look-ups saved per argument.

cdef object _ndarray = numpy.ndarray


cdef inline bint plain_array(object a) noexcept:
    """An exact, C-contiguous, aligned, native-order numpy array."""
    cdef cnp.ndarray v
    if type(a) is not _ndarray:
        return False
    v = <cnp.ndarray>a
    return (cnp.PyArray_IS_C_CONTIGUOUS(v) and cnp.PyArray_ISALIGNED(v)
            and cnp.PyArray_ISNOTSWAPPED(v))


cdef inline bint plain_vector(object a, int typenum, Py_ssize_t C) noexcept:
    """None, or a plain (C,) array of typenum."""
    if a is None:
        return True
    return (plain_array(a) and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>a, 0) == C and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum)


cdef inline int same_array_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b) or cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef inline object plain_out(object out, cnp.ndarray xa):
    """A plain lane's output: a new array like xa when out is None, out itself
    when it is a writeable plain array of xa's shape and dtype, else None (the
    lane declines)."""
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa),
                                 cnp.PyArray_TYPE(xa), 0)
    if (plain_array(out) and same_array_shape(xa, <cnp.ndarray>out)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)):
        return out
    return None


cdef inline int overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Two C-contiguous arrays of one size: 0 disjoint, 1 the same memory,
    2 partly overlapping."""
    cdef char* p = <char*>cnp.PyArray_DATA(a)
    cdef char* q = <char*>cnp.PyArray_DATA(b)
    cdef Py_ssize_t n = cnp.PyArray_NBYTES(a)
    if p == q:
        return 1
    if p + n <= q or q + n <= p:
        return 0
    return 2


cdef inline int param_typenum(int typenum) noexcept:
    return cnp.NPY_FLOAT64 if typenum == cnp.NPY_FLOAT64 else cnp.NPY_FLOAT32


def forward_plain(x, out, weight, bias, running_mean, running_var, double factor,
                  double eps, bint training, int axis, int n_threads):
    """A plain numpy forward (see above), or None.  Returns (y, mean, invstd,
    mean_lo (training; else None), nhwc, C, S, in_place).  The caller has checked eps, training, the
    RunningStats object and n_threads; running_mean / running_var are its
    buffers (or None)."""
    cdef cnp.ndarray xa, ya
    cdef object o
    cdef int nd, typenum, ov, ptype, op
    cdef Py_ssize_t C, S, E, d
    cdef bint nhwc, in_place = False
    cdef cnp.npy_intp cdim[1]
    if not plain_array(x):
        return None
    xa = <cnp.ndarray>x
    nd = cnp.PyArray_NDIM(xa)
    typenum = cnp.PyArray_TYPE(xa)
    if nd < 2 or nd > 5 or not (typenum == cnp.NPY_FLOAT32 or typenum == cnp.NPY_FLOAT64
                                or typenum == cnp.NPY_FLOAT16):
        return None
    E = cnp.PyArray_SIZE(xa)
    if axis == 1:
        C = cnp.PyArray_DIM(xa, 1)
        S = 1
        for d in range(2, nd):
            S *= cnp.PyArray_DIM(xa, d)
        nhwc = nd == 2 or S == 1
    elif axis == -1 or axis == nd - 1:
        C = cnp.PyArray_DIM(xa, nd - 1)
        S = (E // C // cnp.PyArray_DIM(xa, 0)) if C and cnp.PyArray_DIM(xa, 0) else 0
        nhwc = True
    else:
        return None
    if E == 0 or C == 0 or (training and E // C <= 1):
        return None
    ptype = param_typenum(typenum)
    if not (plain_vector(weight, ptype, C) and plain_vector(bias, ptype, C)
            and plain_vector(running_mean, ptype, C) and plain_vector(running_var, ptype, C)):
        return None
    if not training and running_mean is None:
        return None
    o = plain_out(out, xa)
    if o is None:
        return None
    ya = <cnp.ndarray>o
    if out is not None:
        ov = overlap(xa, ya)
        if ov == 2 or (ov == 1 and training):
            return None
        in_place = ov == 1
    cdim[0] = C
    mean = cnp.PyArray_EMPTY(1, cdim, cnp.NPY_FLOAT64, 0)
    invstd = cnp.PyArray_EMPTY(1, cdim, cnp.NPY_FLOAT64, 0)
    mean_lo = cnp.PyArray_EMPTY(1, cdim, cnp.NPY_FLOAT64, 0) if training else None
    if training:
        op = FWD_TRAIN_NHWC if nhwc else FWD_TRAIN_NCHW
    else:
        op = FWD_INFER_NHWC if nhwc else FWD_INFER_NCHW
    execute(op, xa, ya, None, weight, bias, mean, invstd, running_mean, running_var, None,
            None, factor, eps, training, n_threads,
            E // C if nhwc else cnp.PyArray_DIM(xa, 0), C, 1 if nhwc else S, mean_lo)
    return ya, mean, invstd, mean_lo, nhwc, C, S, in_place


def backward_plain(x, dy, out, mean, invstd, weight, bint nhwc, Py_ssize_t C, Py_ssize_t S,
                   bint training, bint want_dweight, bint want_dbias, int n_threads,
                   mean_lo=None):
    """A plain numpy backward, or None.  x is the forward's plain input (its
    context's), mean / invstd / mean_lo / weight its statistics and parameter.  Returns
    (dx, dweight, dbias), None where not wanted."""
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga, da
    cdef object o
    cdef int typenum = cnp.PyArray_TYPE(xa), ptype
    cdef cnp.npy_intp cdim[1]
    if not plain_array(dy):
        return None
    ga = <cnp.ndarray>dy
    if not same_array_shape(xa, ga):
        return None
    o = plain_out(out, xa)
    if o is None:
        return None
    da = <cnp.ndarray>o
    if out is not None:
        if overlap(da, xa) != 0 or overlap(da, ga) == 2:
            return None
    cdim[0] = C
    ptype = param_typenum(typenum)
    dweight = cnp.PyArray_EMPTY(1, cdim, ptype, 0) if want_dweight else None
    dbias = cnp.PyArray_EMPTY(1, cdim, ptype, 0) if want_dbias else None
    execute(BWD_NHWC if nhwc else BWD_NCHW, xa, da, ga, weight, None, mean, invstd, None,
            None, dweight, dbias, 0.0, 0.0, training, n_threads,
            cnp.PyArray_SIZE(xa) // C if nhwc else cnp.PyArray_DIM(xa, 0), C, 1 if nhwc else S,
            mean_lo)
    return da, dweight, dbias


def max_threads():
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl limits."""
    return omp_get_max_threads()


def openmp_enabled():
    """Whether this build was compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


cdef enum:
    BYTES_COPY = 0
    BYTES_READ = 1
    BYTES_FILL = 2


cdef unsigned long long byte_blocks(int kind, char* d, const char* s, Py_ssize_t nbytes,
                                    int n_threads, bint stream) noexcept nogil:
    """The memory floors, in 1 MiB blocks shared out over threads: copy s to d
    (memcpy or streaming stores), read s (returns an XOR of its words), or zero
    d (memset or streaming stores)."""
    cdef Py_ssize_t block = 1 << 20
    cdef Py_ssize_t i, o, length
    cdef unsigned long long acc = 0
    if n_threads < 1:
        n_threads = 1
    for i in prange((nbytes + block - 1) // block, schedule='static', num_threads=n_threads):
        o = i * block
        length = nbytes - o if nbytes - o < block else block
        if kind == BYTES_READ:
            acc ^= fbn_read_all(s + o, <size_t>length)
        elif kind == BYTES_COPY and not stream:
            memcpy(d + o, s + o, <size_t>length)
        elif kind == BYTES_COPY:
            fbn_stream_copy(d + o, s + o, <size_t>length)
        else:
            fbn_fill(d + o, <size_t>length, stream)
        if stream:
            fbn_copy_fence()
    return acc


def parallel_copy(cnp.ndarray src, cnp.ndarray dst, int n_threads, bint stream=False):
    """dst[...] = src for C-contiguous arrays of equal size, split over threads:
    the memory-bandwidth floor the benchmarks compare against.  stream: write
    dst's whole cache lines with streaming stores (no read for ownership) rather
    than with memcpy; the floor is the faster of the two."""
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(src)
    if cnp.PyArray_NBYTES(dst) != nbytes:
        raise ValueError("parallel_copy: src and dst differ in size")
    with nogil:
        byte_blocks(BYTES_COPY, <char*>cnp.PyArray_DATA(dst), <const char*>cnp.PyArray_DATA(src),
                    nbytes, n_threads, stream)


def parallel_read(cnp.ndarray src, int n_threads):
    """Read every byte of a C-contiguous array, split over threads (the read
    floor of tools/floors.py); returns an XOR of its words."""
    cdef unsigned long long acc
    with nogil:
        acc = byte_blocks(BYTES_READ, NULL, <const char*>cnp.PyArray_DATA(src),
                          cnp.PyArray_NBYTES(src), n_threads, False)
    return acc


def parallel_fill(cnp.ndarray dst, int n_threads, bint stream=False):
    """Fill a C-contiguous array with the byte 0x5a, split over threads, with
    streaming stores or memset (the write floor of tools/floors.py; not zeros,
    which this VM writes faster than any real output: see fbn_fill)."""
    with nogil:
        byte_blocks(BYTES_FILL, <char*>cnp.PyArray_DATA(dst), NULL, cnp.PyArray_NBYTES(dst),
                    n_threads, stream)
