/*
 * The fused dequantize + skinny matmul kernel of _matvec (matvec.c), as other extensions call
 * it from C: the problem it solves, and the function table _matvec exports in a capsule
 * (qlora.kernels._matvec._C_API), which _decode (decode.c) imports to run a decode step's
 * projections without going back to Python between them.
 */
#ifndef QLORA_MATVEC_H
#define QLORA_MATVEC_H

#include <stdint.h>

/* y[m, out] = x[m, in] @ deq(W)^T: W's blockwise k-bit codes and scales (QuantState layout). */
typedef struct {
    const float *x;        /* [m, in] */
    const uint8_t *packed; /* codes of W [out, in] */
    const float *absmax;   /* [out * in / blocksize], or NULL with double quantization: */
    const uint8_t *absmax_codes;  /* [nblocks] codes into nested_code */
    const float *nested_code;     /* [256] */
    const float *nested_absmax;   /* [ceil(nblocks / nested_blocksize)] */
    float offset;
    int64_t nested_blocksize;
    int nested_shift; /* log2(nested_blocksize) when a power of two (256 always), else -1 */
    const float *code;     /* [2^bits] */
    float *y;              /* [m, out] */
    int64_t m, out, in, blocksize;
    int bits;
    int int8_affine; /* int8_affine_mode(code) for 8-bit codes: 1, 2 or 0 (gather) */
} Problem;

#define QLORA_MATVEC_CAPSULE "qlora.kernels._matvec._C_API"
#define QLORA_MATVEC_API_VERSION 1

typedef struct {
    int version; /* QLORA_MATVEC_API_VERSION */
    /* Solves p on this CPU's best path with up to nthreads threads (fewer for small W);
     * fills p's nested_shift and int8_affine itself. Returns 0, or -1 out of memory. Call
     * without the GIL or with it: it touches no Python object. */
    int (*matmul)(Problem p, int nthreads);
} MatvecApi;

#endif
