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

/* A tile's float32 results, rounded to bf16, into y's rows. */
#define STORE_ROWS(NB, NR)                                                                    \
    for (int b = 0; b < NB; b++)                                                               \
        for (int r = 0; r < NR; r++)                                                           \
            _mm256_storeu_si256((__m256i *)(y + r * N + (blk0 + b) * 16),                      \
                                (__m256i)_mm512_cvtneps_pbh(acc[b][r]));

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
    STORE_ROWS(NB, NR)                                                                         \
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

/* ---- int8 inputs (the default: troupe_int4_mm_a8) ----

   Each row's inputs are rounded to int8 per group of 32, as llama.cpp does for its 4-bit
   formats (step = the group's largest magnitude / 127, round half to even), and
   vpdpbusd multiplies the 4-bit values by them, 64 products an instruction, summed
   exactly in int32. Per group and row:

       y += step * (scale * sum_k q * xq + (zero - 8 scale) * sum_k xq)

   The same words as above: in the dword of lane l of a quarter, the low nibbles of its
   bytes hold q at k = 0, 4, 1, 5 of the quarter's 8 and the high nibbles k = 2, 6, 3, 7,
   so each row's int8 inputs are stored in that order (:c:func:`quantize_rows`). A row's
   float operations are the same whatever the other rows and the thread count. */

static const int QUARTER_ORDER[8] = {0, 4, 1, 5, 2, 6, 3, 7};

/* xq: [R][K] int8 in QUARTER_ORDER within each 8; steps, qsums: [R][G]. */
static void quantize_rows(const uint16_t *x, long R, long K, int8_t *xq, float *steps, float *qsums) {
    const long G = K / 32;
    for (long r = 0; r < R; r++)
        for (long g = 0; g < G; g++) {
            const uint16_t *xg = x + r * K + g * 32;
            float amax = 0.0f;
            for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(bf16_value(xg[k])));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int k = 0; k < 32; k++) {
                int v = (int)nearbyintf(bf16_value(xg[(k & ~7) + QUARTER_ORDER[k & 7]]) * inv);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                xq[r * K + g * 32 + k] = (int8_t)v;
                sum += v;
            }
            steps[r * G + g] = amax / 127.0f;
            qsums[r * G + g] = (float)sum;
        }
}

#define TILE_A8(NB, NR)                                                                       \
static void tile_a8_##NB##_##NR(const void *weights, const uint16_t *scales, const int8_t *xq,  \
                                const float *steps, const float *qsums, long K, uint16_t *y,   \
                                long N, long blk0) {                                           \
    const uint16_t *words = weights;                                                           \
    const long G = K / 32;                                                                     \
    const __m512i nibble = _mm512_set1_epi8(0x0F);                                             \
    const __m512 minus8 = _mm512_set1_ps(-8.0f);                                               \
    __m512 acc[NB][NR];                                                                        \
    for (int b = 0; b < NB; b++)                                                               \
        for (int r = 0; r < NR; r++) acc[b][r] = _mm512_setzero_ps();                          \
    for (long g = 0; g < G; g++) {                                                             \
        __m512i isum[NB][NR];                                                                  \
        for (int b = 0; b < NB; b++)                                                           \
            for (int r = 0; r < NR; r++) isum[b][r] = _mm512_setzero_si512();                  \
        for (int u = 0; u < 4; u++) {                                                          \
            __m512i xlo[NR], xhi[NR];                                                          \
            for (int r = 0; r < NR; r++) {                                                     \
                int32_t lo, hi;                                                                \
                memcpy(&lo, xq + r * K + g * 32 + 8 * u, 4);                                   \
                memcpy(&hi, xq + r * K + g * 32 + 8 * u + 4, 4);                               \
                xlo[r] = _mm512_set1_epi32(lo);                                                \
                xhi[r] = _mm512_set1_epi32(hi);                                                \
            }                                                                                  \
            for (int b = 0; b < NB; b++) {                                                     \
                __m512i raw = _mm512_loadu_si512(                                             \
                    (const void *)(words + (((blk0 + b) * G + g) * 4 + u) * 32));              \
                __m512i lo = _mm512_and_si512(raw, nibble);                                    \
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);              \
                for (int r = 0; r < NR; r++) {                                                 \
                    isum[b][r] = _mm512_dpbusd_epi32(isum[b][r], lo, xlo[r]);                  \
                    isum[b][r] = _mm512_dpbusd_epi32(isum[b][r], hi, xhi[r]);                  \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int b = 0; b < NB; b++) {                                                         \
            const uint16_t *sz = scales + ((blk0 + b) * G + g) * 32;                           \
            __m512 scale = bf16x16(sz), shifted = _mm512_fmadd_ps(minus8, scale, bf16x16(sz + 16)); \
            for (int r = 0; r < NR; r++) {                                                     \
                __m512 t = _mm512_fmadd_ps(shifted, _mm512_set1_ps(qsums[r * G + g]),          \
                                           _mm512_mul_ps(scale, _mm512_cvtepi32_ps(isum[b][r]))); \
                acc[b][r] = _mm512_fmadd_ps(_mm512_set1_ps(steps[r * G + g]), t, acc[b][r]);   \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    STORE_ROWS(NB, NR)                                                                         \
}

TILE_A8(4, 1)
TILE_A8(1, 1)
TILE_A8(2, 2)
TILE_A8(1, 2)
TILE_A8(1, 4)
TILE_A8(1, 8)

/* ---- int8 weights (one scale per output channel: the output head) with int8 inputs ----

   y[r][j] = scale[j] * sum over groups g of step[r][g] * sum_k q[j][k] * xq[r][k]

   The inputs are rounded as for the int4 layers (quantize_rows, QUARTER_ORDER within each
   8). vpdpbusd multiplies unsigned by signed bytes, so the weights are stored as q + 128
   and each group's sum takes 128 * sum_k xq back off (exact: integers below 2^24).

   Layout (built by int4_kernel.pack_int8):
     w:      [N/16][K/32][8][64] uint8; byte 4 l + i of (block b, group g, quad j) holds
             q[16 b + l][32 g + 8 (j / 2) + QUARTER_ORDER[4 (j % 2) + i]] + 128.
     scales: [N/16][16] bf16. */

#define TILE_W8(NB, NR)                                                                       \
static void tile_w8_##NB##_##NR(const void *weights, const uint16_t *scales, const int8_t *xq,  \
                                const float *steps, const float *qsums, long K, uint16_t *y,   \
                                long N, long blk0) {                                           \
    const uint8_t *w = weights;                                                                \
    const long G = K / 32;                                                                     \
    __m512 acc[NB][NR];                                                                        \
    for (int b = 0; b < NB; b++)                                                               \
        for (int r = 0; r < NR; r++) acc[b][r] = _mm512_setzero_ps();                          \
    for (long g = 0; g < G; g++) {                                                             \
        __m512i isum[NB][NR];                                                                  \
        for (int b = 0; b < NB; b++)                                                           \
            for (int r = 0; r < NR; r++) isum[b][r] = _mm512_setzero_si512();                  \
        for (int j = 0; j < 8; j++) {                                                          \
            __m512i xv[NR];                                                                    \
            for (int r = 0; r < NR; r++) {                                                     \
                int32_t quad;                                                                  \
                memcpy(&quad, xq + r * K + g * 32 + 4 * j, 4);                                 \
                xv[r] = _mm512_set1_epi32(quad);                                               \
            }                                                                                  \
            for (int b = 0; b < NB; b++) {                                                     \
                __m512i raw = _mm512_loadu_si512((const void *)(w + (((blk0 + b) * G + g) * 8 + j) * 64)); \
                for (int r = 0; r < NR; r++) isum[b][r] = _mm512_dpbusd_epi32(isum[b][r], raw, xv[r]); \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < NR; r++) {                                                         \
            const __m512 step = _mm512_set1_ps(steps[r * G + g]);                              \
            const __m512 offset = _mm512_set1_ps(128.0f * qsums[r * G + g]);                   \
            for (int b = 0; b < NB; b++)                                                       \
                acc[b][r] = _mm512_fmadd_ps(step, _mm512_sub_ps(_mm512_cvtepi32_ps(isum[b][r]), offset), acc[b][r]); \
        }                                                                                      \
    }                                                                                          \
    for (int b = 0; b < NB; b++) {                                                             \
        const __m512 scale = bf16x16(scales + (blk0 + b) * 16);                                \
        for (int r = 0; r < NR; r++) acc[b][r] = _mm512_mul_ps(acc[b][r], scale);              \
    }                                                                                          \
    STORE_ROWS(NB, NR)                                                                         \
}

TILE_W8(4, 1)
TILE_W8(1, 1)
TILE_W8(2, 2)
TILE_W8(1, 2)
TILE_W8(1, 4)
TILE_W8(1, 8)

/* The tiles of one kind of weights, by (output blocks, rows). */
typedef void (*tile_a8)(const void *, const uint16_t *, const int8_t *, const float *, const float *, long,
                        uint16_t *, long, long);
typedef struct { tile_a8 b4r1, b1r1, b2r2, b1r2, b1r4, b1r8; } tiles_a8;
static const tiles_a8 INT4_TILES = {tile_a8_4_1, tile_a8_1_1, tile_a8_2_2, tile_a8_1_2, tile_a8_1_4, tile_a8_1_8};
static const tiles_a8 INT8_TILES = {tile_w8_4_1, tile_w8_1_1, tile_w8_2_2, tile_w8_1_2, tile_w8_1_4, tile_w8_1_8};

static void blocks_a8(const tiles_a8 *t, const void *w, const uint16_t *scales, const int8_t *xq,
                      const float *steps, const float *qsums, long K, uint16_t *y, long N, long first,
                      long count, int rows) {
    long b = first, end = first + count;
    while (b < end) {
        if (rows == 8) { t->b1r8(w, scales, xq, steps, qsums, K, y, N, b); b += 1; }
        else if (rows == 4) { t->b1r4(w, scales, xq, steps, qsums, K, y, N, b); b += 1; }
        else if (rows == 2 && b + 2 <= end) { t->b2r2(w, scales, xq, steps, qsums, K, y, N, b); b += 2; }
        else if (rows == 2) { t->b1r2(w, scales, xq, steps, qsums, K, y, N, b); b += 1; }
        else if (b + 4 <= end) { t->b4r1(w, scales, xq, steps, qsums, K, y, N, b); b += 4; }
        else { t->b1r1(w, scales, xq, steps, qsums, K, y, N, b); b += 1; }
    }
}

/* x: [R][K] bf16, y: [R][N] bf16; K a multiple of 32, N of 16. Returns 0, or -1 when out
   of memory. */
static int mm_a8(const tiles_a8 *t, const void *w, const uint16_t *scales, const uint16_t *x, long R,
                 long K, long N, uint16_t *y, int threads) {
    const long G = K / 32, nblk = N / 16, chunks = (nblk + 3) / 4;
    int8_t *xq = malloc((size_t)(R * K > 0 ? R * K : 1));
    float *steps = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    float *qsums = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    if (xq == NULL || steps == NULL || qsums == NULL) {
        free(xq); free(steps); free(qsums);
        return -1;
    }
    quantize_rows(x, R, K, xq, steps, qsums);
    for (long r = 0; r < R;) {
        long left = R - r;
        int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (long c = 0; c < chunks; c++) {
            long first = c * 4;
            blocks_a8(t, w, scales, xq + r * K, steps + r * G, qsums + r * G, K, y + r * N, N, first,
                      nblk - first < 4 ? nblk - first : 4, rows);
        }
        r += rows;
    }
    free(xq); free(steps); free(qsums);
    return 0;
}

/* As troupe_int4_mm, with each row's inputs rounded to int8 per group of 32. */
int troupe_int4_mm_a8(const uint16_t *words, const uint16_t *scales, const uint16_t *x, long R,
                      long K, long N, uint16_t *y, int threads) {
    return mm_a8(&INT4_TILES, words, scales, x, R, K, N, y, threads);
}

/* int8 weights packed by int4_kernel.pack_int8, each row's inputs rounded as above. */
int troupe_int8_mm_a8(const uint8_t *w, const uint16_t *scales, const uint16_t *x, long R, long K,
                      long N, uint16_t *y, int threads) {
    return mm_a8(&INT8_TILES, w, scales, x, R, K, N, y, threads);
}
