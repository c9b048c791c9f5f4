/*
 * The tile steps thaw_gemm (cpu_gemm.c) and thaw_qgemm (cpu_qgemm.c) share: up to 8 rows of A
 * times one 48-column panel, 24 float32 accumulators (+ 3 weight registers: AVX-512's 32). One
 * copy, so both multiplies sum in one order and a de-quantized weight gives bit-identical
 * outputs in either.
 */
#ifndef THAW_CPU_GEMM_TILE_H
#define THAW_CPU_GEMM_TILE_H
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

enum { PANEL_COLS = 48, TILE_ROWS = 8 };

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

static inline __attribute__((always_inline)) void tile_zero(
    const int rows, __m512 acc[TILE_ROWS][3]) {
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++)
        for (int b = 0; b < 3; b++) acc[i][b] = _mm512_setzero_ps();
}

/* One k-pair of the panel's 48 columns (w0..w2) into every row: VDPBF16PS with A's pair q. */
static inline __attribute__((always_inline)) void tile_pair(
    const int rows, __m512 acc[TILE_ROWS][3], const bf16 *a, int64_t lda, int64_t q, __m512bh w0,
    __m512bh w1, __m512bh w2) {
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) {
        int32_t pair;
        memcpy(&pair, a + i * lda + 2 * q, sizeof pair);
        __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, w1);
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, w2);
    }
}

/* + bias, one rounding to bf16 (VCVTNEPS2BF16: nearest even, as torch's float -> bf16), masked
 * store of the panel's live columns. */
static inline __attribute__((always_inline)) void tile_store(
    const int rows, __m512 acc[TILE_ROWS][3], const float *bias, bf16 *c, int64_t ldc,
    int64_t cols) {
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) {
        for (int b = 0; b < 3; b++) {
            int64_t left = cols - b * 16;
            if (left <= 0) break;
            __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            __m512 sum = acc[i][b];
            if (bias) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, bias + b * 16));
            __m256i out = (__m256i)_mm512_cvtneps_pbh(sum);
            _mm256_mask_storeu_epi16(c + i * ldc + b * 16, mask, out);
        }
    }
}
#endif
#endif
