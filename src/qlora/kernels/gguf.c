/*
 * GGUF block dequantization (llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K),
 * bit-identical to the `gguf` package's numpy `gguf.quants.dequantize`.
 *
 * The reference is qlora/quant/gguf_blocks.py::dequantize_blocks_reference; tests compare
 * this kernel, the reference and gguf bit for bit. Exactness rests on three things:
 *   - every float32 operation is the one gguf/quants.py does, in its order: float16 scales
 *     widened to float32 exactly (subnormals too), products of scale and the integer code
 *     converted to float, then a separate add/subtract where the format has a minimum
 *     (Q4_1: d * q + m; Q4_K: (d * sc) * q - dmin * m);
 *   - the build passes -ffp-contract=off, so the compiler never fuses a * b + c into one FMA
 *     (one rounding instead of numpy's two);
 *   - a bfloat16 / float16 output is the float32 value rounded once to nearest even, as
 *     torch's .to(dtype) does (bf16: the same integer rounding as cpu.c; f16: F16C's
 *     vcvtps2ph where the CPU has it, else cpu.c's scalar conversion).
 *
 * Why this is fast: each kind's block decoder is a few fixed-length loops over bytes, which
 * the compiler vectorizes; they are compiled twice (target_clones: AVX2 and baseline x86-64)
 * and picked at load time. Blocks are decoded in chunks of up to 1024 values straight into a
 * float32 output, or into an L1-resident scratch that is then rounded to 16 bits. Chunks are
 * spread over OpenMP threads (dynamic schedule: the machine is shared) with the GIL released.
 *
 * Layout: blocks are contiguous across rows, so block b of the flat byte run expands to
 * output elements [b * QK, (b + 1) * QK). Only integers cross the Python boundary: pointers
 * from torch.Tensor.data_ptr(); the Python side validates dtypes, sizes and contiguity.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "half.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLORA_X86 1
#endif

/* -DQLORA_GGUF_BASELINE builds only the baseline code (no AVX2 clone, no F16C): the path a
 * CPU without them takes, for checking it on one that has them. */
#if defined(QLORA_GGUF_BASELINE)
#undef QLORA_X86
#endif
#if defined(QLORA_X86) && defined(__GNUC__) && !defined(__clang__)
#define MULTI_TARGET __attribute__((target_clones("avx2", "default")))
#else
#define MULTI_TARGET
#endif

/* On the fixed 16/32-element loops below GCC otherwise unrolls completely before the loop
 * vectorizer runs, and the leftover straight-line code converts byte by byte (measured: Q4_0
 * ran at half the speed). Keeping them loops lets them vectorize. */
#if defined(__GNUC__) && !defined(__clang__)
#define UNROLL_NONE _Pragma("GCC unroll 1")
#else
#define UNROLL_NONE
#endif

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };
/* ggml type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

/* floats decoded per chunk: the unit of work for a thread and the scratch size (4 KiB) */
#define CHUNK 1024
/* Below this many elements a single thread is faster than waking the pool. */
static const int64_t PARALLEL_MIN_ELEMENTS = 1 << 16;

/* ---------------------------------------------------------------------------------------
 * Conversions
 * ------------------------------------------------------------------------------------- */

static inline uint16_t load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8)); /* GGUF is little-endian */
}

static inline float f16_to_f32(uint16_t h) {
    /* exact, as numpy's float16 -> float32 (subnormals become normal float32 values) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000u | (mant << 13); /* inf, NaN (payload kept) */
    else if (exp != 0)
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    else if (mant == 0)
        bits = sign;
    else { /* subnormal: mant * 2^-24, exact in float32 (a power-of-two scale of an integer) */
        const float v = (float)mant * 0x1p-24f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load_f16(const uint8_t *p) { return f16_to_f32(load_u16(p)); }


/* float32 -> bfloat16, nearest even (as cpu.c), written branch-free so it vectorizes */
MULTI_TARGET static void store_bf16(const float *restrict src, uint16_t *restrict dst,
                                    int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], 4);
        const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        const uint32_t nan = (bits >> 16) | 0x40u;
        dst[i] = (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
    }
}

static void store_f16_scalar(const float *restrict src, uint16_t *restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qlora_f32_to_f16(src[i]);
}

#ifdef QLORA_X86
/* vcvtps2ph with an explicit round-to-nearest-even immediate: IEEE conversion, subnormals
 * included, independent of MXCSR's rounding mode. */
__attribute__((target("avx2,f16c"))) static void store_f16_f16c(const float *restrict src,
                                                               uint16_t *restrict dst,
                                                               int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = qlora_f32_to_f16(src[i]);
}

static int has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
static int has_f16c(void) { return 0; }
#endif

static int use_f16c; /* set once at module load */

static void store_f16(const float *src, uint16_t *dst, int64_t n) {
#ifdef QLORA_X86
    if (use_f16c) {
        store_f16_f16c(src, dst, n);
        return;
    }
#endif
    store_f16_scalar(src, dst, n);
}

/* ---------------------------------------------------------------------------------------
 * Block decoders: `nb` blocks from `src` to nb * QK float32 values at `y`, each written as
 * gguf/quants.py's dequantize_blocks for that type (comments give its expression).
 * ------------------------------------------------------------------------------------- */

/* Q4_0, 18 bytes: d (f16), qs[16]; element l in qs[l]'s low nibble, l + 16 in its high.
 * y = d * (q - 8) */
MULTI_TARGET static void decode_q4_0(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 18, y += 32) {
        const float d = load_f16(src);
        const uint8_t *qs = src + 2;
        UNROLL_NONE
        for (int l = 0; l < 16; l++) {
            y[l] = d * (float)((int)(qs[l] & 0x0f) - 8);
            y[l + 16] = d * (float)((int)(qs[l] >> 4) - 8);
        }
    }
}

/* Q4_1, 20 bytes: d, m (f16), qs[16]. y = (d * q) + m */
MULTI_TARGET static void decode_q4_1(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 20, y += 32) {
        const float d = load_f16(src), m = load_f16(src + 2);
        const uint8_t *qs = src + 4;
        UNROLL_NONE
        for (int l = 0; l < 16; l++) {
            y[l] = d * (float)(qs[l] & 0x0f) + m;
            y[l + 16] = d * (float)(qs[l] >> 4) + m;
        }
    }
}

static inline uint32_t load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* Q5_0, 22 bytes: d, qh (u32: bit l is element l's 5th bit), qs[16]. y = d * (q - 16) */
MULTI_TARGET static void decode_q5_0(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 22, y += 32) {
        const float d = load_f16(src);
        const uint32_t qh = load_u32(src + 2);
        const uint8_t *qs = src + 6;
        UNROLL_NONE
        for (int l = 0; l < 16; l++) {
            const int lo = (int)(qs[l] & 0x0f) | (int)(((qh >> l) & 1u) << 4);
            const int hi = (int)(qs[l] >> 4) | (int)(((qh >> (l + 16)) & 1u) << 4);
            y[l] = d * (float)(lo - 16);
            y[l + 16] = d * (float)(hi - 16);
        }
    }
}

/* Q5_1, 24 bytes: d, m, qh, qs[16]. y = (d * q) + m */
MULTI_TARGET static void decode_q5_1(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 24, y += 32) {
        const float d = load_f16(src), m = load_f16(src + 2);
        const uint32_t qh = load_u32(src + 4);
        const uint8_t *qs = src + 8;
        UNROLL_NONE
        for (int l = 0; l < 16; l++) {
            const int lo = (int)(qs[l] & 0x0f) | (int)(((qh >> l) & 1u) << 4);
            const int hi = (int)(qs[l] >> 4) | (int)(((qh >> (l + 16)) & 1u) << 4);
            y[l] = d * (float)lo + m;
            y[l + 16] = d * (float)hi + m;
        }
    }
}

/* Q8_0, 34 bytes: d, qs[32] (int8). y = x * d */
MULTI_TARGET static void decode_q8_0(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 34, y += 32) {
        const float d = load_f16(src);
        const int8_t *qs = (const int8_t *)(src + 2);
        UNROLL_NONE
        for (int l = 0; l < 32; l++) y[l] = (float)qs[l] * d;
    }
}

/* Q2_K, 84 bytes: scales[16] (low nibble: scale, high: min), qs[64], d, dmin.
 * Element h*128 + s*32 + l is bits 2s..2s+1 of qs[h*32 + l]; group g = element / 16.
 * dl = d * (sc & 15), ml = dmin * (sc >> 4), y = dl * q - ml */
MULTI_TARGET static void decode_q2_k(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 84, y += 256) {
        const uint8_t *sc = src, *qs = src + 16;
        const float d = load_f16(src + 80), dmin = load_f16(src + 82);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int half = 0; half < 2; half++) {
                    const int g = h * 8 + s * 2 + half;
                    const float dl = d * (float)(sc[g] & 0x0f);
                    const float ml = dmin * (float)(sc[g] >> 4);
                    const uint8_t *q = qs + h * 32 + half * 16;
                    float *out = y + h * 128 + s * 32 + half * 16;
                    UNROLL_NONE
                    for (int l = 0; l < 16; l++) out[l] = dl * (float)((q[l] >> (2 * s)) & 3) - ml;
                }
    }
}

/* Q3_K, 110 bytes: hmask[32], qs[64], scales[12] (16 6-bit signed scales), d.
 * Element e = h*128 + s*32 + l: low 2 bits from qs[h*32 + l] >> 2s; bit (e / 32) of
 * hmask[l] clear means subtract 4. dl = d * (scale - 32), y = dl * q */
MULTI_TARGET static void decode_q3_k(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 110, y += 256) {
        const uint8_t *hmask = src, *qs = src + 32, *packed = src + 96;
        const float d = load_f16(src + 108);
        float dl[16];
        for (int g = 0; g < 16; g++) {
            const int low = g < 8 ? (packed[g] & 0x0f) : (packed[g - 8] >> 4);
            const int high = (packed[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
            dl[g] = d * (float)((low | (high << 4)) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int half = 0; half < 2; half++) {
                    const int j = h * 4 + s; /* hmask bit */
                    const float scale = dl[j * 2 + half];
                    const uint8_t *q = qs + h * 32 + half * 16;
                    const uint8_t *m = hmask + half * 16;
                    float *out = y + j * 32 + half * 16;
                    UNROLL_NONE
                    for (int l = 0; l < 16; l++) {
                        const int low = (q[l] >> (2 * s)) & 3;
                        const int sub = (((m[l] >> j) & 1) ^ 1) << 2;
                        out[l] = scale * (float)(low - sub);
                    }
                }
    }
}

/* Q4_K / Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins */
static inline void scale_min_k4(const uint8_t *p, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 0x3f;
        mn[j] = p[j + 4] & 0x3f;
        sc[j + 4] = (p[j + 8] & 0x0f) | ((p[j] >> 2) & 0x30);
        mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 2) & 0x30);
    }
}

/* Q4_K, 144 bytes: d, dmin, scales[12], qs[128]. Sub-block k = 2h + s (32 elements) is
 * nibble s of qs[h*32 .. h*32 + 31]. y = (d * sc) * q - (dmin * m) */
MULTI_TARGET static void decode_q4_k(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 144, y += 256) {
        const float d = load_f16(src), dmin = load_f16(src + 2);
        int sc[8], mn[8];
        scale_min_k4(src + 4, sc, mn);
        const uint8_t *qs = src + 16;
        for (int h = 0; h < 4; h++) {
            const float d0 = d * (float)sc[2 * h], m0 = dmin * (float)mn[2 * h];
            const float d1 = d * (float)sc[2 * h + 1], m1 = dmin * (float)mn[2 * h + 1];
            const uint8_t *q = qs + h * 32;
            float *out = y + h * 64;
            UNROLL_NONE
            for (int l = 0; l < 32; l++) {
                out[l] = d0 * (float)(q[l] & 0x0f) - m0;
                out[l + 32] = d1 * (float)(q[l] >> 4) - m1;
            }
        }
    }
}

/* Q5_K, 176 bytes: d, dmin, scales[12], qh[32], qs[128]; bit k of qh[l] is the 5th bit of
 * sub-block k's element l. y = (d * sc) * q - (dmin * m) */
MULTI_TARGET static void decode_q5_k(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 176, y += 256) {
        const float d = load_f16(src), dmin = load_f16(src + 2);
        int sc[8], mn[8];
        scale_min_k4(src + 4, sc, mn);
        const uint8_t *qh = src + 16, *qs = src + 48;
        for (int h = 0; h < 4; h++) {
            const int k0 = 2 * h, k1 = 2 * h + 1;
            const float d0 = d * (float)sc[k0], m0 = dmin * (float)mn[k0];
            const float d1 = d * (float)sc[k1], m1 = dmin * (float)mn[k1];
            const uint8_t *q = qs + h * 32;
            float *out = y + h * 64;
            UNROLL_NONE
            for (int l = 0; l < 32; l++) {
                const int lo = (q[l] & 0x0f) | (((qh[l] >> k0) & 1) << 4);
                const int hi = (q[l] >> 4) | (((qh[l] >> k1) & 1) << 4);
                out[l] = d0 * (float)lo - m0;
                out[l + 32] = d1 * (float)hi - m1;
            }
        }
    }
}

/* Q6_K, 210 bytes: ql[128], qh[64], scales[16] (int8), d. Element h*128 + t*32 + l
 * (l < 32): low 4 bits are nibble t/2 of ql[h*64 + (t&1)*32 + l], high 2 bits are bits
 * 2t..2t+1 of qh[h*32 + l]. dl = d * scale, y = dl * (q - 32) */
MULTI_TARGET static void decode_q6_k(const uint8_t *restrict src, float *restrict y,
                                     int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += 210, y += 256) {
        const uint8_t *ql = src, *qh = src + 128;
        const int8_t *scales = (const int8_t *)(src + 192);
        const float d = load_f16(src + 208);
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++)
                for (int half = 0; half < 2; half++) {
                    const float dl = d * (float)scales[h * 8 + t * 2 + half];
                    const uint8_t *lo = ql + h * 64 + (t & 1) * 32 + half * 16;
                    const uint8_t *hi = qh + h * 32 + half * 16;
                    float *out = y + h * 128 + t * 32 + half * 16;
                    UNROLL_NONE
                    for (int l = 0; l < 16; l++) {
                        const int q = ((lo[l] >> (4 * (t >> 1))) & 0x0f) |
                                      (((hi[l] >> (2 * t)) & 3) << 4);
                        out[l] = dl * (float)(q - 32);
                    }
                }
    }
}

typedef void (*decode_fn)(const uint8_t *restrict, float *restrict, int64_t);

typedef struct {
    int type;
    int elements; /* per block */
    int bytes;    /* per block */
    decode_fn decode;
} kind_info;

static const kind_info KINDS[] = {
    {T_Q4_0, 32, 18, decode_q4_0},   {T_Q4_1, 32, 20, decode_q4_1},
    {T_Q5_0, 32, 22, decode_q5_0},   {T_Q5_1, 32, 24, decode_q5_1},
    {T_Q8_0, 32, 34, decode_q8_0},   {T_Q2_K, 256, 84, decode_q2_k},
    {T_Q3_K, 256, 110, decode_q3_k}, {T_Q4_K, 256, 144, decode_q4_k},
    {T_Q5_K, 256, 176, decode_q5_k}, {T_Q6_K, 256, 210, decode_q6_k},
};

static const kind_info *find_kind(int type) {
    for (size_t i = 0; i < sizeof(KINDS) / sizeof(KINDS[0]); i++)
        if (KINDS[i].type == type) return &KINDS[i];
    return NULL;
}

static void dequantize(const kind_info *k, const uint8_t *src, void *out, int64_t nblocks,
                       int dtype, int nthreads) {
    const int64_t per_chunk = CHUNK / k->elements; /* blocks per chunk */
    const int64_t nchunks = (nblocks + per_chunk - 1) / per_chunk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8)
    for (int64_t c = 0; c < nchunks; c++) {
        float scratch[CHUNK] __attribute__((aligned(64)));
        const int64_t b0 = c * per_chunk;
        const int64_t nb = nblocks - b0 < per_chunk ? nblocks - b0 : per_chunk;
        const int64_t first = b0 * k->elements, count = nb * k->elements;
        const uint8_t *blocks = src + b0 * k->bytes;
        if (dtype == OUT_F32) {
            k->decode(blocks, (float *)out + first, nb);
            continue;
        }
        k->decode(blocks, scratch, nb);
        if (dtype == OUT_BF16)
            store_bf16(scratch, (uint16_t *)out + first, count);
        else
            store_f16(scratch, (uint16_t *)out + first, count);
    }
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    unsigned long long src, out;
    long long nblocks;
    int type, dtype, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLii", &type, &src, &out, &nblocks, &dtype, &nthreads))
        return NULL;
    const kind_info *k = find_kind(type);
    if (k == NULL) {
        PyErr_Format(PyExc_ValueError, "unsupported ggml type %d", type);
        return NULL;
    }
    if (nblocks < 0 || dtype < OUT_F32 || dtype > OUT_F16) {
        PyErr_SetString(PyExc_ValueError, "invalid dequantize arguments");
        return NULL;
    }
    if (nthreads < 1 || nblocks * k->elements < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    dequantize(k, (const uint8_t *)src, (void *)out, nblocks, dtype, nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_types(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const size_t n = sizeof(KINDS) / sizeof(KINDS[0]);
    PyObject *result = PyTuple_New((Py_ssize_t)n);
    if (result == NULL) return NULL;
    for (size_t i = 0; i < n; i++) PyTuple_SET_ITEM(result, i, PyLong_FromLong(KINDS[i].type));
    return result;
}

static PyObject *py_has_f16c(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(use_f16c);
}

static PyMethodDef methods[] = {
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(ggml_type, blocks, out, nblocks, dtype, nthreads): raw pointers; dtype 0 "
     "float32, 1 bfloat16, 2 float16"},
    {"types", py_types, METH_NOARGS, "the ggml type ids this kernel decodes"},
    {"has_f16c", py_has_f16c, METH_NOARGS, "whether float16 output uses F16C on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gguf", NULL, -1, methods};

PyMODINIT_FUNC PyInit__gguf(void) {
    use_f16c = has_f16c();
    return PyModule_Create(&module);
}
