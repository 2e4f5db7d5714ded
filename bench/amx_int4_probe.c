/* Probe (bench/amx_int4_probe.py): Troupe's int4 layout multiplied with AMX tiles.

   Per block of 16 output channels and group of 32 input channels: the 4-bit values become
   bf16 128 + q as in deployments/engines/int4_kernel.c, are stored as one B tile (16 pairs
   x 16 channels), multiplied with the rows' 32 inputs (A tile, up to 16 rows) by
   tdpbf16ps into a zeroed C tile, and the group's scale and offset are applied in AVX-512
   as there. Not used by the engine: bench/README.md says why. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int probe_amx_init(void) {
    /* Linux hands out the AMX tile state only to a process that asks for it. */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

static inline __m512 bf16x16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static void config(int m) {
    tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = m; cfg.colsb[0] = 64;   /* A: m rows of 32 bf16 */
    cfg.rows[1] = 16; cfg.colsb[1] = 64;  /* B: 16 pairs x 16 channels */
    cfg.rows[2] = m; cfg.colsb[2] = 64;   /* C: m rows x 16 float32 */
    _tile_loadconfig(&cfg);
}

static void block(const uint16_t *words, const uint16_t *scales, const uint16_t *x, long K,
                  const float *xsum, uint16_t *y, long N, long b, int m) {
    const long G = K / 32;
    const __m512i nibble = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);
    const __m512 offset = _mm512_set1_ps(-136.0f);
    __attribute__((aligned(64))) uint16_t bt[16 * 32];
    __attribute__((aligned(64))) float ct[16 * 16];
    __m512 acc[16];
    for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        for (int u = 0; u < 4; u++) {
            __m512i raw = _mm512_loadu_si512((const void *)(words + ((b * G + g) * 4 + u) * 32));
            _mm512_store_si512((void *)(bt + (4 * u + 0) * 32), _mm512_ternarylogic_epi32(raw, nibble, base, 0xEA));
            _mm512_store_si512((void *)(bt + (4 * u + 1) * 32),
                               _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), nibble, base, 0xEA));
            _mm512_store_si512((void *)(bt + (4 * u + 2) * 32),
                               _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 8), nibble, base, 0xEA));
            _mm512_store_si512((void *)(bt + (4 * u + 3) * 32), _mm512_or_si512(_mm512_srli_epi16(raw, 12), base));
        }
        _tile_loadd(0, x + g * 32, K * 2);
        _tile_loadd(1, bt, 64);
        _tile_zero(2);
        _tile_dpbf16ps(2, 0, 1);
        _tile_stored(2, ct, 64);
        const uint16_t *sz = scales + (b * G + g) * 32;
        __m512 scale = bf16x16(sz), shifted = _mm512_fmadd_ps(offset, scale, bf16x16(sz + 16));
        for (int r = 0; r < m; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_load_ps(ct + 16 * r), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(shifted, _mm512_set1_ps(xsum[r * G + g]), acc[r]);
        }
    }
    for (int r = 0; r < m; r++)
        _mm256_storeu_si256((__m256i *)(y + r * N + b * 16), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

/* As troupe_int4_mm (one thread). */
int probe_amx_int4_mm(const uint16_t *words, const uint16_t *scales, const uint16_t *x, long R,
                      long K, long N, uint16_t *y) {
    const long G = K / 32, nblk = N / 16;
    float *xsum = malloc(sizeof(float) * (size_t)(R * G > 0 ? R * G : 1));
    if (xsum == NULL) return -1;
    for (long r = 0; r < R; r++)
        for (long g = 0; g < G; g++) {
            float s = 0.0f;
            for (int k = 0; k < 32; k++) {
                uint32_t u = (uint32_t)x[r * K + g * 32 + k] << 16;
                float f;
                memcpy(&f, &u, 4);
                s += f;
            }
            xsum[r * G + g] = s;
        }
    for (long r = 0; r < R; r += 16) {
        int m = R - r >= 16 ? 16 : (int)(R - r);
        config(m);
        for (long b = 0; b < nblk; b++) block(words, scales, x + r * K, K, xsum + r * G, y + r * N, N, b, m);
        _tile_release();
    }
    free(xsum);
    return 0;
}
