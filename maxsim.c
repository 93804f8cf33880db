/* Fused MaxSim on the CPU (AVX2 + FMA), float32 math; candidates float32, bfloat16 or float16:

       out[a, n] = sum_{i real} max_{j real} <q[a, i], c[n, j]>

   Built and loaded by kernels.py (cc -O3 -march=native, ctypes). Each call scores candidates
   [n0, n1), so Python threads split a corpus (ctypes drops the GIL during the call).

   No score tensor is ever stored. kernels.py packs the real query vectors of all queries into
   blocks of 16 rows laid out (R/16, D, 16), so that one D step of a block is two registers, and
   gives each row its query (owner, -1 for padding). Per candidate the kernel walks its real
   vectors W = 6 (then 4) at a time: for every d, broadcast c[j][d] for the W vectors and
   multiply-add into 16 x W dot products (2W registers); then max over the W vectors into a
   running maximum per row (2 registers). After the candidate's last block each row's maximum is
   added to its query's score. A block short of 4 vectors repeats the last one (a repeat does not
   change a maximum). With one vector per candidate (r_c = 1, a plain product) the W columns are
   W candidates instead, so the (1, 1) budget wastes nothing, and D is cut in slices so that a
   slice of the query rows stays in L1 across a tile of candidates. Candidate vectors are read
   with their strides, so budget prefixes c[:, :r_c] need no copy. The next block is prefetched
   while one runs. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "maxsim.c needs AVX2, FMA and F16C"
#endif

/* acc[t] = rows 0-7 . b[t], acc[W + t] = rows 8-15 . b[t] for t < W, for a block qb (D, 16).
   Per d: 2 loads of the block, W broadcasts, 2W multiply-adds. W = 6 keeps 12 sums in the 16
   registers and reads the block once per 12 FMAs (W = 4: once per 8, which is slower). */
static inline __attribute__((always_inline)) void dot16(const float *qb, const float *const *b, int W,
                                                        int64_t D, __m256 acc[12], int add) {
    __m256 s0[6], s1[6];
    for (int t = 0; t < W; t++) {
        s0[t] = add ? acc[t] : _mm256_setzero_ps();
        s1[t] = add ? acc[W + t] : _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < D; d++, qb += 16) {
        __m256 x0 = _mm256_loadu_ps(qb), x1 = _mm256_loadu_ps(qb + 8);
#pragma GCC unroll 6
        for (int t = 0; t < W; t++) {
            __m256 y = _mm256_broadcast_ss(b[t] + d);
            s0[t] = _mm256_fmadd_ps(x0, y, s0[t]);
            s1[t] = _mm256_fmadd_ps(x1, y, s1[t]);
        }
    }
    for (int t = 0; t < W; t++) { acc[t] = s0[t]; acc[W + t] = s1[t]; }
}

static inline void dot16w(const float *qb, const float *const *b, int W, int64_t D, __m256 acc[12],
                          int add) {
    if (W == 6) dot16(qb, b, 6, D, acc, add);   /* two copies, each with W a constant */
    else dot16(qb, b, 4, D, acc, add);
}

static inline void prefetch(const void *x, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)x + b, _MM_HINT_T0);
}

/* The candidate vector at element offset off as float32: in place (ctype 0), or widened from
   bfloat16 (1: the high half of a float32) or float16 (2: F16C) into dst. */
static inline const float *cvec(const void *c, int ctype, int64_t off, int64_t D, float *dst) {
    if (ctype == 0) return (const float *)c + off;
    const uint16_t *h = (const uint16_t *)c + off;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(h + d));
        _mm256_storeu_ps(dst + d, ctype == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
                                             : _mm256_cvtph_ps(v));
    }
    for (; d < D; d++) {
        uint32_t u = (uint32_t)h[d] << 16;
        if (ctype == 1) memcpy(dst + d, &u, 4);
        else dst[d] = _cvtsh_ss(h[d]);
    }
    return dst;
}

/* r_c = 1, one vector a candidate: a plain product, blocked like a GEMM. The W columns are W
   candidates, so the (1, 1) budget wastes nothing, and D is cut in slices so that a slice of the
   query rows stays in L1 across a tile of candidates. */
static int maxsim_rc1(const float *qp, const int64_t *owner, int64_t R, int64_t Nq, const void *c, int ctype,
                      const uint8_t *cm, float *out, int64_t D, int64_t n0, int64_t n1, int64_t scn, int64_t scmn,
                      int64_t son, float *wide) {
    float s[16];
    int64_t es = ctype ? 2 : 4;                                  /* bytes per element */
    /* tiles of 48 candidates (8 groups of 6) x D slices of 128: a slice of a row block
       (8 KB) stays in L1 for the whole tile, and the 16 x 6 sums carry over between slices
       in part (R/16 x 8 groups x 12 registers). */
    enum { GT = 8, DS = 128 };
    __m256 *part = aligned_alloc(32, sizeof(__m256) * 12 * GT * (R / 16));
    if (!part) return -1;
    for (int64_t n = n0; n < n1; n += 6 * GT) {
        int64_t G = 0, Ws[GT], ks[GT];
        const float *b[GT][6];
        for (int64_t m = n; m < n1 && G < GT; m += Ws[G++]) {
            Ws[G] = n1 - m >= 6 ? 6 : 4;
            ks[G] = n1 - m < Ws[G] ? n1 - m : Ws[G];
            for (int64_t t = 0; t < Ws[G]; t++)
                b[G][t] = t < ks[G] ? cvec(c, ctype, (m + t) * scn, D, wide + (6 * G + t) * D) : b[G][ks[G] - 1];
        }
        for (int64_t d0 = 0; d0 < D; d0 += DS) {
            int64_t len = D - d0 < DS ? D - d0 : DS;
            for (int64_t r0 = 0; r0 < R; r0 += 16)
                for (int64_t g = 0; g < G; g++) {
                    const float *bs[6];
                    for (int64_t t = 0; t < Ws[g]; t++) bs[t] = b[g][t] + d0;
                    for (int64_t t = 0; r0 == 0 && t < 6; t++) {  /* the next group's slice */
                        int64_t m = n + 6 * (g + 1) + t;             /* (or the next tile's) */
                        if (g + 1 < G && t < Ws[g + 1]) prefetch(b[g + 1][t] + d0, 4 * len);
                        else if (g + 1 == G && m < n1 && d0 == 0) prefetch((const char *)c + es * m * scn, es * len);
                    }
                    __m256 *acc = part + 12 * (GT * (r0 / 16) + g);
                    dot16w(qp + r0 * D + d0 * 16, bs, Ws[g], len, acc, d0 > 0);
                }
        }
        for (int64_t g = 0, m = n; g < G; m += Ws[g++]) {
            for (int64_t a = 0; a < Nq; a++)
                for (int64_t t = 0; t < ks[g]; t++) out[a * son + m + t] = 0.0f;
            for (int64_t r0 = 0; r0 < R; r0 += 16) {
                __m256 *acc = part + 12 * (GT * (r0 / 16) + g);
                for (int64_t t = 0; t < ks[g]; t++) {
                    if (cm && !cm[(m + t) * scmn]) continue;   /* no real vector: scores 0 */
                    _mm256_storeu_ps(s, acc[t]);
                    _mm256_storeu_ps(s + 8, acc[Ws[g] + t]);
                    for (int64_t r = 0; r < 16; r++)
                        if (owner[r0 + r] >= 0) out[owner[r0 + r] * son + m + t] += s[r];
                }
            }
        }
    }
    free(part);
    return 0;
}

/* r_c > 1: per candidate, its real vectors W = 6 (then 4) at a time against each block of 16
   query rows; the max over r_c is kept in registers and only each row's maximum is added to
   its query's score. */
static int maxsim_multi(const float *qp, const int64_t *owner, int64_t R, int64_t Nq, const void *c, int ctype,
                     const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                     int64_t scr, int64_t scmn, int64_t scmr, int64_t son, float *wide) {
    __m256 acc[12];
    float s[16];
    int64_t es = ctype ? 2 : 4;                                  /* bytes per element */
    /* 16-bit candidates are widened as a whole for several row blocks, block by block (in L1)
       for a single one */
    int lazy = ctype && R == 16;
    const float *col[4096 + 4];  /* r_c <= 4096: kernels._MAX_RC, checked there */
    int64_t off[4096 + 4];
    for (int64_t n = n0; n < n1; n++) {
        int64_t J = 0;
        for (int64_t j = 0; j < r_c; j++)
            if (!cm || cm[n * scmn + j * scmr]) {
                off[J] = n * scn + j * scr;
                col[J] = lazy ? NULL : cvec(c, ctype, off[J], D, wide + J * D);
                J++;
            }
        for (int64_t a = 0; a < Nq; a++) out[a * son + n] = 0.0f;
        if (J == 0) continue;                 /* a candidate with no real vector scores 0 */
        /* blocks of 6, then of 4 (64 = 10 x 6 + 4, 8 = 4 + 4); only 4 for a single block of rows,
           which streams the corpus once and is faster with the smaller block */
        int64_t J6 = R > 16 ? J / 6 : 0;
        while (J6 > 0 && (J - 6 * J6) % 4) J6--;
        if ((J - 6 * J6) % 4) J6 = J / 6;     /* no exact split: pad the last block of 4 */
        J6 *= 6;
        while ((J - J6) % 4) { col[J] = col[J - 1]; off[J] = off[J - 1]; J++; }
        for (int64_t r0 = 0; r0 < R; r0 += 16) {
            __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
            __m256 nan0 = _mm256_setzero_ps(), nan1 = nan0;   /* all ones where a product was NaN */
            for (int64_t j = 0, W; j < J; j += W) {                     /* max_j, W at a time */
                W = j < J6 ? 6 : 4;
                for (int64_t t = 0; r0 == 0 && t < W; t++) {             /* the next W vectors */
                    if (j + W + t < J) prefetch((const char *)c + es * off[j + W + t], es * D);
                    else if (n + 1 < n1 && t < r_c) prefetch((const char *)c + es * ((n + 1) * scn + t * scr), es * D);
                }
                for (int64_t t = 0; lazy && t < W; t++) col[j + t] = cvec(c, ctype, off[j + t], D, wide + t * D);
                dot16w(qp + r0 * D, col + j, W, D, acc, 0);
                for (int64_t t = 0; t < W; t++) {
                    m0 = _mm256_max_ps(m0, acc[t]);
                    m1 = _mm256_max_ps(m1, acc[W + t]);
                    nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps(acc[t], acc[t], _CMP_UNORD_Q));
                    nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(acc[W + t], acc[W + t], _CMP_UNORD_Q));
                }
            }
            /* maxps drops a NaN operand; like torch's amax, a NaN product makes the maximum NaN
               (all-ones bits are a NaN) */
            _mm256_storeu_ps(s, _mm256_or_ps(m0, nan0));
            _mm256_storeu_ps(s + 8, _mm256_or_ps(m1, nan1));
            for (int64_t r = 0; r < 16; r++)                              /* sum_i of the maxima */
                if (owner[r0 + r] >= 0) out[owner[r0 + r] * son + n] += s[r];
        }
    }
    return 0;
}

/* qp (R/16, D, 16) packed query rows, owner (R,) their queries (-1 = padding), R a multiple of
   16; c (N_c, r_c, D) of type ctype (0 float32, 1 bfloat16, 2 float16) with stride 1 over D, cm
   (N_c, r_c) uint8 (1 = real) or NULL; out (Nq, N_c) row stride son; strides in elements.
   Scores candidates n0 <= n < n1; returns 0, or -1 when out of memory. */
int maxsim_c(const float *qp, const int64_t *owner, int64_t R, int64_t Nq,
               const void *c, int ctype, const uint8_t *cm, float *out, int64_t r_c, int64_t D,
               int64_t n0, int64_t n1, int64_t scn, int64_t scr, int64_t scmn, int64_t scmr,
               int64_t son) {
    /* widened 16-bit candidates: a candidate's vectors, or a tile's (48) */
    float *wide = ctype ? malloc(sizeof(float) * (r_c > 48 ? r_c + 4 : 48) * D) : NULL;
    if (ctype && !wide) return -1;
    int status = r_c == 1 ? maxsim_rc1(qp, owner, R, Nq, c, ctype, cm, out, D, n0, n1, scn, scmn, son, wide)
                          : maxsim_multi(qp, owner, R, Nq, c, ctype, cm, out, r_c, D, n0, n1, scn, scr, scmn, scmr,
                                         son, wide);
    free(wide);
    return status;
}
