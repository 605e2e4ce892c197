/* float32 -> IEEE binary16, shared by the C kernels (cpu.c, gguf.c) so that every 16-bit output
 * rounds the same way torch's .to(torch.float16) does: nearest even, with subnormals, inf and
 * NaN. Header-only (static inline): each extension is compiled on its own. */
#ifndef QLORA_HALF_H
#define QLORA_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint16_t qlora_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                   /* result is subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;          /* < 2^-25: rounds to zero */
        const uint32_t exp = ax >> 23;
        const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - exp; /* value = mant * 2^(exp - 150) */
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        const uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half += 1;
        return (uint16_t)(sign | half);
    }
    uint32_t out = (ax >> 13) - (112u << 10);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out += 1;
    return (uint16_t)(sign | out);
}

#endif
