/*
 * Fast CPU dequantization of blockwise k-bit weights: out[i] = code[index_i] * absmax[block].
 *
 * The reference is qlora/quant/blockwise.py::dequantize_reference; tests compare the two bit
 * for bit. Both multiply the float32 code by the float32 scale once (one rounding) and then
 * round to the output dtype with round-to-nearest-even, so they agree exactly.
 *
 * Why this is fast:
 *   - 4-bit codes to float32 are looked up in registers: the 16-entry codebook is split into
 *     two 8-float AVX2 registers, `vpermps` picks from each by the low 3 index bits and a
 *     blend on bit 3 chooses between them (8 values per handful of instructions).
 *   - 4-bit codes to bfloat16/float16 use a per-block 16-entry table of finished outputs and
 *     two `pshufb` byte lookups per 16 values (see dequant4_half_avx2).
 *   - other widths use a 256-entry byte table (byte -> 8/bits values), resident in L1.
 *   - large outputs are written with non-temporal stores: the output does not fit in cache
 *     anyway, and streaming stores skip the read-for-ownership that doubles write traffic.
 *   - blocks are split across OpenMP threads in grabs of 256 (dynamic schedule: on a shared
 *     machine a thread that loses its core would otherwise hold up a static split's
 *     barrier for its whole half); the GIL is released.
 * The AVX2 path is chosen at run time (__builtin_cpu_supports), so the module also runs on
 * CPUs without AVX2 (scalar path) and is built without -mavx2.
 *
 * No Python objects cross this boundary except integers: pointers come from
 * torch.Tensor.data_ptr() and the Python side validates dtypes, sizes and contiguity.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
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

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

/* Streaming stores pay off only when the output would not stay in cache anyway. */
static const int64_t STREAM_MIN_BYTES = 4 << 20;
/* Below this many elements a single thread is faster than waking the pool. */
static const int64_t PARALLEL_MIN_ELEMENTS = 1 << 16;

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}


static inline void store_one(void *out, int64_t i, float v, int dtype) {
    if (dtype == OUT_F32)
        ((float *)out)[i] = v;
    else if (dtype == OUT_BF16)
        ((uint16_t *)out)[i] = f32_to_bf16(v);
    else
        ((uint16_t *)out)[i] = qlora_f32_to_f16(v);
}

/* Scalar path for any width: a byte expands to `per` values, first in the high bits. */
static void dequant_scalar(const uint8_t *packed, const float *absmax, const float *code,
                           void *out, int64_t n, int64_t blocksize, int bits, int dtype,
                           int64_t first_block, int nthreads) {
    const int per = 8 / bits;
    const int mask = (1 << bits) - 1;
    float table[256][8];
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < per; j++) table[b][j] = code[(b >> (8 - bits * (j + 1))) & mask];
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = first_block; blk < nblocks; blk++) {
        const float scale = absmax[blk];
        const int64_t start = blk * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        for (int64_t i = start; i < end; i++) {
            const float v = table[packed[i / per]][i % per] * scale;
            store_one(out, i, v, dtype);
        }
    }
}

#ifdef QLORA_X86
/* 4-bit codes -> 8 floats: 4 packed bytes, first element in the high nibble. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256
nibbles_to_codes(const uint8_t *p, __m256 low_half, __m256 high_half) {
    uint32_t word;
    memcpy(&word, p, 4);
    const __m128i raw = _mm_cvtsi32_si128((int)word);
    const __m128i nib = _mm_set1_epi8(0x0f);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
    const __m128i lo = _mm_and_si128(raw, nib);
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)); /* [8] in order */
    const __m256 from_low = _mm256_permutevar8x32_ps(low_half, idx);
    const __m256 from_high = _mm256_permutevar8x32_ps(high_half, idx);
    /* index bit 3 moved to the sign bit selects the upper half of the codebook */
    return _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

__attribute__((target("avx2,fma,f16c"))) static inline __m256i bf16_round(__m256 v) {
    /* round to nearest even on the upper 16 bits; the result sits in the low half of each lane */
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_srli_epi32(rounded, 16);
}

/* 16 floats (a then b) -> 16 bf16 in order */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i bf16x16(__m256 a, __m256 b) {
    /* packus interleaves 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7]; permute restores order */
    const __m256i packed = _mm256_packus_epi32(bf16_round(a), bf16_round(b));
    return _mm256_permute4x64_epi64(packed, 0xd8);
}

/* Full blocks of 4-bit codes to a 16-bit dtype (bf16 or fp16).
 *
 * A block has only 16 distinct outputs, round16(code[c] * absmax), so each block first builds
 * that 16-entry table (two 8-float multiplies and one rounding pass) and splits it into a
 * low-byte and a high-byte plane of 16 bytes each. Every output is then two `pshufb` lookups
 * by the 4-bit index and a byte interleave - 128-bit integer shuffles, which stay cheap on
 * CPUs that split 256-bit lane-crossing permutes (AMD Zen 1). The values are exactly those
 * of the per-element product: the table entry is the same single multiply and rounding. */
__attribute__((target("avx2,fma,f16c"))) static int64_t
dequant4_half_avx2(const uint8_t *packed, const float *absmax, const float *code, uint16_t *out,
                   int64_t n, int64_t blocksize, int dtype, int nthreads) {
    const int64_t full_blocks = n / blocksize;
    const __m256 code_lo = _mm256_loadu_ps(code);
    const __m256 code_hi = _mm256_loadu_ps(code + 8);
    const int stream = n * 2 >= STREAM_MIN_BYTES && ((uintptr_t)out % 16) == 0;
    const __m128i even_bytes = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i odd_bytes = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i nibble = _mm_set1_epi8(0x0f);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = 0; blk < full_blocks; blk++) {
        const __m256 scale = _mm256_set1_ps(absmax[blk]);
        const __m256 v0 = _mm256_mul_ps(code_lo, scale); /* entries 0..7  */
        const __m256 v1 = _mm256_mul_ps(code_hi, scale); /* entries 8..15 */
        __m128i t0, t1;                                  /* 8 x u16 each */
        if (dtype == OUT_BF16) {
            const __m256i both = bf16x16(v0, v1);
            t0 = _mm256_castsi256_si128(both);
            t1 = _mm256_extracti128_si256(both, 1);
        } else {
            t0 = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT);
            t1 = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT);
        }
        const __m128i low_plane = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, even_bytes),
                                                     _mm_shuffle_epi8(t1, even_bytes));
        const __m128i high_plane = _mm_unpacklo_epi64(_mm_shuffle_epi8(t0, odd_bytes),
                                                      _mm_shuffle_epi8(t1, odd_bytes));
        const uint8_t *q = packed + blk * blocksize / 2;
        uint16_t *dst = out + blk * blocksize;
        for (int64_t k = 0; k < blocksize / 2; k += 16) { /* 16 bytes -> 32 values */
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + k));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
            const __m128i lo = _mm_and_si128(raw, nibble);
            const __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
            for (int h = 0; h < 2; h++) {
                const __m128i lb = _mm_shuffle_epi8(low_plane, idx[h]);
                const __m128i hb = _mm_shuffle_epi8(high_plane, idx[h]);
                __m128i *d = (__m128i *)(dst + 2 * k + 16 * h);
                if (stream) {
                    _mm_stream_si128(d, _mm_unpacklo_epi8(lb, hb));
                    _mm_stream_si128(d + 1, _mm_unpackhi_epi8(lb, hb));
                } else {
                    _mm_storeu_si128(d, _mm_unpacklo_epi8(lb, hb));
                    _mm_storeu_si128(d + 1, _mm_unpackhi_epi8(lb, hb));
                }
            }
        }
    }
    if (stream) _mm_sfence();
    return full_blocks;
}

/* Full blocks of 4-bit codes to float32. Returns the number of blocks done. */
__attribute__((target("avx2,fma,f16c"))) static int64_t
dequant4_f32_avx2(const uint8_t *packed, const float *absmax, const float *code, float *out,
                  int64_t n, int64_t blocksize, int nthreads) {
    const int64_t full_blocks = n / blocksize;
    const __m256 low_half = _mm256_loadu_ps(code);
    const __m256 high_half = _mm256_loadu_ps(code + 8);
    const int stream = n * 4 >= STREAM_MIN_BYTES && ((uintptr_t)out % 32) == 0;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = 0; blk < full_blocks; blk++) {
        const __m256 scale = _mm256_set1_ps(absmax[blk]);
        const uint8_t *q = packed + blk * blocksize / 2;
        float *dst = out + blk * blocksize;
        for (int64_t k = 0; k < blocksize; k += 8) {
            const __m256 v = _mm256_mul_ps(nibbles_to_codes(q + k / 2, low_half, high_half), scale);
            if (stream)
                _mm256_stream_ps(dst + k, v);
            else
                _mm256_storeu_ps(dst + k, v);
        }
    }
    if (stream) _mm_sfence();
    return full_blocks;
}
#endif

static int has_avx2(void) {
#ifdef QLORA_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    }
    return cached;
#else
    return 0;
#endif
}

/* 8-bit codes to float32: one table lookup and one multiply per value. */
static void dequant8_f32(const uint8_t *packed, const float *absmax, const float *code,
                         float *out, int64_t n, int64_t blocksize, int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const float scale = absmax[blk];
        const int64_t start = blk * blocksize;
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        for (int64_t i = start; i < end; i++) out[i] = code[packed[i]] * scale;
    }
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    unsigned long long packed, absmax, code, out;
    long long n, blocksize;
    int bits, dtype, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLiii", &packed, &absmax, &code, &out, &n, &blocksize, &bits,
                          &dtype, &nthreads))
        return NULL;
    if (bits != 2 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits must be 2, 4 or 8, got %d", bits);
        return NULL;
    }
    if (dtype < OUT_F32 || dtype > OUT_F16 || n < 0 || blocksize <= 0 || blocksize % (8 / bits)) {
        PyErr_SetString(PyExc_ValueError, "invalid dequantize arguments");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    int64_t done = 0;
    if (bits == 8 && dtype == OUT_F32) {
        dequant8_f32((const uint8_t *)packed, (const float *)absmax, (const float *)code,
                     (float *)out, n, blocksize, nthreads);
        done = (n + blocksize - 1) / blocksize;
    }
#ifdef QLORA_X86
    if (bits == 4 && blocksize % 32 == 0 && has_avx2()) {
        if (dtype == OUT_F32)
            done = dequant4_f32_avx2((const uint8_t *)packed, (const float *)absmax,
                                     (const float *)code, (float *)out, n, blocksize, nthreads);
        else
            done = dequant4_half_avx2((const uint8_t *)packed, (const float *)absmax,
                                      (const float *)code, (uint16_t *)out, n, blocksize, dtype,
                                      nthreads);
    }
#endif
    dequant_scalar((const uint8_t *)packed, (const float *)absmax, (const float *)code,
                   (void *)out, n, blocksize, bits, dtype, done, nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * Quantization: codes[i] = order[#{j : bounds[j] < x[i] / absmax[block]}] (nearest code, a tie
 * on a midpoint going to the lower one - torch.bucketize(right=False) in the reference),
 * absmax[block] = max |x| over the block (NaN if the block holds a NaN), codes packed first
 * element in the highest bits. The scaled value is x * (1 / max(absmax, 1e-38)) clamped to
 * [-1, 1], in float32 with the same two roundings as the reference.
 * ------------------------------------------------------------------------------------- */
static const float QUANT_TINY = 1e-38f;

/* The number of bounds strictly below v (lower_bound) among the 2^bits - 1 sorted bounds:
 * a branchless binary search (the compare feeds a conditional move, not a branch). */
static inline int rank_of(float v, const float *bounds, int bits) {
    int pos = 0;
    for (int step = 1 << (bits - 1); step > 0; step >>= 1) pos += (bounds[pos + step - 1] < v) ? step : 0;
    return pos;
}

static void quantize_scalar(const float *x, int64_t n, int64_t blocksize, const float *bounds,
                            const uint8_t *order, int bits, uint8_t *packed,
                            float *absmax, int64_t first_block, int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int per_byte = 8 / bits;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = first_block; blk < nblocks; blk++) {
        const int64_t start = blk * blocksize;
        const int64_t len = n - start < blocksize ? n - start : blocksize;
        float m = 0.0f;
        for (int64_t k = 0; k < len; k++) {
            const float a = fabsf(x[start + k]);
            if (a > m || a != a) m = a;
            if (m != m) break;
        }
        const float floored = m > QUANT_TINY || m != m ? m : QUANT_TINY;
        absmax[blk] = len < blocksize ? floored : m; /* the reference floors only the tail */
        const float inv = 1.0f / floored;
        /* the last block is padded with zeros up to a whole byte, as the reference does */
        const int64_t padded = (len + per_byte - 1) / per_byte * per_byte;
        uint8_t *dst = packed + start / per_byte;
        for (int64_t k = 0; k < padded; k += per_byte) {
            unsigned byte = 0;
            for (int j = 0; j < per_byte; j++) {
                float v = 0.0f;
                if (k + j < len) {
                    /* the reference (like bitsandbytes) divides in a partial last block and
                     * multiplies by the reciprocal in full ones: the roundings differ */
                    v = len < blocksize ? x[start + k + j] / floored : x[start + k + j] * inv;
                    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                }
                byte |= (unsigned)order[rank_of(v, bounds, bits)] << (8 - bits * (j + 1));
            }
            dst[k / per_byte] = (uint8_t)byte;
        }
    }
}

#ifdef QLORA_X86
/* Full blocks of 4-bit codes: 15 vector compares count the bounds below 8 values at once. */
__attribute__((target("avx2,fma,f16c"))) static int64_t
quantize4_avx2(const float *x, int64_t n, int64_t blocksize, const float *bounds,
               const uint8_t *order, uint8_t *packed, float *absmax, int nthreads) {
    const int64_t full_blocks = n / blocksize;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
    __m256 b[15];
    for (int j = 0; j < 15; j++) b[j] = _mm256_set1_ps(bounds[j]);
    int identity = 1;
    for (int j = 0; j < 16; j++) identity &= order[j] == j;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = 0; blk < full_blocks; blk++) {
        const float *src = x + blk * blocksize;
        __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int64_t k = 0; k < blocksize; k += 8) {
            const __m256 v = _mm256_loadu_ps(src + k);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        float amax = lanes[0];
        for (int j = 1; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
        if (_mm256_movemask_ps(nan)) amax = __builtin_nanf("");
        absmax[blk] = amax;
        const __m256 inv =
            _mm256_set1_ps(1.0f / (amax > QUANT_TINY || amax != amax ? amax : QUANT_TINY));
        uint8_t *dst = packed + blk * blocksize / 2;
        for (int64_t k = 0; k < blocksize; k += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + k), inv);
            v = _mm256_min_ps(_mm256_max_ps(v, minus_one), one);
            __m256i rank = _mm256_setzero_si256();
            for (int j = 0; j < 15; j++)  /* compare mask is -1 where bound < v */
                rank = _mm256_sub_epi32(rank, _mm256_castps_si256(_mm256_cmp_ps(b[j], v, _CMP_LT_OQ)));
            int32_t r[8];
            _mm256_storeu_si256((__m256i *)r, rank);
            if (!identity)
                for (int j = 0; j < 8; j++) r[j] = order[r[j]];
            for (int j = 0; j < 4; j++) dst[k / 2 + j] = (uint8_t)((r[2 * j] << 4) | r[2 * j + 1]);
        }
    }
    return full_blocks;
}
#endif

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    unsigned long long x, bounds, order, packed, absmax;
    long long n, blocksize;
    int bits, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKKiKKi", &x, &n, &blocksize, &bounds, &order, &bits, &packed,
                          &absmax, &nthreads))
        return NULL;
    if (bits != 2 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits must be 2, 4 or 8, got %d", bits);
        return NULL;
    }
    if (n < 0 || blocksize <= 0 || blocksize % 8) {
        PyErr_SetString(PyExc_ValueError, "invalid quantize arguments");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    int64_t done = 0;
#ifdef QLORA_X86
    if (bits == 4 && has_avx2())
        done = quantize4_avx2((const float *)x, n, blocksize, (const float *)bounds,
                              (const uint8_t *)order, (uint8_t *)packed, (float *)absmax, nthreads);
#endif
    quantize_scalar((const float *)x, n, blocksize, (const float *)bounds, (const uint8_t *)order, bits, (uint8_t *)packed, (float *)absmax, done,
                    nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * 8-bit quantization through a lookup table on the float's bits (optimizer states).
 *
 * A binary search over 255 midpoints costs 8 dependent compares per value. Instead, the top
 * bits of |v| - exponent and 10 mantissa bits - select a bucket whose relative width
 * (2^-10) is below the smallest relative gap between neighbouring midpoints of the dynamic
 * maps, so a bucket holds at most one midpoint (checked when the table is built, in
 * qlora/optim/state8bit.py). lut[bucket] is the rank of the bucket's smallest value;
 * one compare with the next midpoint finishes: rank = c + (bounds[c] < v). Buckets cover
 * |v| in [2^-26, 2): smaller magnitudes all take `zero_rank` (no midpoint lies that close
 * to 0); NaN falls back to the binary search. Same ranks as torch.bucketize, bit for bit.
 * Layout: lut[((sign * 27) + exponent - 101) * 1024 + mantissa >> 13]; bounds has 256
 * entries, the last +inf.
 * ------------------------------------------------------------------------------------- */
/* Quantize one block of `len` values (a short last block when len < blocksize). */
static inline void quantize8_block(const float *x, int64_t len, int64_t blocksize,
                                   const uint8_t *lut, const float *bounds, int zero_rank,
                                   uint8_t *codes, float *absmax) {
    /* eight independent running maxima (no loop-carried dependency), NaN tracked apart */
    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int nan = 0;
    int64_t k = 0;
    for (; k + 8 <= len; k += 8)
        for (int j = 0; j < 8; j++) {
            const float a = fabsf(x[k + j]);
            lane[j] = a > lane[j] ? a : lane[j];
            nan |= a != a;
        }
    for (; k < len; k++) {
        const float a = fabsf(x[k]);
        lane[0] = a > lane[0] ? a : lane[0];
        nan |= a != a;
    }
    float m = lane[0];
    for (int j = 1; j < 8; j++) m = lane[j] > m ? lane[j] : m;
    if (nan) m = NAN;
    const float floored = m > QUANT_TINY || m != m ? m : QUANT_TINY;
    *absmax = len < blocksize ? floored : m;
    const float inv = 1.0f / floored;
    const int tail = len < blocksize;
    for (k = 0; k < len; k++) {
        float v = tail ? x[k] / floored : x[k] * inv;
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        uint32_t bits;
        memcpy(&bits, &v, 4);
        const uint32_t mag = bits & 0x7fffffffu;
        const int32_t e = (int32_t)(mag >> 23) - 101;
        int rank;
        if (e < 0)
            rank = zero_rank;
        else if (e > 26)
            rank = rank_of(v, bounds, 8); /* NaN */
        else {
            const int c = lut[((int32_t)(bits >> 31) * 27 + e) * 1024 + ((mag >> 13) & 1023)];
            rank = c + (bounds[c] < v);
        }
        codes[k] = (uint8_t)rank;
    }
}

static void quantize8_lut(const float *x, int64_t n, int64_t blocksize, const uint8_t *lut,
                          const float *bounds, int zero_rank, uint8_t *codes, float *absmax,
                          int nthreads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 256)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t start = blk * blocksize;
        const int64_t len = n - start < blocksize ? n - start : blocksize;
        quantize8_block(x + start, len, blocksize, lut, bounds, zero_rank, codes + start,
                        absmax + blk);
    }
}

/* ---------------------------------------------------------------------------------------
 * One AdamW step with 8-bit blockwise moments, fused: per block of 256, dequantize m and v,
 * update them and the parameter, requantize. Element for element the same float32
 * operations as qlora/optim/update.py::adamw_ (= torch.optim.AdamW's CPU kernels):
 *   p *= decay                        (mul_, when weight decay is on)
 *   m  = fma(w1, g - m, m)            (lerp_, weight < 0.5; fma(w1 - 1, g - m, g) otherwise)
 *   v  = fma(w2 * g, g, v * beta2)    (mul_ then addcmul_)
 *   p  = p + (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)   (sqrt, div, add_, addcdiv_)
 * Built with -std=c11, so the compiler contracts nothing else into an fma.
 * ------------------------------------------------------------------------------------- */
#if defined(QLORA_X86) && defined(__GNUC__) && !defined(__clang__)
/* Compiled twice, dispatched at load time: with FMA, fmaf is one instruction instead of a
 * libm call (nothing else is contracted: -std=c11 keeps -ffp-contract=off). */
__attribute__((target_clones("fma", "default")))
#endif
static void adamw8bit_step(float *p, const float *g, uint8_t *cm, uint8_t *cv, float *am,
                           float *av, int64_t n, const float *code_m, const float *code_v,
                           const uint8_t *lut_m, const float *bounds_m, int zero_m,
                           const uint8_t *lut_v, const float *bounds_v, int zero_v,
                           int apply_decay, float decay, float w1, float beta2, float w2,
                           float bc2_sqrt, float eps, float neg_step, int nthreads) {
    const int64_t blocksize = 256;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int small = fabsf(w1) < 0.5f;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 64)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        float m[256], v[256];
        const int64_t start = blk * blocksize;
        const int64_t len = n - start < blocksize ? n - start : blocksize;
        const float sm = am[blk], sv = av[blk];
        float *pp = p + start;
        const float *gg = g + start;
        const float mul = small ? w1 : w1 - 1.0f;
        for (int64_t k = 0; k < len; k++) {
            const float gk = gg[k];
            float mk = code_m[cm[start + k]] * sm;
            float vk = code_v[cv[start + k]] * sv;
            float pk = pp[k];
            pk = apply_decay ? pk * decay : pk;
            mk = fmaf(mul, gk - mk, small ? mk : gk);
            vk = fmaf(w2 * gk, gk, vk * beta2);
            const float denom = sqrtf(vk) / bc2_sqrt + eps;
            pp[k] = pk + (neg_step * mk) / denom;
            m[k] = mk;
            v[k] = vk;
        }
        quantize8_block(m, len, blocksize, lut_m, bounds_m, zero_m, cm + start, am + blk);
        quantize8_block(v, len, blocksize, lut_v, bounds_v, zero_v, cv + start, av + blk);
    }
}

static PyObject *py_adamw8bit_step(PyObject *self, PyObject *args) {
    unsigned long long p, g, cm, cv, am, av, code_m, code_v, lut_m, bounds_m, lut_v, bounds_v;
    long long n;
    int zero_m, zero_v, apply_decay, nthreads;
    float decay, w1, beta2, w2, bc2_sqrt, eps, neg_step;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKKLKKKKiKKiifffffffi", &p, &g, &cm, &cv, &am, &av, &n,
                          &code_m, &code_v, &lut_m, &bounds_m, &zero_m, &lut_v, &bounds_v,
                          &zero_v, &apply_decay, &decay, &w1, &beta2, &w2, &bc2_sqrt, &eps,
                          &neg_step, &nthreads))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid adamw8bit_step arguments");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    adamw8bit_step((float *)p, (const float *)g, (uint8_t *)cm, (uint8_t *)cv, (float *)am,
                   (float *)av, n, (const float *)code_m, (const float *)code_v,
                   (const uint8_t *)lut_m, (const float *)bounds_m, zero_m,
                   (const uint8_t *)lut_v, (const float *)bounds_v, zero_v, apply_decay, decay,
                   w1, beta2, w2, bc2_sqrt, eps, neg_step, nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_quantize8_lut(PyObject *self, PyObject *args) {
    unsigned long long x, lut, bounds, codes, absmax;
    long long n, blocksize;
    int zero_rank, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKKiKKi", &x, &n, &blocksize, &lut, &bounds, &zero_rank,
                          &codes, &absmax, &nthreads))
        return NULL;
    if (n < 0 || blocksize <= 0 || zero_rank < 0 || zero_rank > 255) {
        PyErr_SetString(PyExc_ValueError, "invalid quantize8_lut arguments");
        return NULL;
    }
    if (nthreads < 1 || n < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    Py_BEGIN_ALLOW_THREADS;
    quantize8_lut((const float *)x, n, blocksize, (const uint8_t *)lut, (const float *)bounds,
                  zero_rank, (uint8_t *)codes, (float *)absmax, nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_has_avx2(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(has_avx2());
}

static PyMethodDef methods[] = {
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(packed, absmax, code, out, n, blocksize, bits, dtype, nthreads): raw pointers"},
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(x, n, blocksize, bounds, order, bits, packed, absmax, nthreads): raw pointers"},
    {"quantize8_lut", py_quantize8_lut, METH_VARARGS,
     "quantize8_lut(x, n, blocksize, lut, bounds, zero_rank, codes, absmax, nthreads)"},
    {"adamw8bit_step", py_adamw8bit_step, METH_VARARGS,
     "adamw8bit_step(p, g, codes_m, codes_v, absmax_m, absmax_v, n, code_m, code_v, lut_m, "
     "bounds_m, zero_m, lut_v, bounds_v, zero_v, apply_decay, decay, w1, beta2, w2, bc2_sqrt, "
     "eps, neg_step, nthreads): raw pointers and float32 scalars"},
    {"has_avx2", py_has_avx2, METH_NOARGS, "whether the AVX2 path is used on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
