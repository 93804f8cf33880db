/* Fused MaxSim on the CPU (AVX2 + FMA), float32:

       out[a, n] = sum_{i real} max_{j real} <q[a, i], c[n, j]>

   Built and loaded by kernels.py (cc -O3 -march=native, ctypes). Each call scores candidates
   [n0, n1), so Python threads split a corpus (ctypes drops the GIL during the call).

   No score tensor is ever stored. kernels.py packs the real query vectors of all queries into
   blocks of 16 rows laid out (R/16, D, 16), so that one D step of a block is two registers, and
   gives each row its query (owner, -1 for padding). Per candidate the kernel walks its real
   vectors 4 at a time: for every d, broadcast c[j][d] for the 4 vectors and multiply-add into
   16 x 4 dot products (8 registers); then max over the 4 vectors into a running maximum per row
   (2 registers). After the candidate's last block each row's maximum is added to its query's
   score. A block of fewer than 4 vectors repeats the last one (a repeat does not change a
   maximum). With one vector per candidate (r_c = 1) the 4 columns are 4 candidates instead, so
   the (1, 1) budget wastes nothing. Candidate vectors are read with their strides, so budget
   prefixes c[:, :r_c] need no copy. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "maxsim.c needs AVX2 and FMA"
#endif

/* acc[t] = rows 0-7 . b[t], acc[4 + t] = rows 8-15 . b[t], for a block qb (D, 16) */
static inline void dot16x4(const float *qb, const float *b0, const float *b1, const float *b2,
                           const float *b3, int64_t D, __m256 acc[8]) {
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s02 = s00, s03 = s00;
    __m256 s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    for (int64_t d = 0; d < D; d++, qb += 16) {
        __m256 x0 = _mm256_loadu_ps(qb), x1 = _mm256_loadu_ps(qb + 8), y;
        y = _mm256_broadcast_ss(b0 + d); s00 = _mm256_fmadd_ps(x0, y, s00); s10 = _mm256_fmadd_ps(x1, y, s10);
        y = _mm256_broadcast_ss(b1 + d); s01 = _mm256_fmadd_ps(x0, y, s01); s11 = _mm256_fmadd_ps(x1, y, s11);
        y = _mm256_broadcast_ss(b2 + d); s02 = _mm256_fmadd_ps(x0, y, s02); s12 = _mm256_fmadd_ps(x1, y, s12);
        y = _mm256_broadcast_ss(b3 + d); s03 = _mm256_fmadd_ps(x0, y, s03); s13 = _mm256_fmadd_ps(x1, y, s13);
    }
    acc[0] = s00; acc[1] = s01; acc[2] = s02; acc[3] = s03;
    acc[4] = s10; acc[5] = s11; acc[6] = s12; acc[7] = s13;
}

/* qp (R/16, D, 16) packed query rows, owner (R,) their queries (-1 = padding), R a multiple of
   16; c (N_c, r_c, D) with stride 1 over D, cm (N_c, r_c) uint8 (1 = real) or NULL; out (Nq, N_c)
   row stride son; strides in elements. Scores candidates n0 <= n < n1. */
void maxsim_f32(const float *qp, const int64_t *owner, int64_t R, int64_t Nq,
                const float *c, const uint8_t *cm, float *out, int64_t r_c, int64_t D,
                int64_t n0, int64_t n1, int64_t scn, int64_t scr, int64_t scmn, int64_t scmr,
                int64_t son) {
    __m256 acc[8];
    float s[16];
    if (r_c == 1) {  /* one vector a candidate: the 4 columns are 4 candidates */
        for (int64_t n = n0; n < n1; n += 4) {
            int64_t k = n1 - n < 4 ? n1 - n : 4;
            const float *b[4];
            for (int64_t t = 0; t < 4; t++) b[t] = c + (n + (t < k ? t : k - 1)) * scn;
            for (int64_t a = 0; a < Nq; a++)
                for (int64_t t = 0; t < k; t++) out[a * son + n + t] = 0.0f;
            for (int64_t r0 = 0; r0 < R; r0 += 16) {
                dot16x4(qp + r0 * D, b[0], b[1], b[2], b[3], D, acc);
                for (int64_t t = 0; t < k; t++) {
                    if (cm && !cm[(n + t) * scmn]) continue;   /* no real vector: scores 0 */
                    _mm256_storeu_ps(s, acc[t]);
                    _mm256_storeu_ps(s + 8, acc[4 + t]);
                    for (int64_t r = 0; r < 16; r++)
                        if (owner[r0 + r] >= 0) out[owner[r0 + r] * son + n + t] += s[r];
                }
            }
        }
        return;
    }
    const float *col[4096 + 4];  /* r_c <= 4096, checked by kernels.py */
    for (int64_t n = n0; n < n1; n++) {
        int64_t J = 0;
        for (int64_t j = 0; j < r_c; j++)
            if (!cm || cm[n * scmn + j * scmr]) col[J++] = c + n * scn + j * scr;
        for (int64_t a = 0; a < Nq; a++) out[a * son + n] = 0.0f;
        if (J == 0) continue;                 /* a candidate with no real vector scores 0 */
        while (J % 4) { col[J] = col[J - 1]; J++; }
        for (int64_t r0 = 0; r0 < R; r0 += 16) {
            __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
            for (int64_t j = 0; j < J; j += 4) {                         /* max_j, 4 at a time */
                for (int64_t t = 0; r0 == 0 && t < 4; t++) {  /* fetch the next 4 vectors while these run */
                    const float *nx = j + 4 < J ? col[j + 4 + t] : n + 1 < n1 ? c + (n + 1) * scn + t * scr : 0;
                    for (int64_t d = 0; nx && d < D; d += 16) _mm_prefetch((const char *)(nx + d), _MM_HINT_T0);
                }
                dot16x4(qp + r0 * D, col[j], col[j + 1], col[j + 2], col[j + 3], D, acc);
                m0 = _mm256_max_ps(m0, _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3])));
                m1 = _mm256_max_ps(m1, _mm256_max_ps(_mm256_max_ps(acc[4], acc[5]), _mm256_max_ps(acc[6], acc[7])));
            }
            _mm256_storeu_ps(s, m0);
            _mm256_storeu_ps(s + 8, m1);
            for (int64_t r = 0; r < 16; r++)                              /* sum_i of the maxima */
                if (owner[r0 + r] >= 0) out[owner[r0 + r] * son + n] += s[r];
        }
    }
}
