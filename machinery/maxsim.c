/* Fused MaxSim on the CPU (AVX2 + FMA, or AVX-512F), float32 math; candidates float32,
   bfloat16, float16, int8 (a float32 scale a vector) or binary (sign bits, a scale a vector),
   each widened to float32 in L1 just before use (the bytes read from memory stay the index's):

       out[a, n] = sum_{i real} max_{j real} <q[a, i], c[n, j]>

   Built and loaded by machinery/cpu_kernel.py (cc -O3 -march=native -fopenmp, ctypes). OpenMP
   threads split the candidates (without OpenMP, Python threads do: ctypes drops the GIL). Where
   the CPU has bf16 units, a second entry, maxsim_bf16 (at the end), scores in bf16 math on
   AVX512_BF16 dot products or AMX tiles.

   One source for both instruction sets: the kernel is written with GCC vector types of
   W = MAXSIM_W floats (8: one AVX2 register; 16: one AVX-512 register). Built with W = 16 on a
   CPU without AVX-512, the compiler runs each 16-float vector as two 8-float ones: the same
   code, so the tests check the AVX-512 kernel's logic on any x86 machine.

   No score tensor is ever stored. maxsim.py packs the real query vectors of all queries into
   blocks of ROWS = 2W rows (nr rows in all) laid out (nr/ROWS, D, ROWS), so that one D step of
   a block is two registers, and gives each row its query (owner, -1 for padding). Per candidate the kernel
   walks its real vectors NB at a time (then NS = 4): for every d, broadcast c[j][d] for the NB
   vectors and multiply-add into ROWS x NB dot products (2 NB registers); then max over the NB
   vectors into a running maximum per row (2 registers). After the candidate's last block each
   row's maximum is added to its query's score. A short block repeats the last vector (a repeat
   does not change a maximum). With one vector per candidate (r_c = 1, a plain product) the NB
   columns are NB candidates instead, so the (1, 1) budget wastes nothing, and D is cut in slices
   so that a slice of the query rows stays in L1 across a tile of candidates. Candidate vectors
   are read with their strides, so budget prefixes c[:, :r_c] need no copy. The next block is
   prefetched while one runs. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "maxsim.c needs AVX2, FMA and F16C"
#endif
#ifndef MAXSIM_W
#ifdef __AVX512F__
#define MAXSIM_W 16
#else
#define MAXSIM_W 8
#endif
#endif

/* NB: 2 NB sums stay in registers with the block's 2 registers and a broadcast (AVX2: 12 + 3 of
   16 registers; AVX-512: 24 + 3 of 32), and the block is read once per 2 NB multiply-adds.
   TILE x DS: the candidates and the D slice of one r_c = 1 tile (TILE a multiple of NB). */
enum { W = MAXSIM_W, ROWS = 2 * W, NB = W == 16 ? 12 : 6, NS = 4, TILE = 48, DS = 128 };
typedef float vf __attribute__((vector_size(4 * MAXSIM_W)));      /* W floats */
typedef int32_t vi __attribute__((vector_size(4 * MAXSIM_W)));    /* W lanes of comparison */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* acc[t] = rows 0..W-1 . b[t], acc[nb + t] = rows W..2W-1 . b[t] for t < nb, for a block qb
   (D, ROWS); add: start from acc instead of 0. Per d: 2 loads of the block, nb broadcasts,
   2 nb multiply-adds (vector * scalar + vector: gcc contracts it to one FMA). */
static inline __attribute__((always_inline)) void dot_block(const float *qb, const float *const *b, int nb,
                                                            int64_t D, vf acc[2 * NB], int add) {
    vf s0[NB], s1[NB];
    for (int t = 0; t < nb; t++) {
        s0[t] = add ? acc[t] : (vf){0};
        s1[t] = add ? acc[nb + t] : (vf){0};
    }
    for (int64_t d = 0; d < D; d++, qb += ROWS) {
        vf x0 = vload(qb), x1 = vload(qb + W);
#pragma GCC unroll 12
        for (int t = 0; t < nb; t++) {
            float y = b[t][d];
            s0[t] += x0 * y;
            s1[t] += x1 * y;
        }
    }
    for (int t = 0; t < nb; t++) { acc[t] = s0[t]; acc[nb + t] = s1[t]; }
}

static inline void dot_blockn(const float *qb, const float *const *b, int nb, int64_t D, vf acc[2 * NB],
                              int add) {
    if (nb == NB) dot_block(qb, b, NB, D, acc, add);   /* two copies, each with nb a constant */
    else dot_block(qb, b, NS, D, acc, add);
}

static inline void prefetch(const void *x, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)x + b, _MM_HINT_T0);
}

/* Bytes of n elements of candidate type ctype (binary: n bits, n a multiple of 8). */
static inline int64_t ebytes(int ctype, int64_t n) {
    return ctype == 0 ? 4 * n : ctype <= 2 ? 2 * n : ctype == 3 ? n : n / 8;
}

/* The candidate vector at element offset off as float32: in place (ctype 0), or widened from
   bfloat16 (1: the high half of a float32) or float16 (2: F16C) into dst, exact either way; or
   dequantised into dst: int8 codes (3) or sign bits (4, off in bits, bit d % 8 of byte d / 8
   set = positive) times the vector's scale. */
static inline const float *cvec(const void *c, int ctype, int64_t off, int64_t D, float *dst, float scale) {
    if (ctype == 0) return (const float *)c + off;
    int64_t d = 0;
    if (ctype == 3) {
        const int8_t *b = (const int8_t *)c + off;
        __m256 s = _mm256_set1_ps(scale);
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(dst + d, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                            _mm_loadl_epi64((const __m128i *)(b + d))))));
        for (; d < D; d++) dst[d] = scale * b[d];
        return dst;
    }
    if (ctype == 4) {
        const uint8_t *b = (const uint8_t *)c + off / 8;
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 pos = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-scale);
        for (; d + 8 <= D; d += 8) {
            __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b[d / 8]), bit), bit);
            _mm256_storeu_ps(dst + d, _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(on)));
        }
        for (; d < D; d++) dst[d] = (b[d / 8] >> (d % 8)) & 1 ? scale : -scale;
        return dst;
    }
    const uint16_t *h = (const uint16_t *)c + off;
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

/* Adds row r's value s[r] to its query's score out[owner[r], n] for the ROWS rows of a block. */
static inline void add_rows(const float *s, const int64_t *owner, float *out, int64_t son, int64_t n) {
    for (int r = 0; r < ROWS; r++)
        if (owner[r] >= 0) out[owner[r] * son + n] += s[r];
}

/* r_c = 1, one vector a candidate: a plain product, blocked like a GEMM. The NB columns are NB
   candidates, so the (1, 1) budget wastes nothing. Tiles of TILE candidates (GT groups of NB) x
   D slices of DS; per slice, group by group, the group's slice is used for every row block
   while it is in L1 (a 16-bit group is widened into wide, NB x DS floats, first), and the
   ROWS x NB sums carry over between slices in part (nr/ROWS x GT groups x 2 NB registers). */
static int maxsim_rc1(const float *qp, const int64_t *owner, int64_t nr, int64_t Nq, const void *c, int ctype,
                      const uint8_t *cm, float *out, int64_t D, int64_t n0, int64_t n1, int64_t scn, int64_t scmn,
                      int64_t son, float *wide, const float *sc, int64_t ssn) {
    enum { GT = TILE / NB };
    float s[ROWS];
    vf *part = aligned_alloc(64, sizeof(vf) * 2 * NB * GT * (nr / ROWS));
    if (!part) return -1;
    for (int64_t n = n0, next; n < n1; n = next) {
        /* group g: nbs[g] columns, the first ks[g] real (the rest repeat the last), candidate
           cand[g][t] in column t; NB columns while NB candidates are left, else NS. A tile of short
           groups covers fewer than TILE candidates, so the next starts where this one ended. */
        int64_t G = 0, nbs[GT], ks[GT], cand[GT][NB];
        for (next = n; next < n1 && G < GT; next += nbs[G++]) {
            nbs[G] = n1 - next >= NB ? NB : NS;
            ks[G] = n1 - next < nbs[G] ? n1 - next : nbs[G];
            for (int64_t t = 0; t < nbs[G]; t++) cand[G][t] = next + (t < ks[G] ? t : ks[G] - 1);
        }
        for (int64_t d0 = 0; d0 < D; d0 += DS) {
            int64_t len = D - d0 < DS ? D - d0 : DS;
            /* after the last group: the first group of the tile's next slice, or of the next tile */
            int64_t more = d0 + DS < D, pd = more ? d0 + DS : 0, pn = more ? n : next;
            int64_t pe = more ? next : (next + TILE < n1 ? next + TILE : n1), plen = D - pd < DS ? D - pd : DS;
            for (int64_t g = 0; g < G; g++) {                    /* a group's slice, for every row block */
                /* the next group's slice is fetched while this one is used. One group at a time:
                   a whole tile's slice does not stay in L1 (at D = 1536 candidates lie 6 KB apart,
                   so their lines fall in 2 of its 64 sets) and would push out the query rows */
                if (g + 1 < G)
                    for (int64_t t = 0; t < ks[g + 1]; t++)
                        prefetch((const char *)c + ebytes(ctype, cand[g + 1][t] * scn + d0), ebytes(ctype, len));
                else
                    for (int64_t m = pn; m < pn + NB && m < pe; m++)
                        prefetch((const char *)c + ebytes(ctype, m * scn + pd), ebytes(ctype, plen));
                const float *b[NB];                              /* column t's slice [d0, d0 + len) */
                for (int64_t t = 0; t < nbs[g]; t++)
                    b[t] = t >= ks[g] ? b[ks[g] - 1] : cvec(c, ctype, cand[g][t] * scn + d0, len, wide + t * DS,
                                                            sc ? sc[cand[g][t] * ssn] : 1.0f);
                for (int64_t r0 = 0; r0 < nr; r0 += ROWS)
                    dot_blockn(qp + r0 * D + d0 * ROWS, b, nbs[g], len, part + 2 * NB * (GT * (r0 / ROWS) + g),
                               d0 > 0);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            int64_t m = cand[g][0];
            for (int64_t a = 0; a < Nq; a++)
                for (int64_t t = 0; t < ks[g]; t++) out[a * son + m + t] = 0.0f;
            for (int64_t r0 = 0; r0 < nr; r0 += ROWS) {
                vf *acc = part + 2 * NB * (GT * (r0 / ROWS) + g);
                for (int64_t t = 0; t < ks[g]; t++) {
                    if (cm && !cm[(m + t) * scmn]) continue;   /* no real vector: scores 0 */
                    vstore(s, acc[t]);
                    vstore(s + W, acc[nbs[g] + t]);
                    add_rows(s, owner + r0, out, son, m + t);
                }
            }
        }
    }
    free(part);
    return 0;
}

/* r_c > 1: per candidate, its real vectors NB (then NS) at a time against each block of ROWS
   query rows; the max over r_c is kept in registers and only each row's maximum is added to
   its query's score. */
static int maxsim_multi(const float *qp, const int64_t *owner, int64_t nr, int64_t Nq, const void *c, int ctype,
                        const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                        int64_t scr, int64_t scmn, int64_t scmr, int64_t son, float *wide, const float *sc,
                        int64_t ssn, int64_t ssr) {
    vf acc[2 * NB];
    float s[ROWS];
    /* 16-bit candidates are widened as a whole for several row blocks, block by block (in L1)
       for a single one */
    int lazy = ctype && nr == ROWS;
    const float *col[4096 + NS];  /* r_c <= 4096: maxsim._MAX_RC, checked there */
    int64_t off[4096 + NS];
    float scl[4096 + NS];         /* each vector's scale (int8 / binary; 1 otherwise) */
    for (int64_t n = n0; n < n1; n++) {
        int64_t J = 0;
        for (int64_t j = 0; j < r_c; j++)
            if (!cm || cm[n * scmn + j * scmr]) {
                off[J] = n * scn + j * scr;
                scl[J] = sc ? sc[n * ssn + j * ssr] : 1.0f;
                col[J] = lazy ? NULL : cvec(c, ctype, off[J], D, wide + J * D, scl[J]);
                J++;
            }
        for (int64_t a = 0; a < Nq; a++) out[a * son + n] = 0.0f;
        if (J == 0) continue;                 /* a candidate with no real vector scores 0 */
        /* blocks of NB, then of NS (AVX2: 64 = 10 x 6 + 4, 8 = 4 + 4); only NS for a single block
           of rows, which streams the corpus once and is faster with the smaller block */
        int64_t Jb = nr > ROWS ? J / NB : 0;
        while (Jb > 0 && (J - NB * Jb) % NS) Jb--;
        if ((J - NB * Jb) % NS) Jb = J / NB;  /* no exact split: pad the last block of NS */
        Jb *= NB;
        while ((J - Jb) % NS) { col[J] = col[J - 1]; off[J] = off[J - 1]; scl[J] = scl[J - 1]; J++; }
        for (int64_t r0 = 0; r0 < nr; r0 += ROWS) {
            vf m0 = (vf){0} - INFINITY, m1 = m0;
            vi nan0 = (vi){0}, nan1 = nan0;   /* all ones where a product was NaN */
            for (int64_t j = 0, nb; j < J; j += nb) {                    /* max_j, nb at a time */
                nb = j < Jb ? NB : NS;
                for (int64_t t = 0; r0 == 0 && t < nb; t++) {            /* the next nb vectors */
                    if (j + nb + t < J) prefetch((const char *)c + ebytes(ctype, off[j + nb + t]), ebytes(ctype, D));
                    else if (n + 1 < n1 && t < r_c)
                        prefetch((const char *)c + ebytes(ctype, (n + 1) * scn + t * scr), ebytes(ctype, D));
                }
                for (int64_t t = 0; lazy && t < nb; t++)
                    col[j + t] = cvec(c, ctype, off[j + t], D, wide + t * D, scl[j + t]);
                dot_blockn(qp + r0 * D, col + j, nb, D, acc, 0);
                for (int64_t t = 0; t < nb; t++) {
                    vi g0 = acc[t] > m0, g1 = acc[nb + t] > m1;        /* max, lane by lane */
                    m0 = (vf)((g0 & (vi)acc[t]) | (~g0 & (vi)m0));
                    m1 = (vf)((g1 & (vi)acc[nb + t]) | (~g1 & (vi)m1));
                    nan0 |= acc[t] != acc[t];
                    nan1 |= acc[nb + t] != acc[nb + t];
                }
            }
            /* the comparison drops a NaN; like torch's amax, a NaN product makes the maximum NaN
               (all-ones bits are a NaN) */
            vstore(s, (vf)((vi)m0 | nan0));
            vstore(s + W, (vf)((vi)m1 | nan1));
            add_rows(s, owner + r0, out, son, n);                        /* sum_i of the maxima */
        }
    }
    return 0;
}

/* Query rows per packed block, for maxsim.py's packing: 2 W. */
int maxsim_rows(void) { return ROWS; }

/* One piece of candidates [n0, n1) (see maxsim_c). */
static int maxsim_piece(const float *qp, const int64_t *owner, int64_t nr, int64_t Nq, const void *c, int ctype,
                        const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                        int64_t scr, int64_t scmn, int64_t scmr, int64_t son, const float *sc, int64_t ssn,
                        int64_t ssr) {
    /* widened 16-bit candidates: a candidate's vectors (and the padding of its last block), or a
       tile's slice */
    float *wide = ctype ? malloc(sizeof(float) * (r_c == 1 ? NB * DS : (r_c + NS) * D)) : NULL;
    if (ctype && !wide) return -1;
    int status = r_c == 1 ? maxsim_rc1(qp, owner, nr, Nq, c, ctype, cm, out, D, n0, n1, scn, scmn, son, wide, sc, ssn)
                          : maxsim_multi(qp, owner, nr, Nq, c, ctype, cm, out, r_c, D, n0, n1, scn, scr, scmn, scmr,
                                         son, wide, sc, ssn, ssr);
    free(wide);
    return status;
}

/* Whether maxsim_c splits the work over threads itself (built with OpenMP). */
int maxsim_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* qp (nr/ROWS, D, ROWS) packed query rows, owner (nr,) their queries (-1 = padding), nr a multiple
   of ROWS; c (N_c, r_c, D) of type ctype (0 float32, 1 bfloat16, 2 float16, 3 int8, 4 sign bits)
   with stride 1 over D, cm (N_c, r_c) uint8 (1 = real) or NULL; out (Nq, N_c) row stride son;
   strides in elements (bits for ctype 4); sc (N_c, r_c) float32 scales (ctype 3, 4) or NULL,
   strides ssn, ssr.
   Scores candidates n0 <= n < n1 with `threads` OpenMP threads, in pieces, four a thread so that
   an uneven one is absorbed. Built with OpenMP in a process that has loaded torch, these are
   torch's own OpenMP threads (the same libgomp): two pools would spin on each other's cores.
   Returns 0, or -1 when out of memory. */
int maxsim_c(const float *qp, const int64_t *owner, int64_t nr, int64_t Nq,
             const void *c, int ctype, const uint8_t *cm, float *out, int64_t r_c, int64_t D,
             int64_t n0, int64_t n1, int64_t scn, int64_t scr, int64_t scmn, int64_t scmr,
             int64_t son, int threads, const float *sc, int64_t ssn, int64_t ssr) {
    int64_t step = (n1 - n0 + 4 * threads - 1) / (4 * threads);
    if (step < 4) step = 4;
    int status = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : status)
    for (int64_t p = n0; p < n1; p += step)
        status |= maxsim_piece(qp, owner, nr, Nq, c, ctype, cm, out, r_c, D, p, p + step < n1 ? p + step : n1, scn,
                               scr, scmn, scmr, son, sc, ssn, ssr);
    return status;
}

/* ---------------------------------------------------------------------------------------------
   bf16 math on the CPU's bf16 units, float32 outputs:

       out[a, n] = sum_{i real} max_{j real} scale[n, j] * <bf16(q[a, i]), c[n, j]>

   The query rounded to bf16 (by cpu_kernel.py), the candidate vectors bf16 already (an int8 code or
   a sign is exact in bf16: its scale multiplies the float32 product), each product exact and summed
   in float32, and no rounding of the dot product on output: the one difference from float32 math
   is the query's rounding (and the units' flushing of bf16 denormals, below 1e-38, to zero). Two
   units compute the dot products:
     unit 0, AVX512_BF16 (Zen 4, Cooper Lake and later Xeons): VDPBF16PS, 16 float32 lanes each
       summing two bf16 products, the query's 32 rows of a block in two registers (packed by
       maxsim.py as (nr/32, DP/2, 32 rows, 2)), a candidate's pair of elements broadcast;
     unit 1, AMX-BF16 (Sapphire Rapids and later): TDPBF16PS on tiles, 16 x 16 float32 results
       per instruction (the query packed as (nr/16, DP/32, 16 pairs, 16 rows, 2), the B tiles).
   A group of candidates' real vectors is gathered (bf16 copied; int8 / sign bits expanded) into
   abuf, rows of DP = D rounded up to 32 elements (zero-padded), at most RMAX rows (or one whole
   candidate). Per block of 32 query rows, the unit fills sbuf (a row of abuf x the 32 query rows,
   float32); each candidate's rows are then scaled and reduced to its maximum per query row, which
   is added to the row's query's score. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <sys/syscall.h>
#include <unistd.h>

enum { RMAX = 128, NBF = 12 };   /* NBF: candidate rows a unit-0 block (24 sums + 2 query registers) */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
/* Asks Linux for the AMX tile state (once a process; 0 = granted). */
int maxsim_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }
struct tilecfg { uint8_t palette, start; uint8_t zero[14]; uint16_t colsb[16]; uint8_t rows[16]; };
#else
#define HAVE_AMX 0
int maxsim_amx_init(void) { return -1; }
#endif

/* Which units this build has: bit 0 AVX512_BF16, bit 1 AMX-BF16. */
int maxsim_bf16_units(void) { return 1 | (HAVE_AMX << 1); }

/* Row of abuf (DP bf16) from the candidate vector at element offset off (bits for ctype 4). */
static inline void bf16_row(uint16_t *dst, const void *c, int ctype, int64_t off, int64_t D, int64_t DP) {
    int64_t d = 0;
    if (ctype == 1) {
        memcpy(dst, (const uint16_t *)c + off, 2 * D);
        d = D;
    } else if (ctype == 3) {                       /* int8 codes -> bf16, exact (|code| <= 127) */
        const int8_t *b = (const int8_t *)c + off;
        for (; d + 16 <= D; d += 16) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + d))));
            _mm256_storeu_si256((__m256i *)(dst + d), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
        }
        for (; d < D; d++) { float f = b[d]; uint32_t u; memcpy(&u, &f, 4); dst[d] = u >> 16; }
    } else {                                       /* sign bits -> +-1.0 (0x3f80 / 0xbf80) */
        const uint8_t *b = (const uint8_t *)c + off / 8;
        for (; d + 32 <= D; d += 32) {
            uint32_t m; memcpy(&m, b + d / 8, 4);
            _mm512_storeu_si512(dst + d, _mm512_mask_blend_epi16(m, _mm512_set1_epi16((short)0xbf80), _mm512_set1_epi16(0x3f80)));
        }
        for (; d < D; d++) dst[d] = (b[d / 8] >> (d % 8)) & 1 ? 0x3f80 : 0xbf80;
    }
    memset(dst + d, 0, 2 * (DP - d));
}

/* unit 0: sbuf[p + t][0..31] = abuf row p + t . the 32 query rows of qb (DP/2, 32, 2), t < NBF. */
static inline void scores_dp(const uint16_t *qb, const uint16_t *a, int64_t DP, float *sb) {
    __m512 s0[NBF], s1[NBF];
    for (int t = 0; t < NBF; t++) s0[t] = s1[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < DP / 2; k++, qb += 64) {
        __m512bh x0 = (__m512bh)_mm512_load_si512(qb), x1 = (__m512bh)_mm512_load_si512(qb + 32);
#pragma GCC unroll 12
        for (int t = 0; t < NBF; t++) {
            uint32_t pair; memcpy(&pair, a + t * DP + 2 * k, 4);
            __m512bh y = (__m512bh)_mm512_set1_epi32((int)pair);
            s0[t] = _mm512_dpbf16_ps(s0[t], x0, y);
            s1[t] = _mm512_dpbf16_ps(s1[t], x1, y);
        }
    }
    for (int t = 0; t < NBF; t++) { _mm512_store_ps(sb + 32 * t, s0[t]); _mm512_store_ps(sb + 32 * t + 16, s1[t]); }
}

static int maxsim_bf16_piece(const uint16_t *qB, const int64_t *owner, int64_t nr, int64_t Nq, const void *c, int ctype,
                             const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                             int64_t scr, int64_t scmn, int64_t scmr, int64_t son, const float *sc, int64_t ssn,
                             int64_t ssr, int unit) {
    const int64_t DP = (D + 31) / 32 * 32, rmax = r_c > RMAX ? (r_c + 31) / 32 * 32 : RMAX;
    const int64_t RB = unit ? 32 : NBF;            /* abuf rows a block of the unit */
    uint16_t *abuf = aligned_alloc(64, 2 * (rmax + 32) * DP);
    float *sbuf = aligned_alloc(64, sizeof(float) * (rmax + 32) * 32), *scl = malloc(sizeof(float) * rmax);
    int64_t *gn = malloc(sizeof(int64_t) * (rmax + 1) * 3), *g0 = gn + rmax + 1, *gJ = g0 + rmax + 1;
    int64_t *roff = malloc(sizeof(int64_t) * (rmax + 32) * 2), *ast = roff + rmax + 32;   /* a row's offset */
    const uint16_t **ab = malloc(sizeof(uint16_t *) * (rmax + 32) / 16);   /* a 16-row block's rows... */
    if (!abuf || !sbuf || !scl || !gn || !roff || !ab) {                   /* ...and their stride: ast */
        free(abuf); free(sbuf); free(scl); free(gn); free(roff); free(ab);
        return -1;
    }
#if HAVE_AMX
    if (unit) {
        struct tilecfg cfg = {.palette = 1};
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
    }
#endif
    for (int64_t n = n0; n < n1;) {
        int64_t R = 0, G = 0;                      /* rows gathered, candidates in the group */
        while (n < n1) {
            int64_t J = 0;
            for (int64_t j = 0; j < r_c; j++) J += !cm || cm[n * scmn + j * scmr];
            if (G > 0 && (R + J > rmax || G > rmax)) break;   /* rows, and candidates (empty ones add none) */
            gn[G] = n; g0[G] = R; gJ[G] = J; G++;
            for (int64_t j = 0; j < r_c; j++)
                if (!cm || cm[n * scmn + j * scmr]) {
                    roff[R] = n * scn + j * scr;
                    scl[R++] = sc ? sc[n * ssn + j * ssr] : 1.0f;
                }
            n++;
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t a = 0; a < Nq; a++) out[a * son + gn[g]] = 0.0f;   /* no real vector: 0 */
        int64_t RP = (R + RB - 1) / RB * RB;
        /* AMX on bf16 rows (D a multiple of 32): a block of 16 real rows evenly spaced in the index is
           loaded in place (no copy: S5 reads the index once, from memory); any other block, and
           every row for unit 0, is gathered into abuf (copied, or expanded from int8 / bits) */
        for (int64_t b = 0; b < (RP + 15) / 16; b++) {
            int64_t r = 16 * b, st = r + 1 < R ? roff[r + 1] - roff[r] : 0, direct = unit && ctype == 1 && D % 32 == 0 &&
                                                                           r + 16 <= R && st > 0;
            for (int64_t i = r + 1; direct && i < r + 16; i++) direct = roff[i] - roff[i - 1] == st;
            if (direct) {
                ab[b] = (const uint16_t *)c + roff[r];
                ast[b] = 2 * st;
                continue;
            }
            for (int64_t i = r; i < r + 16 && i < RP; i++) {
                if (i < R) bf16_row(abuf + i * DP, c, ctype, roff[i], D, DP);
                else memset(abuf + i * DP, 0, 2 * DP);
            }
            ab[b] = abuf + r * DP;
            ast[b] = 2 * DP;
        }
        for (int64_t r0 = 0; r0 < nr; r0 += 32) {
            if (!unit) {
                for (int64_t p = 0; p < RP; p += NBF) scores_dp(qB + r0 * DP, abuf + p * DP, DP, sbuf + p * 32);
            }
#if HAVE_AMX
            else {
                const int64_t KS = DP / 32;
                const uint16_t *b0 = qB + (r0 / 16) * KS * 512, *b1 = b0 + KS * 512;
                for (int64_t p = 0; p < RP; p += 32) {
                    const uint16_t *a0 = ab[p / 16], *a1 = ab[p / 16 + 1];
                    const int64_t s0 = ast[p / 16], s1 = ast[p / 16 + 1];
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int64_t k = 0; k < KS; k++) {
                        _tile_loadd(4, a0 + 32 * k, s0);
                        _tile_loadd(5, a1 + 32 * k, s1);
                        _tile_loadd(6, b0 + 512 * k, 64);
                        _tile_loadd(7, b1 + 512 * k, 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, sbuf + p * 32, 128);        /* sbuf[row][query row], 32 a row */
                    _tile_stored(1, sbuf + p * 32 + 16, 128);
                    _tile_stored(2, sbuf + (p + 16) * 32, 128);
                    _tile_stored(3, sbuf + (p + 16) * 32 + 16, 128);
                }
            }
#endif
            for (int64_t g = 0; g < G; g++) {
                if (!gJ[g]) continue;
                __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
                __mmask16 nan0 = 0, nan1 = 0;              /* like torch's amax, a NaN product wins */
                for (int64_t r = g0[g]; r < g0[g] + gJ[g]; r++) {
                    __m512 s = _mm512_set1_ps(scl[r]);
                    __m512 v0 = _mm512_mul_ps(s, _mm512_load_ps(sbuf + r * 32));
                    __m512 v1 = _mm512_mul_ps(s, _mm512_load_ps(sbuf + r * 32 + 16));
                    nan0 |= _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q);
                    nan1 |= _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
                    m0 = _mm512_max_ps(m0, v0);
                    m1 = _mm512_max_ps(m1, v1);
                }
                m0 = _mm512_mask_mov_ps(m0, nan0, _mm512_set1_ps(NAN));
                m1 = _mm512_mask_mov_ps(m1, nan1, _mm512_set1_ps(NAN));
                float s[32];
                _mm512_storeu_ps(s, m0);
                _mm512_storeu_ps(s + 16, m1);
                for (int r = 0; r < 32; r++)
                    if (owner[r0 + r] >= 0) out[owner[r0 + r] * son + gn[g]] += s[r];
            }
        }
    }
#if HAVE_AMX
    if (unit) _tile_release();
#endif
    free(abuf); free(sbuf); free(scl); free(gn); free(roff); free(ab);
    return 0;
}

/* unit 0 for one query (nr == 16: one block of 16 query rows; the query's real vectors, or those of
   a few queries, 16 at most): the one-query shapes, which the 32-row blocks above ran half empty.
   The 16 rows stay in one register, packed (DP/2, 16 rows, 2); the candidates' real vectors are one
   stream of rows, read in place (bf16: no copy; int8 / sign bits expanded to bf16 a block at a time),
   NBO rows a block: per pair of elements, one load of the query and NBO broadcast candidate pairs
   into NBO dot products (NBO + 1 of 32 registers; on Zen 5 this loop, on data in L1, runs at ~95% of
   VDPBF16PS's register-only rate). With only one or two real query rows (the 1x1 and 2x4 budgets),
   dots_rows instead: whole rows against whole rows, summed across lanes. Each row's 16 sums are
   scaled (int8 / binary), maxed into its candidate's running maximum in a register, and each
   candidate's maxima added to their queries' scores. A block may span candidates, so only a piece's
   last block is short (padded with its last row, whose sums are dropped). */
enum { NBO = 12 };

/* acc[t] = the 16 query rows of qb . row b[t] (K pairs, then the odd last element), t < NBO */
static inline __attribute__((always_inline)) void dots_one(const uint16_t *qb, const uint16_t *const *b, int64_t K,
                                                           int odd, __m512 acc[NBO]) {
    __m512 s[NBO];
    for (int t = 0; t < NBO; t++) s[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++, qb += 32) {
        __m512bh x = (__m512bh)_mm512_load_si512(qb);
#pragma GCC unroll 12
        for (int t = 0; t < NBO; t++) {
            uint32_t pair; memcpy(&pair, b[t] + 2 * k, 4);
            s[t] = _mm512_dpbf16_ps(s[t], x, (__m512bh)_mm512_set1_epi32((int)pair));
        }
    }
    if (odd) {                       /* the last element alone: never read past a row's end */
        __m512bh x = (__m512bh)_mm512_load_si512(qb);
        for (int t = 0; t < NBO; t++) s[t] = _mm512_dpbf16_ps(s[t], x, (__m512bh)_mm512_set1_epi32(b[t][2 * K]));
    }
    for (int t = 0; t < NBO; t++) acc[t] = s[t];
}

/* acc[t] = the query rows . row b[t] for NL = 1 or 2 real rows, in lanes lane[l] (0 elsewhere): qr holds
   the NL rows whole (DP elements each, zero-padded); 32 elements of a candidate row a load, summed
   across the lanes at the end. For one or two query vectors (the 1x1 and 2x4 budgets) the 16-row
   block above would do 8-16x the work. */
static inline __attribute__((always_inline)) void dots_rows_n(const uint16_t *qr, const int NL, const int *lane,
                                                              const uint16_t *const *b, int64_t D, int64_t DP,
                                                              __m512 acc[NBO]) {
    __m512 s0[NBO], s1[NBO];
    for (int t = 0; t < NBO; t++) s0[t] = s1[t] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        __m512bh x0 = (__m512bh)_mm512_load_si512(qr + d), x1 = (__m512bh)_mm512_load_si512(qr + (NL - 1) * DP + d);
#pragma GCC unroll 12
        for (int t = 0; t < NBO; t++) {
            __m512bh y = (__m512bh)_mm512_loadu_si512(b[t] + d);
            s0[t] = _mm512_dpbf16_ps(s0[t], x0, y);
            if (NL == 2) s1[t] = _mm512_dpbf16_ps(s1[t], x1, y);
        }
    }
    if (d < D) {                     /* the last D % 32 elements: a masked load, never past a row's end */
        __mmask32 k = (__mmask32)((1ull << (D - d)) - 1);
        __m512bh x0 = (__m512bh)_mm512_load_si512(qr + d), x1 = (__m512bh)_mm512_load_si512(qr + (NL - 1) * DP + d);
        for (int t = 0; t < NBO; t++) {
            __m512bh y = (__m512bh)_mm512_maskz_loadu_epi16(k, b[t] + d);
            s0[t] = _mm512_dpbf16_ps(s0[t], x0, y);
            if (NL == 2) s1[t] = _mm512_dpbf16_ps(s1[t], x1, y);
        }
    }
    for (int t = 0; t < NBO; t++) {
        __m512 v = _mm512_mask_mov_ps(_mm512_setzero_ps(), (__mmask16)(1u << lane[0]),
                                      _mm512_set1_ps(_mm512_reduce_add_ps(s0[t])));
        if (NL == 2) v = _mm512_mask_mov_ps(v, (__mmask16)(1u << lane[1]), _mm512_set1_ps(_mm512_reduce_add_ps(s1[t])));
        acc[t] = v;
    }
}

static void dots_rows(const uint16_t *qr, int nl, const int *lane, const uint16_t *const *b, int64_t D, int64_t DP,
                      __m512 acc[NBO]) {
    if (nl == 2) dots_rows_n(qr, 2, lane, b, D, DP, acc);   /* two copies, each with NL a constant */
    else dots_rows_n(qr, 1, lane, b, D, DP, acc);
}

/* the rows of one block: pointers, candidates (-1: padding), scales */
struct rows_one { const uint16_t *b[NBO]; int64_t cand[NBO]; float scl[NBO]; int nb; };

/* Fills blk with the next NBO real rows from candidate *n, vector *j on (expanded into ab for
   int8 / binary), padded with its last row; nb = the real ones (0: none left). */
static void next_rows(struct rows_one *blk, int64_t *n, int64_t *j, int64_t n1, const void *c, int ctype,
                      const uint8_t *cm, int64_t r_c, int64_t D, int64_t DP, int64_t scn, int64_t scr, int64_t scmn,
                      int64_t scmr, const float *sc, int64_t ssn, int64_t ssr, uint16_t *ab) {
    int nb = 0;
    while (*n < n1 && nb < NBO) {
        if (!cm || cm[*n * scmn + *j * scmr]) {
            int64_t off = *n * scn + *j * scr;
            if (ctype == 1) blk->b[nb] = (const uint16_t *)c + off;
            else {
                bf16_row(ab + nb * DP, c, ctype, off, D, DP);
                blk->b[nb] = ab + nb * DP;
            }
            blk->cand[nb] = *n;
            blk->scl[nb++] = sc ? sc[*n * ssn + *j * ssr] : 1.0f;
        }
        if (++*j == r_c) { *j = 0; ++*n; }
    }
    blk->nb = nb;
    for (int t = nb; t < NBO; t++) { blk->b[t] = nb ? blk->b[nb - 1] : NULL; blk->cand[t] = -1; }
}

/* Adds candidate n's maxima m (NaN where nan) of the real rows lane[0..nl) to their queries' scores. */
static inline void add_maxima(__m512 m, __mmask16 nan, const int *lane, int nl, const int64_t *owner, float *out,
                              int64_t son, int64_t n) {
    float s[16];
    _mm512_storeu_ps(s, _mm512_mask_mov_ps(m, nan, _mm512_set1_ps(NAN)));
    for (int l = 0; l < nl; l++) out[owner[lane[l]] * son + n] += s[lane[l]];
}

static int maxsim_bf16_one(const uint16_t *qB, const int64_t *owner, int64_t Nq, const void *c, int ctype,
                           const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                           int64_t scr, int64_t scmn, int64_t scmr, int64_t son, const float *sc, int64_t ssn,
                           int64_t ssr) {
    const int64_t DP = (D + 31) / 32 * 32, K = D / 2;
    int lane[16], nl = 0;                              /* the real rows, and their queries */
    for (int r = 0; r < 16; r++)
        if (owner[r] >= 0) lane[nl++] = r;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t a = 0; a < Nq; a++) out[a * son + n] = 0.0f;   /* no real vector: 0 */
    if (nl == 0) return 0;
    uint16_t *ab = ctype == 1 ? NULL : aligned_alloc(64, 2 * 2 * NBO * DP);   /* two blocks of expanded rows */
    uint16_t *qr = aligned_alloc(64, 2 * 2 * DP);      /* <= 2 real rows whole, for dots_rows */
    if ((ctype != 1 && !ab) || !qr) { free(ab); free(qr); return -1; }
    for (int l = 0; l < nl && l < 2; l++)
        for (int64_t k = 0; k < DP; k++) qr[l * DP + k] = qB[k / 2 * 32 + 2 * lane[l] + k % 2];
    struct rows_one blk[2];
    int64_t n = n0, j = 0, cur = -1;
    next_rows(&blk[0], &n, &j, n1, c, ctype, cm, r_c, D, DP, scn, scr, scmn, scmr, sc, ssn, ssr, ab);
    __m512 m = _mm512_set1_ps(-INFINITY), acc[NBO];
    __mmask16 nan = 0;                                 /* like torch's amax, a NaN product wins */
    for (int i = 0; blk[i].nb; i ^= 1) {
        struct rows_one *now = &blk[i], *nx = &blk[i ^ 1];
        next_rows(nx, &n, &j, n1, c, ctype, cm, r_c, D, DP, scn, scr, scmn, scmr, sc, ssn, ssr,
                  ab ? ab + (i ^ 1) * NBO * DP : NULL);
        /* the next block's rows fetched while this one runs, where both fit in L1 with room (S1: 3 KB a
           block); larger rows stream on the hardware prefetcher (fetched into L1 they would push out the
           rows in use; measured no faster at D = 1536) */
        for (int t = 0; ctype == 1 && 4 * NBO * D <= 16384 && t < nx->nb; t++) prefetch(nx->b[t], 2 * D);
        if (nl <= 2) dots_rows(qr, nl, lane, now->b, D, DP, acc);
        else dots_one(qB, now->b, K, D & 1, acc);
        for (int t = 0; t < now->nb; t++) {
            __m512 v = sc ? _mm512_mul_ps(_mm512_set1_ps(now->scl[t]), acc[t]) : acc[t];
            if (now->cand[t] != cur) {                 /* the next candidate: the last one's maxima added */
                if (cur >= 0) add_maxima(m, nan, lane, nl, owner, out, son, cur);
                cur = now->cand[t];
                m = _mm512_set1_ps(-INFINITY);
                nan = 0;
            }
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
    }
    if (cur >= 0) add_maxima(m, nan, lane, nl, owner, out, son, cur);
    free(ab);
    free(qr);
    return 0;
}

/* As maxsim_c, in bf16 math on `unit` (0 AVX512_BF16, 1 AMX), with qB the bf16 query packed for
   the unit and nr a multiple of 32 (unit 0: or 16, one block of rows, maxsim_bf16_one); candidates
   bfloat16 (1), int8 (3) or sign bits (4).
   Returns 0, -1 when out of memory, -2 for another type or a unit this build lacks. */
int maxsim_bf16(const uint16_t *qB, const int64_t *owner, int64_t nr, int64_t Nq, const void *c, int ctype,
                const uint8_t *cm, float *out, int64_t r_c, int64_t D, int64_t n0, int64_t n1, int64_t scn,
                int64_t scr, int64_t scmn, int64_t scmr, int64_t son, int threads, const float *sc, int64_t ssn,
                int64_t ssr, int unit) {
    if ((ctype != 1 && ctype != 3 && ctype != 4) || !(maxsim_bf16_units() >> unit & 1)) return -2;
    int64_t step = (n1 - n0 + 4 * threads - 1) / (4 * threads);
    if (step < 4) step = 4;
    int status = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : status)
    for (int64_t p = n0; p < n1; p += step)
        status |= !unit && nr == 16
                      ? maxsim_bf16_one(qB, owner, Nq, c, ctype, cm, out, r_c, D, p, p + step < n1 ? p + step : n1,
                                        scn, scr, scmn, scmr, son, sc, ssn, ssr)
                      : maxsim_bf16_piece(qB, owner, nr, Nq, c, ctype, cm, out, r_c, D, p, p + step < n1 ? p + step : n1,
                                          scn, scr, scmn, scmr, son, sc, ssn, ssr, unit);
    return status;
}
#else
int maxsim_bf16_units(void) { return 0; }
int maxsim_amx_init(void) { return -1; }
#endif
