/* Weight-only int4 matmul for bf16 rows on CPUs with AVX-512 BF16 (deployments/engines/int4_kernel.py).

   y[r][j] = sum over groups g of 32 input channels:
             scale[j][g] * sum_k x[r][k] * (q[j][k] - 8) + zero[j][g] * sum_k x[r][k]

   Each 4-bit value becomes the bf16 number 128 + q by OR-ing it into 0x4300 (bf16 128 has
   a zero 7-bit mantissa, so the mantissa is q itself): two instructions per 32 weights and
   no table. vdpbf16ps multiplies those by the row's bf16 values exactly and sums in
   float32; the offset comes back per group as (zero - 136 scale) * sum_k x[r][k].

   Every (output block, row) pair is computed by the same instructions in the same order
   whatever the number of rows, the other rows and the thread count: a row's result does
   not depend on its batch. Rows are taken 8, 4, 2 or 1 at a time only to read each weight
   block once for several rows.

   Layouts (built by int4_kernel.pack):
     words:  [N/16][K/32][4][32] uint16; word 2l + c of (block b, group g, quarter u) holds
             in its nibble n the value q[16 b + l][32 g + 8 u + 2 n + c].
     scales: [N/16][K/32][2][16] bf16: the block's 16 scales, then its 16 zeros. */
#include <immintrin.h>
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

/* NB output blocks of 16 channels times NR rows: NB * NR independent accumulations. */
#define TILE(NB, NR)                                                                          \
static void tile_##NB##_##NR(const uint16_t *words, const uint16_t *scales, const uint16_t *x, \
                             long K, const float *xsum, uint16_t *y, long N, long blk0) {      \
    const long G = K / 32;                                                                     \
    const __m512i nibble = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);       \
    const __m512 offset = _mm512_set1_ps(-136.0f);                                            \
    __m512 acc[NB][NR];                                                                        \
    for (int b = 0; b < NB; b++)                                                               \
        for (int r = 0; r < NR; r++) acc[b][r] = _mm512_setzero_ps();                          \
    for (long g = 0; g < G; g++) {                                                             \
        __m512 even[NB][NR], odd[NB][NR];                                                      \
        for (int b = 0; b < NB; b++)                                                           \
            for (int r = 0; r < NR; r++) {                                                     \
                even[b][r] = _mm512_setzero_ps();                                              \
                odd[b][r] = _mm512_setzero_ps();                                               \
            }                                                                                  \
        for (int u = 0; u < 4; u++) {                                                          \
            __m512i xv[4][NR];                                                                 \
            for (int r = 0; r < NR; r++)                                                       \
                for (int n = 0; n < 4; n++) {                                                  \
                    int32_t pair;                                                              \
                    memcpy(&pair, x + r * K + g * 32 + 8 * u + 2 * n, 4);                      \
                    xv[n][r] = _mm512_set1_epi32(pair);                                        \
                }                                                                              \
            for (int b = 0; b < NB; b++) {                                                     \
                __m512i raw = _mm512_loadu_si512(                                             \
                    (const void *)(words + (((blk0 + b) * G + g) * 4 + u) * 32));              \
                __m512i w0 = _mm512_ternarylogic_epi32(raw, nibble, base, 0xEA);               \
                __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), nibble, base, 0xEA); \
                __m512i w2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 8), nibble, base, 0xEA); \
                __m512i w3 = _mm512_or_si512(_mm512_srli_epi16(raw, 12), base);                \
                for (int r = 0; r < NR; r++) {                                                 \
                    even[b][r] = _mm512_dpbf16_ps(even[b][r], (__m512bh)w0, (__m512bh)xv[0][r]); \
                    odd[b][r] = _mm512_dpbf16_ps(odd[b][r], (__m512bh)w1, (__m512bh)xv[1][r]); \
                    even[b][r] = _mm512_dpbf16_ps(even[b][r], (__m512bh)w2, (__m512bh)xv[2][r]); \
                    odd[b][r] = _mm512_dpbf16_ps(odd[b][r], (__m512bh)w3, (__m512bh)xv[3][r]); \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int b = 0; b < NB; b++) {                                                         \
            const uint16_t *sz = scales + ((blk0 + b) * G + g) * 32;                           \
            __m512 scale = bf16x16(sz), shifted = _mm512_fmadd_ps(offset, scale, bf16x16(sz + 16)); \
            for (int r = 0; r < NR; r++) {                                                     \
                acc[b][r] = _mm512_fmadd_ps(_mm512_add_ps(even[b][r], odd[b][r]), scale, acc[b][r]); \
                acc[b][r] = _mm512_fmadd_ps(shifted, _mm512_set1_ps(xsum[r * G + g]), acc[b][r]); \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    for (int b = 0; b < NB; b++)                                                               \
        for (int r = 0; r < NR; r++)                                                           \
            _mm256_storeu_si256((__m256i *)(y + r * N + (blk0 + b) * 16),                      \
                                (__m256i)_mm512_cvtneps_pbh(acc[b][r]));                       \
}

TILE(4, 1)
TILE(1, 1)
TILE(2, 2)
TILE(1, 2)
TILE(1, 4)
TILE(1, 8)

/* Output blocks handed out four at a time (one 4x1 tile when rows are taken singly). */
static void blocks(const uint16_t *words, const uint16_t *scales, const uint16_t *x, long K,
                   const float *xsum, uint16_t *y, long N, long first, long count, int rows) {
    long b = first, end = first + count;
    while (b < end) {
        if (rows == 8) { tile_1_8(words, scales, x, K, xsum, y, N, b); b += 1; }
        else if (rows == 4) { tile_1_4(words, scales, x, K, xsum, y, N, b); b += 1; }
        else if (rows == 2 && b + 2 <= end) { tile_2_2(words, scales, x, K, xsum, y, N, b); b += 2; }
        else if (rows == 2) { tile_1_2(words, scales, x, K, xsum, y, N, b); b += 1; }
        else if (b + 4 <= end) { tile_4_1(words, scales, x, K, xsum, y, N, b); b += 4; }
        else { tile_1_1(words, scales, x, K, xsum, y, N, b); b += 1; }
    }
}

/* x: [R][K] bf16, y: [R][N] bf16; K a multiple of 32, N of 16. Returns 0, or -1 when out
   of memory. */
int troupe_int4_mm(const uint16_t *words, const uint16_t *scales, const uint16_t *x, long R,
                   long K, long N, uint16_t *y, int threads) {
    const long G = K / 32, nblk = N / 16, chunks = (nblk + 3) / 4;
    float *xsum = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    if (xsum == NULL) return -1;
    for (long r = 0; r < R; r++)
        for (long g = 0; g < G; g++) {
            float s = 0.0f;
            for (int k = 0; k < 32; k++) s += bf16_value(x[r * K + g * 32 + k]);
            xsum[r * G + g] = s;
        }
    for (long r = 0; r < R;) {
        long left = R - r;
        int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const uint16_t *xr = x + r * K;
        uint16_t *yr = y + r * N;
        const float *xs = xsum + r * G;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (long c = 0; c < chunks; c++) {
            long first = c * 4;
            blocks(words, scales, xr, K, xs, yr, N, first, nblk - first < 4 ? nblk - first : 4, rows);
        }
        r += rows;
    }
    free(xsum);
    return 0;
}
