/*
 * Element-wise training kernels for the CPU: counter-based dropout.
 *
 * Dropout here is a pure function of (seed, element index): element i is kept when
 *
 *     hash32(hash32(i XOR seed_a) XOR seed_b) >= threshold        threshold = round(p * 2^32)
 *
 * where hash32 is Chris Wellons' "lowbias32" integer mixer (two xor-shift-multiply rounds,
 * a bijection on 32-bit words with low avalanche bias). Nothing random is stored: the forward
 * pass and the backward pass regenerate the same keep-mask from the two seed words, so a
 * LoRA layer needs neither the mask nor the dropped-out copy of its input between the passes
 * (the memory torch.nn.Dropout keeps: a bool mask and a float copy per adapter).
 *
 * The reference is qlora/nn/dropout.py::keep_mask_reference (the same hash in PyTorch int64
 * arithmetic); tests compare the masks bit for bit.
 *
 * Index i is the element's offset in the flattened (contiguous) tensor, so i < 2^32 is
 * required (checked on the Python side): 4 G elements per call.
 *
 * Compiled once per target (AVX2 / baseline) and chosen at load time; the loop is plain C
 * that the compiler vectorizes (32-bit multiplies and shifts, a compare and a blend).
 *
 * And the backward of the training MLP's SwiGLU activation h = silu(g) * u, both gradients
 * in one pass over memory (qlora/nn/swiglu.py derives them; its torch formula is the
 * reference the tests compare against):
 *
 *     ∂u = ∂h · g σ(g)        ∂g = ∂h · u · σ(g) (1 + g (1 − σ(g)))
 *
 * σ through exp_approx.h (vectorizes; within ~1 ulp of expf), so the results equal torch's
 * to float32 rounding, not bit for bit.
 *
 * And the backward of RMSNorm with a frozen weight (qlora/nn/rms_norm.py derives it), one
 * visit per row: dot = Σ_j g_j w_j x_j, then ∂x_i = r w_i g_i − x_i r³ dot / d.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "exp_approx.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QLORA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QLORA_CLONES
#endif

/* Below this many elements a single thread is faster than waking the pool. */
static const int64_t PARALLEL_MIN_ELEMENTS = 1 << 16;

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/*
 * out[i] = (accumulate ? out[i] : 0) + (keep(i) ? in[i] * scale : 0)    for i in [0, n)
 *
 * Branch-free so that the compiler vectorizes it (8 hashes per AVX2 iteration): the keep test
 * becomes an all-ones / all-zeros bit mask ANDed into the scaled value. Each thread takes one
 * contiguous range.
 */
static inline float dropped_value(const float *in, int64_t i, uint32_t seed_a, uint32_t seed_b,
                                  uint32_t threshold, float scale) {
    uint32_t h = lowbias32(lowbias32((uint32_t)i ^ seed_a) ^ seed_b);
    uint32_t keep = 0u - (uint32_t)(h >= threshold);
    union { float f; uint32_t u; } v = {in[i] * scale};
    v.u &= keep;
    return v.f;
}

QLORA_CLONES
static void dropout_range(const float *in, float *out, int64_t start, int64_t end,
                          uint32_t seed_a, uint32_t seed_b, uint32_t threshold, float scale,
                          int accumulate) {
    if (accumulate) {
        for (int64_t i = start; i < end; i++)
            out[i] += dropped_value(in, i, seed_a, seed_b, threshold, scale);
    } else {
        for (int64_t i = start; i < end; i++)
            out[i] = dropped_value(in, i, seed_a, seed_b, threshold, scale);
    }
}

static void dropout_f32(const float *in, float *out, int64_t n, uint32_t seed_a, uint32_t seed_b,
                        uint32_t threshold, float scale, int accumulate, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t parts = 1, part = 0;
#ifdef _OPENMP
        parts = omp_get_num_threads();
        part = omp_get_thread_num();
#endif
        int64_t chunk = (n + parts - 1) / parts;
        int64_t start = part * chunk, end = start + chunk < n ? start + chunk : n;
        if (start < end)
            dropout_range(in, out, start, end, seed_a, seed_b, threshold, scale, accumulate);
    }
}

static PyObject *py_dropout(PyObject *self, PyObject *args) {
    unsigned long long in, out;
    long long n;
    unsigned int seed_a, seed_b, threshold;
    float scale;
    int accumulate, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLIIIfii", &in, &out, &n, &seed_a, &seed_b, &threshold, &scale,
                          &accumulate, &nthreads))
        return NULL;
    if (n < 0 || n > 0xffffffffLL) {
        PyErr_SetString(PyExc_ValueError, "dropout: need 0 <= n < 2^32 elements");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    dropout_f32((const float *)in, (float *)out, n, seed_a, seed_b, threshold, scale, accumulate,
                nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* Each thread's contiguous range [start, end) of n elements (one range when single-threaded). */
#ifdef _OPENMP
#define THREAD_RANGE(n, start, end)                                                             \
    int64_t parts_ = omp_get_num_threads(), part_ = omp_get_thread_num();                       \
    int64_t chunk_ = ((n) + parts_ - 1) / parts_;                                               \
    int64_t start = part_ * chunk_, end = start + chunk_ < (n) ? start + chunk_ : (n)
#else
#define THREAD_RANGE(n, start, end) int64_t start = 0, end = (n)
#endif

QLORA_CLONES
static void swiglu_backward_range(const float *restrict grad, const float *restrict gate,
                                  const float *restrict up, float *restrict grad_gate,
                                  float *restrict grad_up, int64_t start, int64_t end) {
    /* simd: exp_approx's clamps are selects, not branches, once the loop is vectorized */
#pragma omp simd
    for (int64_t i = start; i < end; i++) {
        const float g = gate[i], dh = grad[i];
        const float sig = 1.0f / (1.0f + exp_approx(-g));
        grad_up[i] = dh * g * sig;
        grad_gate[i] = dh * up[i] * sig * (1.0f + g * (1.0f - sig));
    }
}

static PyObject *py_swiglu_backward(PyObject *self, PyObject *args) {
    unsigned long long grad, gate, up, grad_gate, grad_up;
    long long n;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKLi", &grad, &gate, &up, &grad_gate, &grad_up, &n,
                          &nthreads))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "swiglu_backward: need n >= 0");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        THREAD_RANGE(n, start, end);
        if (start < end)
            swiglu_backward_range((const float *)grad, (const float *)gate, (const float *)up,
                                  (float *)grad_gate, (float *)grad_up, start, end);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

QLORA_CLONES
static void rms_norm_backward_rows(const float *restrict grad, const float *restrict x,
                                   const float *restrict rstd, const float *restrict weight,
                                   float *restrict out, int64_t start, int64_t end, int64_t d) {
    for (int64_t row = start; row < end; row++) {
        const float *g = grad + row * d, *xr = x + row * d;
        float *o = out + row * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; j++) dot += g[j] * weight[j] * xr[j];
        const float r = rstd[row];
        const float coef = r * r * r * dot / (float)d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) o[j] = r * weight[j] * g[j] - xr[j] * coef;
    }
}

static PyObject *py_rms_norm_backward(PyObject *self, PyObject *args) {
    unsigned long long grad, x, rstd, weight, out;
    long long rows, d;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKLLi", &grad, &x, &rstd, &weight, &out, &rows, &d,
                          &nthreads))
        return NULL;
    if (rows < 0 || d < 1) {
        PyErr_SetString(PyExc_ValueError, "rms_norm_backward: need rows >= 0 and d >= 1");
        return NULL;
    }
    if (nthreads < 1 || rows * d < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        THREAD_RANGE(rows, start, end);
        if (start < end)
            rms_norm_backward_rows((const float *)grad, (const float *)x, (const float *)rstd,
                                   (const float *)weight, (float *)out, start, end, d);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rms_norm_backward", py_rms_norm_backward, METH_VARARGS,
     "rms_norm_backward(grad, x, rstd, weight, out, rows, d, nthreads)"},
    {"swiglu_backward", py_swiglu_backward, METH_VARARGS,
     "swiglu_backward(grad, gate, up, grad_gate, grad_up, n, nthreads)"},
    {"dropout", py_dropout, METH_VARARGS,
     "dropout(in, out, n, seed_a, seed_b, threshold, scale, accumulate, nthreads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ops(void) { return PyModule_Create(&module); }
