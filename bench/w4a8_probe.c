/* Probe (bench/w4a8_probe.py): 4-bit weights times int8 inputs with AVX-512 VNNI.

   Each row's inputs are rounded to int8 per group of 32 (scale = the group's largest
   magnitude / 127), as llama.cpp does for its 4-bit formats; vpdpbusd multiplies the
   4-bit values (unsigned bytes) by them, 64 products a instruction, summed exactly in
   int32. Per group:  y += xs * (scale * sum(q * xq) + (zero - 8 scale) * sum(xq)).
   Every row's float operations are the same whatever the other rows: batch-invariant.

   Layouts:
     words:  [N/16][K/32][4][64] bytes; byte 4 l + i of (block b, group g, part t) holds
             q[16 b + l][32 g + 8 t + i] in its low nibble, q[16 b + l][32 g + 8 t + 4 + i]
             in its high one.
     scales: [N/16][K/32][2][16] bf16 as deployments/engines/int4_kernel.c's. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 bf16x16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline float bf16_value(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define TILE(NB, NR)                                                                          \
static void tile_##NB##_##NR(const uint8_t *words, const uint16_t *scales, const int8_t *xq,   \
                             const float *xs, const float *xsq, long K, uint16_t *y, long N,  \
                             long blk0) {                                                     \
    const long G = K / 32;                                                                    \
    const __m512i nibble = _mm512_set1_epi8(0x0F);                                            \
    const __m512 minus8 = _mm512_set1_ps(-8.0f);                                              \
    __m512 acc[NB][NR];                                                                       \
    for (int b = 0; b < NB; b++)                                                              \
        for (int r = 0; r < NR; r++) acc[b][r] = _mm512_setzero_ps();                         \
    for (long g = 0; g < G; g++) {                                                            \
        __m512i isum[NB][NR];                                                                 \
        for (int b = 0; b < NB; b++)                                                          \
            for (int r = 0; r < NR; r++) isum[b][r] = _mm512_setzero_si512();                 \
        for (int t = 0; t < 4; t++) {                                                         \
            __m512i xlo[NR], xhi[NR];                                                         \
            for (int r = 0; r < NR; r++) {                                                    \
                int32_t lo, hi;                                                               \
                memcpy(&lo, xq + r * K + g * 32 + 8 * t, 4);                                  \
                memcpy(&hi, xq + r * K + g * 32 + 8 * t + 4, 4);                              \
                xlo[r] = _mm512_set1_epi32(lo);                                               \
                xhi[r] = _mm512_set1_epi32(hi);                                               \
            }                                                                                 \
            for (int b = 0; b < NB; b++) {                                                    \
                __m512i raw = _mm512_loadu_si512((const void *)(words + (((blk0 + b) * G + g) * 4 + t) * 64)); \
                __m512i lo = _mm512_and_si512(raw, nibble);                                   \
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);             \
                for (int r = 0; r < NR; r++) {                                                \
                    isum[b][r] = _mm512_dpbusd_epi32(isum[b][r], lo, xlo[r]);                 \
                    isum[b][r] = _mm512_dpbusd_epi32(isum[b][r], hi, xhi[r]);                 \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int b = 0; b < NB; b++) {                                                        \
            const uint16_t *sz = scales + ((blk0 + b) * G + g) * 32;                          \
            __m512 scale = bf16x16(sz), shifted = _mm512_fmadd_ps(minus8, scale, bf16x16(sz + 16)); \
            for (int r = 0; r < NR; r++) {                                                    \
                __m512 t = _mm512_fmadd_ps(shifted, _mm512_set1_ps(xsq[r * G + g]),           \
                                           _mm512_mul_ps(scale, _mm512_cvtepi32_ps(isum[b][r]))); \
                acc[b][r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * G + g]), t, acc[b][r]);     \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (int b = 0; b < NB; b++)                                                              \
        for (int r = 0; r < NR; r++)                                                          \
            _mm256_storeu_si256((__m256i *)(y + r * N + (blk0 + b) * 16),                     \
                                (__m256i)_mm512_cvtneps_pbh(acc[b][r]));                      \
}

TILE(4, 1)
TILE(1, 1)
TILE(2, 2)
TILE(1, 2)
TILE(1, 4)
TILE(1, 8)

/* x: [R][K] bf16, y: [R][N] bf16; K a multiple of 32, N of 16; one thread. */
int probe_w4a8_mm(const uint8_t *words, const uint16_t *scales, const uint16_t *x, long R, long K,
                  long N, uint16_t *y) {
    const long G = K / 32, nblk = N / 16;
    int8_t *xq = malloc((size_t)(R * K > 0 ? R * K : 1));
    float *xs = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    float *xsq = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    if (xq == NULL || xs == NULL || xsq == NULL) { free(xq); free(xs); free(xsq); return -1; }
    for (long r = 0; r < R; r++)
        for (long g = 0; g < G; g++) {
            const uint16_t *xg = x + r * K + g * 32;
            float amax = 0.0f;
            for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(bf16_value(xg[k])));
            float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int s = 0;
            for (int k = 0; k < 32; k++) {
                int v = (int)lrintf(bf16_value(xg[k]) * inv);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                xq[r * K + g * 32 + k] = (int8_t)v;
                s += v;
            }
            xs[r * G + g] = d;
            xsq[r * G + g] = (float)s;
        }
    for (long r = 0; r < R;) {
        long left = R - r;
        int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const int8_t *q = xq + r * K;
        const float *s = xs + r * G, *sq = xsq + r * G;
        uint16_t *yr = y + r * N;
        long b = 0;
        while (b < nblk) {
            if (rows == 8) { tile_1_8(words, scales, q, s, sq, K, yr, N, b); b += 1; }
            else if (rows == 4) { tile_1_4(words, scales, q, s, sq, K, yr, N, b); b += 1; }
            else if (rows == 2 && b + 2 <= nblk) { tile_2_2(words, scales, q, s, sq, K, yr, N, b); b += 2; }
            else if (rows == 2) { tile_1_2(words, scales, q, s, sq, K, yr, N, b); b += 1; }
            else if (b + 4 <= nblk) { tile_4_1(words, scales, q, s, sq, K, yr, N, b); b += 4; }
            else { tile_1_1(words, scales, q, s, sq, K, yr, N, b); b += 1; }
        }
        r += rows;
    }
    free(xq); free(xs); free(xsq);
    return 0;
}
