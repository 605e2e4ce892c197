/*
 * Fused dequantize + skinny matmul for decoding: y[M, out] = x[M, in] @ deq(W)^T, M small.
 *
 * W is a blockwise k-bit weight [out, in] (QuantState layout: codes packed first element in
 * the HIGH bits of a byte, blocks of `blocksize` along the flattened tensor, one float32
 * absmax per block). The caller guarantees in % blocksize == 0, so every row of W is a whole
 * number of blocks and row o's codes start at byte o * in * bits / 8.
 *
 * The reference is x @ dequantize(state, float32).t() (qlora/quant/matvec.py). The row-buffer
 * kernels form each weight exactly as the reference forms it (code[index] * absmax, one float32
 * rounding); only the float32 summation order of the dot products differs. The AVX-512 4-bit
 * kernel for M <= 4 multiplies the block scale once onto a partial sum instead
 * (sum_k s_b * c_k * x_k computed as s_b * sum_k c_k * x_k: the same math, other roundings).
 * Both stay far inside the documented tolerance (tests/quant/test_matvec.py: |ours - ref| <=
 * 1e-5 * (|x| @ |W|^T); measured against a float64 sum, both kernels' worst error is ~3e-8 of
 * that bound's scale, below torch's own float32 matmul's ~1e-7).
 *
 * Why this is fast for few rows: dequantize-then-matmul writes and re-reads a float32 copy of
 * W (8x the bytes of 4-bit codes); here W's codes are read from memory once. Two kernels:
 *
 * - Row buffer (every width, M > 4 for 4-bit on AVX-512): each thread decodes a group of 4
 *   rows of W (AVX-512: 1024 columns at a time) into a per-thread buffer that stays in L1 and
 *   dots them with all M input rows (register tiles of 4 (AVX2: 2) weight rows x up to 4
 *   input rows, FMA). Per block, the codebook is multiplied by the block's scale once (the
 *   same products code[c] * absmax), so decoding is a register lookup.
 * - Registers (4-bit on AVX-512, M <= 4): no buffer. A 64-byte load of codes is looked up 16
 *   nibbles per vpermps straight from the loaded dwords (shifted by 4 between lookups) and
 *   fed to the FMAs; x is permuted once per call into the order the lookups produce. Per 16
 *   weights that is 3 vector instructions (lookup, shift, FMA) against ~6 for decode + store +
 *   reload + FMA. Measured on a 2-core Zen 4 (AVX-512 double-pumped: ~1 zmm instruction per
 *   cycle whatever the mix), 1 thread, nf4 + double quantization: 1.4-1.9x the row-buffer
 *   kernel at M = 1 on the default model's shapes, 2.2-2.4x on 4096x4096; 1.4-1.7x at M = 2,
 *   1.1-1.4x at M = 4. At M = 8 both are bound by the FMAs (8 per 16 decoded weights, at the
 *   core's FMA peak: the row-buffer kernel already matches torch's dense float32 GEMM there),
 *   so the row-buffer kernel stays for M > 4.
 *
 * Paths, chosen at run time (__builtin_cpu_supports): AVX-512F (16-entry codebook in one
 * register: vpermps decodes 16 nibbles), AVX2+FMA (two 8-entry halves and a blend), scalar
 * (byte tables). int8 with its own codebook ((i - 128) / 127) is decoded by a vector division
 * that gives the table's exact values; any other 8-bit codebook by a gather. The module is
 * built without -m flags; each path carries __attribute__((target(...))). OpenMP splits the
 * output rows; the GIL is released. Only integers cross the boundary: pointers from
 * Tensor.data_ptr(), checked by the Python side (dtypes, sizes, contiguity).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLORA_X86 1
#endif

#include "matvec.h"

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };

/* Below this many weight elements one thread beats waking the pool. */
static const int64_t PARALLEL_MIN_ELEMENTS = 1 << 17;
/* Output rows decoded together (the AVX-512 tile's weight rows; AVX2 and scalar take them in
 * pairs / one by one). */
enum { ROW_GROUP = 4 };
/* Input rows up to which 4-bit codes on AVX-512 are decoded in registers (no row buffer):
 * beyond, the FMAs dominate (8 per decoded vector at M = 8) and the row-buffer kernel's 4 x 4
 * tiles are as fast (measured: benchmarks/bench_matvec.py). */
enum { FUSED4_MAX_ROWS = 4 };
/* Row groups per OpenMP grab (dynamic: a thread that loses its core on a shared machine does
 * not hold up the others for a whole static half). */
enum { ROWS_PER_GRAB = 8 };


/* Which 8-bit codebook this is, for a decode without a gather (slow on every x86 we have):
 * 1: exactly the int8 kind's (i - 128) / 127 (float32 division, as codebooks.py builds it):
 *    a code is one vector division, bit for bit the table's value;
 * 2: exactly i - 128 (integer codes: quant/lossless.py): a conversion, no division;
 * 0: anything else (gather). */
static int int8_affine_mode(const float *code) {
    int scaled = 1, integer = 1;
    for (int i = 0; i < 256; i++) {
        volatile float expect = (float)(i - 128) / 127.0f;
        if (code[i] != expect) scaled = 0;
        if (code[i] != (float)(i - 128)) integer = 0;
    }
    return scaled ? 1 : integer ? 2 : 0;
}

/* The float32 scale of block `blk`, exactly as blockwise.dequantize_absmax forms it: with
 * double quantization (code * nested scale) + offset, two roundings (the module is built
 * with -std=c11, so no FMA contraction). */
static inline float block_scale(const Problem *p, int64_t blk) {
    if (p->absmax != NULL) return p->absmax[blk];
    /* a shift, not a 64-bit division: this runs once per block */
    const int64_t outer = p->nested_shift >= 0 ? blk >> p->nested_shift : blk / p->nested_blocksize;
    const float v = p->nested_code[p->absmax_codes[blk]] * p->nested_absmax[outer];
    return v + p->offset;
}

/* ---- scalar path: decode a row through a byte table, plain dot products ---------------- */

/* table[b][j] = code of the j-th element of byte b (first element in the high bits) */
static void build_table(const float *code, int bits, float table[256][8]) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < per; j++) table[b][j] = code[(b >> (8 - bits * (j + 1))) & mask];
}

static void decode_row_scalar(const Problem *p, int64_t row, const float table[256][8],
                              float *w) {
    const int per = 8 / p->bits;
    const int64_t nb = p->in / p->blocksize;
    const uint8_t *q = p->packed + row * p->in / per;
    for (int64_t b = 0; b < nb; b++) {
        const float scale = block_scale(p, row * nb + b);
        for (int64_t i = b * p->blocksize; i < (b + 1) * p->blocksize; i++)
            w[i] = table[q[i / per]][i % per] * scale;
    }
}

static void rows_scalar(const Problem *p, int64_t r0, int64_t r1, float *w,
                        const float table[256][8]) {
    for (int64_t r = r0; r < r1; r++) {
        decode_row_scalar(p, r, table, w);
        for (int64_t i = 0; i < p->m; i++) {
            const float *xi = p->x + i * p->in;
            float acc = 0.0f;
            for (int64_t k = 0; k < p->in; k++) acc += w[k] * xi[k];
            p->y[i * p->out + r] = acc;
        }
    }
}

#ifdef QLORA_X86
/* ---- AVX2 + FMA path ------------------------------------------------------------------- */

#define AVX2 __attribute__((target("avx2,fma")))

/* one block of codes -> `blocksize` float32 weights code[c] * scale, 8 at a time */
AVX2 static inline __attribute__((always_inline)) void
decode_block_avx2(const Problem *p, const uint8_t *q, float scale, float *w, const int bits) {
    const __m256 s = _mm256_set1_ps(scale);
    const int64_t bs = p->blocksize;
    if (bits == 4) {
        /* the codebook times the scale: the same single products as code[c] * scale */
        const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(p->code), s);
        const __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(p->code + 8), s);
        /* element j of 4 bytes (first in the high nibble of byte 0) sits at bit 28 - 4j of
         * the byte-swapped word */
        const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
        const __m256i nib = _mm256_set1_epi32(15);
        for (int64_t k = 0; k < bs; k += 8) {
            uint32_t word;
            memcpy(&word, q + k / 2, 4);
            const __m256i idx = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32((int)__builtin_bswap32(word)), shifts), nib);
            const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
            const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
            /* index bit 3 moved to the sign bit picks the upper half of the codebook */
            const __m256 v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
            _mm256_storeu_ps(w + k, v);
        }
    } else if (bits == 2) {
        /* the 4 codes in lanes 0-3 (indices never exceed 3; a masked load, not a copy through
         * a stack array, which stalls on store forwarding once per block) */
        const __m256 table = _mm256_mul_ps(
            _mm256_maskload_ps(p->code, _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0)), s);
        const __m256i shifts = _mm256_setr_epi32(14, 12, 10, 8, 6, 4, 2, 0);
        const __m256i two = _mm256_set1_epi32(3);
        for (int64_t k = 0; k < bs; k += 8) {
            const int half = (q[k / 4] << 8) | q[k / 4 + 1]; /* 8 codes, first in bits 15-14 */
            const __m256i idx =
                _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(half), shifts), two);
            _mm256_storeu_ps(w + k, _mm256_permutevar8x32_ps(table, idx));
        }
    } else if (p->int8_affine == 1) { /* 8-bit, (i - 128) / 127: convert, divide, scale */
        const __m256i bias = _mm256_set1_epi32(128);
        const __m256 d = _mm256_set1_ps(127.0f);
        for (int64_t k = 0; k < bs; k += 8) {
            const __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            const __m256 c = _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i, bias)), d);
            _mm256_storeu_ps(w + k, _mm256_mul_ps(c, s));
        }
    } else if (p->int8_affine == 2) { /* 8-bit, i - 128: convert, scale */
        const __m256i bias = _mm256_set1_epi32(128);
        for (int64_t k = 0; k < bs; k += 8) {
            const __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            const __m256 c = _mm256_cvtepi32_ps(_mm256_sub_epi32(i, bias));
            _mm256_storeu_ps(w + k, _mm256_mul_ps(c, s));
        }
    } else { /* 8-bit: gather from the 256-entry codebook */
        for (int64_t k = 0; k < bs; k += 8) {
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            _mm256_storeu_ps(w + k, _mm256_mul_ps(_mm256_i32gather_ps(p->code, idx, 4), s));
        }
    }
}

AVX2 static void decode_row_avx2(const Problem *p, int64_t row, float *w) {
    const int64_t nb = p->in / p->blocksize, block_bytes = p->blocksize * p->bits / 8;
    const uint8_t *q = p->packed + row * nb * block_bytes;
    /* one branch on the width per row, not per block: each case is its own inlined loop */
#define LOOP(bits)                                                                          \
    for (int64_t b = 0; b < nb; b++)                                                        \
        decode_block_avx2(p, q + b * block_bytes, block_scale(p, row * nb + b), w + b * p->blocksize, \
                          bits);
    if (p->bits == 4) {
        LOOP(4)
    } else if (p->bits == 2) {
        LOOP(2)
    } else {
        LOOP(8)
    }
#undef LOOP
}

AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[i0 .. i0+T, r .. r+R] from weight rows w0 (and w1 when R == 2); T, R constants after
 * inlining, so the 2 x T accumulators live in registers */
AVX2 static inline __attribute__((always_inline)) void
tile_avx2(const Problem *p, const float *w0, const float *w1, int64_t r, int64_t i0, int T,
          int R) {
    __m256 acc[2][4];
    for (int t = 0; t < 4; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    const float *x = p->x + i0 * p->in;
    for (int64_t k = 0; k < p->in; k += 8) {
        const __m256 a = _mm256_loadu_ps(w0 + k);
        const __m256 b = R == 2 ? _mm256_loadu_ps(w1 + k) : a;
        for (int t = 0; t < T; t++) {
            const __m256 xv = _mm256_loadu_ps(x + t * p->in + k);
            acc[0][t] = _mm256_fmadd_ps(a, xv, acc[0][t]);
            if (R == 2) acc[1][t] = _mm256_fmadd_ps(b, xv, acc[1][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        p->y[(i0 + t) * p->out + r] = hsum_avx2(acc[0][t]);
        if (R == 2) p->y[(i0 + t) * p->out + r + 1] = hsum_avx2(acc[1][t]);
    }
}

AVX2 static void rows_avx2(const Problem *p, int64_t r0, int64_t r1, float *w) {
    for (int64_t r = r0; r < r1; r += 2) {
        const int two = r + 1 < r1;
        decode_row_avx2(p, r, w);
        if (two) decode_row_avx2(p, r + 1, w + p->in);
        for (int64_t i = 0; i < p->m; i += 4) {
            const int64_t T = p->m - i < 4 ? p->m - i : 4;
#define CASE(t)                                        \
    case t:                                            \
        if (two)                                       \
            tile_avx2(p, w, w + p->in, r, i, t, 2);    \
        else                                           \
            tile_avx2(p, w, w, r, i, t, 1);            \
        break;
            switch (T) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
        }
    }
}

/* ---- AVX-512F path ------------------------------------------------------------------------ */

#define AVX512 __attribute__((target("avx512f,avx2,fma")))

AVX512 static inline __attribute__((always_inline)) void
decode_block_avx512(const Problem *p, const uint8_t *q, float scale, float *w, const int bits) {
    const __m512 s = _mm512_set1_ps(scale);
    const int64_t bs = p->blocksize;
    if (bits == 4) {
        /* all 16 codes times the scale in one register (the same products as code[c] * scale) */
        const __m512 book = _mm512_mul_ps(_mm512_loadu_ps(p->code), s);
        const __m128i nib = _mm_set1_epi8(0x0f);
        for (int64_t k = 0; k < bs; k += 32) { /* 16 bytes -> 32 weights */
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + k / 2));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
            const __m128i lo = _mm_and_si128(raw, nib);
            /* interleave high then low nibble of each byte: the codes in element order */
            const __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
            const __m512i i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
            _mm512_storeu_ps(w + k, _mm512_permutexvar_ps(i0, book));
            _mm512_storeu_ps(w + k + 16, _mm512_permutexvar_ps(i1, book));
        }
    } else if (bits == 2) {
        const __m512 table = _mm512_mul_ps(_mm512_maskz_loadu_ps(0x000f, p->code), s);
        const __m512i shifts =
            _mm512_setr_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i two = _mm512_set1_epi32(3);
        for (int64_t k = 0; k < bs; k += 16) {
            uint32_t word; /* 16 codes, first in bits 31-30 after the byte swap */
            memcpy(&word, q + k / 4, 4);
            const __m512i v = _mm512_set1_epi32((int)__builtin_bswap32(word));
            const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), two);
            _mm512_storeu_ps(w + k, _mm512_permutexvar_ps(idx, table));
        }
    } else if (p->int8_affine == 1) { /* 8-bit, (i - 128) / 127: convert, divide, scale */
        const __m512i bias = _mm512_set1_epi32(128);
        const __m512 d = _mm512_set1_ps(127.0f);
        for (int64_t k = 0; k < bs; k += 16) {
            const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k)));
            const __m512 c = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i, bias)), d);
            _mm512_storeu_ps(w + k, _mm512_mul_ps(c, s));
        }
    } else if (p->int8_affine == 2) { /* 8-bit, i - 128: convert, scale */
        const __m512i bias = _mm512_set1_epi32(128);
        for (int64_t k = 0; k < bs; k += 16) {
            const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k)));
            const __m512 c = _mm512_cvtepi32_ps(_mm512_sub_epi32(i, bias));
            _mm512_storeu_ps(w + k, _mm512_mul_ps(c, s));
        }
    } else {
        for (int64_t k = 0; k < bs; k += 16) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k)));
            _mm512_storeu_ps(w + k, _mm512_mul_ps(_mm512_i32gather_ps(idx, p->code, 4), s));
        }
    }
}

/* blocks [b0, b1) of weight row `row` -> w[0 .. (b1 - b0) * blocksize) */
AVX512 static void decode_blocks_avx512(const Problem *p, int64_t row, int64_t b0, int64_t b1,
                                        float *w) {
    const int64_t nb = p->in / p->blocksize, block_bytes = p->blocksize * p->bits / 8;
    const uint8_t *q = p->packed + row * nb * block_bytes;
    /* one branch on the width per call, not per block: each case is its own inlined loop */
#define LOOP(bits)                                                                       \
    for (int64_t b = b0; b < b1; b++)                                                    \
        decode_block_avx512(p, q + b * block_bytes, block_scale(p, row * nb + b),        \
                            w + (b - b0) * p->blocksize, bits);
    if (p->bits == 4) {
        LOOP(4)
    } else if (p->bits == 2) {
        LOOP(2)
    } else {
        LOOP(8)
    }
#undef LOOP
}

/* y[i0 .. i0+T, r .. r+R] (+)= the dot products over columns [k0, k0 + len) of the R decoded
 * weight chunks w + j * len and the T input rows; T, R constants after inlining: R x T
 * accumulators in registers (at most 16 of the 32 zmm), so each x load feeds R FMAs and each
 * weight load T. `add`: accumulate into y (a later column chunk) instead of storing. */
AVX512 static inline __attribute__((always_inline)) void
tile_avx512(const Problem *p, const float *w, int64_t len, int64_t r, int64_t i0, int64_t k0,
            int add, int T, int R) {
    __m512 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int t = 0; t < 4; t++) acc[j][t] = _mm512_setzero_ps();
    const float *x = p->x + i0 * p->in + k0;
    /* len is whole blocks, a multiple of 32 (blocksize >= 32): no tail */
    for (int64_t k = 0; k < len; k += 16) {
        __m512 wv[4];
        for (int j = 0; j < R; j++) wv[j] = _mm512_loadu_ps(w + j * len + k);
        for (int t = 0; t < T; t++) {
            const __m512 xv = _mm512_loadu_ps(x + t * p->in + k);
            for (int j = 0; j < R; j++) acc[j][t] = _mm512_fmadd_ps(wv[j], xv, acc[j][t]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int j = 0; j < R; j++) {
            float *dst = p->y + (i0 + t) * p->out + r + j;
            const float v = _mm512_reduce_add_ps(acc[j][t]);
            *dst = add ? *dst + v : v;
        }
}

/* Columns per decoded chunk: ROW_GROUP rows x 1024 floats = 16 KiB stay in L1 between the
 * decode and the FMAs (whole rows of a 4096-wide weight, 64 KiB, spill to L2). */
enum { COLUMN_CHUNK = 1024 };

/* rows [r0, r1) of y, at most ROW_GROUP of them: per column chunk, decode the rows' blocks,
 * then tiles over the input rows */
AVX512 static void rows_avx512(const Problem *p, int64_t r0, int64_t r1, float *w) {
    const int R = (int)(r1 - r0);
    const int64_t nb = p->in / p->blocksize;
    const int64_t chunk = p->blocksize >= COLUMN_CHUNK ? 1 : COLUMN_CHUNK / p->blocksize;
    for (int64_t b0 = 0; b0 < nb; b0 += chunk) {
        const int64_t b1 = b0 + chunk < nb ? b0 + chunk : nb;
        const int64_t len = (b1 - b0) * p->blocksize, k0 = b0 * p->blocksize;
        for (int j = 0; j < R; j++) decode_blocks_avx512(p, r0 + j, b0, b1, w + j * len);
        for (int64_t i = 0; i < p->m; i += 4) {
            const int T = p->m - i < 4 ? (int)(p->m - i) : 4;
            /* every (R, T) pair its own unrolled copy */
#define CASE(rr, tt) \
    case (rr) * 8 + (tt): tile_avx512(p, w, len, r0, i, k0, b0 > 0, tt, rr); break;
            switch (R * 8 + T) {
                CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
                CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
                CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4)
                CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
            }
#undef CASE
        }
    }
}

/* ---- AVX-512F, 4-bit codes: decoded into registers, no row buffer -------------------------- */

/* A 64-byte load of codes is a chunk of 128 weights: dword l holds elements 8l .. 8l+7 (element
 * 8l in the high nibble of its lowest byte). vpermps reads only the low 4 bits of each index,
 * so sub-vector s of the chunk is looked up straight from (dwords >> 4s), no mask, no widening:
 * its lane l is element 8l + (s ^ 1). x is permuted into that order once per call (`xp`), so
 * the FMAs read it contiguously: per 16 weights one lookup, one shift, one FMA. */
enum { CHUNK = 128 };
/* How far ahead of its loads the kernel asks for codes. Decoding reads each layer's codes once
 * per token, from DRAM, where the kernel was latency-bound: 576x576 at M = 1, 1 thread, cycling
 * through 50 MB of weight copies took 56-65 us per call with the row-buffer kernel, 45-60 us
 * with the register decode alone, 29-31 us with this prefetch 4 KB ahead (1 or 8 KB: ~40 us).
 * In cache it costs nothing (4096x4096, 8 MB, L3: 1007 -> 833 us). */
enum { PREFETCH_BYTES = 4096 };

typedef struct {
    const float *xp;           /* [m, in_pad]: x in decode order, zero past `in` */
    const int32_t *lane_block; /* [nchunks, 16]: block of chunk c's lane l, minus base[c] */
    const int32_t *base;       /* [nchunks]: the first block chunk c touches */
    const int32_t *nscales;    /* [nchunks]: blocks of the row from base[c] on, at most 16 */
    int64_t in_pad, nchunks;
    __mmask16 tail; /* valid lanes of the last chunk (in % 128 / 8 of them, or all) */
} Prep4;

/* xp and the lane tables, in the calling thread before the parallel region: O(m * in), one
 * gather per 16 floats (lane l of sub-vector s reads x[8l + (s ^ 1)]) */
AVX512 static void prepare4(const Problem *p, float *xp, int32_t *lane_block, Prep4 *q) {
    const int64_t nchunks = (p->in + CHUNK - 1) / CHUNK, in_pad = nchunks * CHUNK;
    const int64_t nb = p->in / p->blocksize;
    const int64_t rest = p->in - (nchunks - 1) * CHUNK; /* 32 .. 128, a multiple of 32 */
    const __mmask16 tail = (__mmask16)(rest == CHUNK ? 0xffff : (1u << (rest / 8)) - 1);
    const __m512i lanes8 = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96,
                                             104, 112, 120);
    for (int64_t t = 0; t < p->m; t++) {
        const float *x = p->x + t * p->in;
        float *dst = xp + t * in_pad;
        for (int64_t c = 0; c < nchunks; c++) {
            const __mmask16 valid = c + 1 < nchunks ? (__mmask16)0xffff : tail;
            for (int s = 0; s < 8; s++) {
                const __m512i idx = _mm512_add_epi32(lanes8, _mm512_set1_epi32(s ^ 1));
                /* masked-off lanes read nothing and stay zero */
                _mm512_storeu_ps(dst + c * CHUNK + 16 * s,
                                 _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx,
                                                          x + c * CHUNK, 4));
            }
        }
    }
    int32_t *base = lane_block + nchunks * 16, *nscales = base + nchunks;
    for (int64_t c = 0; c < nchunks; c++) {
        base[c] = (int32_t)(c * CHUNK / p->blocksize);
        nscales[c] = (int32_t)(nb - base[c] < 16 ? nb - base[c] : 16);
        for (int l = 0; l < 16; l++) {
            const int64_t k = c * CHUNK + 8 * l; /* a lane past the row: masked off */
            lane_block[c * 16 + l] = (int32_t)(k < p->in ? k / p->blocksize - base[c] : 0);
        }
    }
    *q = (Prep4){xp, lane_block, base, nscales, in_pad, nchunks, tail};
}

/* y[0 .. T, r .. r+R] = rows r .. r+R of W against the T rows of xp. Per chunk and row: the
 * lanes' block scales (one permute of the row's scales: a chunk spans at most 4 blocks of 32),
 * then 8 sub-vectors looked up from the codebook and summed into `part` (c_k * x_k, FMA), then
 * acc += part * scale: the block scale once per 8 products of a lane, not once per weight (all
 * 8 of a lane's columns lie in one block: blocks are multiples of 32 columns). 2 x R x T
 * accumulators, so each x load feeds R FMAs. T, R constants after inlining. */
AVX512 static inline __attribute__((always_inline)) void
tile4_avx512(const Problem *p, const Prep4 *q, const float *scales, int64_t r, int T, int R) {
    const __m512 book = _mm512_loadu_ps(p->code);
    const int64_t row_bytes = p->in / 2, nb = p->in / p->blocksize;
    const uint8_t *codes = p->packed + r * row_bytes;
    const float *x = q->xp;
    __m512 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int t = 0; t < 4; t++) acc[j][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < q->nchunks; c++) {
        const __mmask16 valid = c + 1 < q->nchunks ? (__mmask16)0xffff : q->tail;
        const __m512i lanes = _mm512_loadu_si512(q->lane_block + c * 16);
        __m512i v[4];
        __m512 sv[4];
        for (int j = 0; j < R; j++) {
            const uint8_t *line = codes + j * row_bytes + c * (CHUNK / 2);
            v[j] = _mm512_maskz_loadu_epi32(valid, line);
            /* rows are consecutive in memory, so this is the rows after the group: a hint
             * (never faults) that keeps DRAM busy while the lookups run */
            _mm_prefetch((const char *)line + PREFETCH_BYTES, _MM_HINT_T0);
            /* the row's scales from base[c] on (never past its last block), one per lane;
             * lanes past the row get 0 (their codes and x are 0 too) */
            const __m512 row_scales = _mm512_maskz_loadu_ps(
                (__mmask16)((1u << q->nscales[c]) - 1), scales + j * nb + q->base[c]);
            sv[j] = _mm512_maskz_permutexvar_ps(valid, lanes, row_scales);
        }
        const float *xc = x + c * CHUNK;
        __m512 part[4][4];
        for (int j = 0; j < 4; j++)
            for (int t = 0; t < 4; t++) part[j][t] = _mm512_setzero_ps();
        for (int s = 0; s < 8; s++) {
            for (int j = 0; j < R; j++) {
                const __m512 w = _mm512_permutexvar_ps(v[j], book);
                v[j] = _mm512_srli_epi32(v[j], 4);
                for (int t = 0; t < T; t++)
                    part[j][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + t * q->in_pad + 16 * s),
                                                part[j][t]);
            }
        }
        for (int j = 0; j < R; j++)
            for (int t = 0; t < T; t++) acc[j][t] = _mm512_fmadd_ps(part[j][t], sv[j], acc[j][t]);
    }
    for (int t = 0; t < T; t++)
        for (int j = 0; j < R; j++)
            p->y[t * p->out + r + j] = _mm512_reduce_add_ps(acc[j][t]);
}

/* rows [r0, r1) of y, at most ROW_GROUP: their scales (the stored absmax, or double-quantized
 * ones decoded into `scratch`), then tiles over x */
AVX512 static void rows4_avx512(const Problem *p, const Prep4 *q, int64_t r0, int64_t r1,
                                float *scratch) {
    const int R = (int)(r1 - r0);
    const int64_t nb = p->in / p->blocksize;
    const float *scales = p->absmax != NULL ? p->absmax + r0 * nb : scratch; /* [R, nb] */
    if (p->absmax == NULL) /* scalar: as fast as gathers or permutes of the 256-entry code */
        for (int64_t b = 0; b < R * nb; b++) scratch[b] = block_scale(p, r0 * nb + b);
    const int T = (int)p->m; /* 1 .. FUSED4_MAX_ROWS */
    int j = 0;
#define CASE(rr, tt) \
    case (rr) * 8 + (tt): tile4_avx512(p, q, scales + j * nb, r0 + j, tt, rr); break;
    if (T <= 2) { /* the whole group in one pass over its codes: 2 x R x T accumulators */
        switch (R * 8 + T) {
            CASE(1, 1) CASE(1, 2) CASE(2, 1) CASE(2, 2)
            CASE(3, 1) CASE(3, 2) CASE(4, 1) CASE(4, 2)
        }
        return;
    }
    for (; j < R; j += 2) /* 3 or 4 input rows: pairs of weight rows (32 zmm would spill) */
        switch ((R - j >= 2 ? 2 : 1) * 8 + T) {
            CASE(1, 3) CASE(1, 4) CASE(2, 3) CASE(2, 4)
        }
#undef CASE
}

#endif

static int best_path(void) {
#ifdef QLORA_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f"))
            cached = PATH_AVX512;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            cached = PATH_AVX2;
        else
            cached = PATH_SCALAR;
    }
    return cached;
#else
    return PATH_SCALAR;
#endif
}

static const char *PATH_NAMES[] = {"scalar", "avx2", "avx512"};

/* A thread's scratch, at least `bytes`, 64-byte aligned. Kept per thread (OpenMP's threads
 * persist) and grown, never shrunk: allocating per call would mmap/munmap it every token once
 * it passes glibc's mmap threshold (in > 8192). Two of them: `row_buffer` for the decoded rows
 * or the scales of a row group (every thread), `prep_buffer` for x in decode order and the
 * lane tables (the calling thread, read by all). */
typedef struct {
    void *data;
    size_t bytes;
} Scratch;
static _Thread_local Scratch row_buffer = {NULL, 0};
#ifdef QLORA_X86
static _Thread_local Scratch prep_buffer = {NULL, 0};
#endif

static void *grow(Scratch *s, size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > s->bytes) {
        free(s->data);
        s->data = aligned_alloc(64, bytes);
        s->bytes = s->data != NULL ? bytes : 0;
    }
    return s->data;
}

/* Whether the register-decoding 4-bit AVX-512 kernel runs (else the row-buffer one). */
static int use_fused4(const Problem *p, int path) {
    return path == PATH_AVX512 && p->bits == 4 && p->m <= FUSED4_MAX_ROWS;
}

/* Returns 0, or -1 when a thread could not get its scratch. */
static int run(const Problem *p, int path, int nthreads) {
    float table[256][8];
    if (path == PATH_SCALAR) build_table(p->code, p->bits, table);
    const int fused4 = use_fused4(p, path);
#ifdef QLORA_X86
    Prep4 prep;
    if (fused4) {
        const int64_t nchunks = (p->in + CHUNK - 1) / CHUNK;
        /* xp [m, nchunks * 128] floats, then lane_block [nchunks, 16], base, nscales */
        char *buf = grow(&prep_buffer, (size_t)(p->m * nchunks * CHUNK * 4 + nchunks * 18 * 4));
        if (buf == NULL) return -1;
        float *xp = (float *)buf;
        prepare4(p, xp, (int32_t *)(xp + p->m * nchunks * CHUNK), &prep);
    }
#endif
    /* per thread: ROW_GROUP decoded weight rows, or ROW_GROUP rows' decoded scales */
    const size_t bytes = (size_t)(fused4 ? ROW_GROUP * (p->in / p->blocksize) * 4
                                         : ROW_GROUP * p->in * 4);
    const int64_t groups = (p->out + ROW_GROUP - 1) / ROW_GROUP;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *w = grow(&row_buffer, bytes);
        if (w == NULL) failed = 1;
#pragma omp for schedule(dynamic, ROWS_PER_GRAB)
        for (int64_t g = 0; g < groups; g++) {
            if (w == NULL) continue;
            const int64_t r0 = ROW_GROUP * g;
            const int64_t r1 = r0 + ROW_GROUP < p->out ? r0 + ROW_GROUP : p->out;
#ifdef QLORA_X86
            if (fused4)
                rows4_avx512(p, &prep, r0, r1, w);
            else if (path == PATH_AVX512)
                rows_avx512(p, r0, r1, w);
            else if (path == PATH_AVX2)
                rows_avx2(p, r0, r1, w);
            else
#endif
                rows_scalar(p, r0, r1, w, (const float(*)[8])table);
        }
    }
    return failed ? -1 : 0;
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, packed, absmax, code, y, absmax_codes = 0, nested_code = 0,
                                                     nested_absmax = 0;
    long long m, out, in, blocksize, nested_blocksize = 0;
    int bits, nthreads, path = -1;
    float offset = 0.0f;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLii|iKKKfL", &x, &packed, &absmax, &code, &y, &m, &out,
                          &in, &blocksize, &bits, &nthreads, &path, &absmax_codes, &nested_code,
                          &nested_absmax, &offset, &nested_blocksize))
        return NULL;
    if (absmax == 0 && (absmax_codes == 0 || nested_code == 0 || nested_absmax == 0 ||
                        nested_blocksize <= 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "matvec: absmax 0 needs absmax_codes, nested_code, nested_absmax and "
                        "nested_blocksize > 0 (double quantization)");
        return NULL;
    }
    if (bits != 2 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits must be 2, 4 or 8, got %d", bits);
        return NULL;
    }
    if (m < 0 || out < 0 || in <= 0 || blocksize < 32 || blocksize % 32 || in % blocksize) {
        PyErr_SetString(PyExc_ValueError,
                        "matvec needs in > 0 a multiple of blocksize, blocksize a multiple of 32");
        return NULL;
    }
    const int best = best_path();
    if (path < 0) path = best;
    if (path > best) {
        PyErr_Format(PyExc_ValueError, "path %d is not supported on this CPU (best: %s)", path,
                     PATH_NAMES[best]);
        return NULL;
    }
    if (m == 0 || out == 0) Py_RETURN_NONE;
    if (nthreads < 1 || out * in < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    const Problem p = {(const float *)x,
                       (const uint8_t *)packed,
                       absmax ? (const float *)absmax : NULL,
                       (const uint8_t *)absmax_codes,
                       (const float *)nested_code,
                       (const float *)nested_absmax,
                       offset,
                       nested_blocksize,
                       nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0
                           ? __builtin_ctzll((unsigned long long)nested_blocksize)
                           : -1,
                       (const float *)code,
                       (float *)y,
                       m,
                       out,
                       in,
                       blocksize,
                       bits,
                       bits == 8 ? int8_affine_mode((const float *)code) : 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = run(&p, path, nthreads);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static int api_matmul(Problem p, int nthreads) {
    if (p.m == 0 || p.out == 0) return 0;
    p.nested_shift = p.nested_blocksize > 0 && (p.nested_blocksize & (p.nested_blocksize - 1)) == 0
                         ? __builtin_ctzll((unsigned long long)p.nested_blocksize)
                         : -1;
    p.int8_affine = p.bits == 8 ? int8_affine_mode(p.code) : 0;
    if (nthreads < 1 || p.out * p.in < PARALLEL_MIN_ELEMENTS) nthreads = 1;
    return run(&p, best_path(), nthreads);
}

static const MatvecApi api = {QLORA_MATVEC_API_VERSION, api_matmul};

static PyObject *py_best_path(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(PATH_NAMES[best_path()]);
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(x, packed, absmax, code, y, m, out, in, blocksize, bits, nthreads[, path, "
     "absmax_codes, nested_code, nested_absmax, offset, nested_blocksize]): raw pointers; "
     "y[m, out] = x[m, in] @ deq(W)^T in float32; path -1 best, 0 scalar, 1 avx2, 2 avx512; "
     "absmax 0 with the nested pointers: double quantization decoded in the kernel"},
    {"best_path", py_best_path, METH_NOARGS, "the path used on this CPU: scalar, avx2, avx512"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_matvec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__matvec(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *capsule = PyCapsule_New((void *)&api, QLORA_MATVEC_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
