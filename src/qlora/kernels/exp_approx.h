/*
 * exp(x) for float32 loops that must vectorize: shared by decode.c (softmax, SiLU) and ops.c
 * (the training SwiGLU). Header-only: each extension compiles it into its own loops.
 */
#ifndef QLORA_EXP_APPROX_H
#define QLORA_EXP_APPROX_H

#include <stdint.h>

/* exp(x) in float32 within ~1 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-7
 * polynomial for exp(r), times 2^n by the exponent bits), written so that a loop of it
 * vectorizes (glibc's expf is a call per element: at 12k SiLUs per token that alone cost
 * more than the rest of this file). Inputs are clamped to [-87.3, 88.7]: exp of anything
 * below is ~1e-38 instead of 0, which no sum here can tell apart. */
static inline float exp_approx(float x) {
    x = x > 88.7f ? 88.7f : (x < -87.3f ? -87.3f : x);
    const float shifted = x * 1.44269504088896341f + 12582912.0f; /* round(x / ln 2) + 1.5*2^23 */
    const float n = shifted - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

#endif
