/*
 * The per-layer glue of one decode step, in C: what runs between a layer's projections.
 *
 * A decode step of a small model is mostly small operations: on the default model (30 layers,
 * hidden 576, 9 query / 3 key-value heads of 64) the projections' fused k-bit kernel takes
 * ~15 ms per token on one core and the ~40 torch operations around them per layer (RMSNorm
 * as pow/mean/rsqrt/mul, rotary as flip/cat/mul/add, two index_put's into the KV cache, a
 * mask, scaled_dot_product_attention, SiLU, residual adds) another ~10 ms, each a few
 * microseconds of dispatch around a few hundred flops, and none of it parallel. Here they
 * are three calls per layer:
 *
 * - add_rms_norm: hidden += delta (the residual add; skipped when delta is 0), then
 *   y = weight * (hidden * rsqrt(mean(hidden^2) + eps)): transformers' RMSNorm in float32,
 *   its products in its order; the mean is summed in double (torch sums float32 in its own
 *   vector order: the two agree to float32 rounding).
 * - attend: for every row r (one new token each, at position p = lengths[r]): rotary on its
 *   query and key heads (x*cos + rotate_half(x)*sin: the same two products and one add per
 *   element as transformers, in that order, no FMA contraction), the key and value written
 *   to the cache at column p, then each query head attends over the columns 0..p of its
 *   key-value head (grouped-query: heads / kv_heads query heads share one): scores
 *   q.k * scale, a softmax (max subtracted, exp, sum in float32), the values' weighted sum.
 *   Every row sees only its own columns, so no mask is built.
 * - swiglu: gate = silu(gate) * up in place, silu(x) = x / (1 + exp(-x)) as torch's.
 * - lora_rows: each row's own adapter's update of a site (the projections sharing an input):
 *   h = A_cat x (the site's scaled A's stacked), out_j += B_j h[part j], row by row. A row's
 *   update is computed the same way whatever else is in the batch (bit-identical batched and
 *   alone), G adapters cost G reads of their weights and no gather, and B is read as B^T
 *   [r, out] so that the inner loop runs along contiguous outputs.
 *
 * The reference is the torch path of qlora/models/batch_decode.py (BatchDecoder with
 * c_glue=False); tests/models/test_decode_glue.py compares the two ops by op and step by
 * step (logits to float32 rounding of the summation order; greedy tokens equal). The hot
 * loops are compiled for AVX-512, AVX2 and plain x86-64 (GCC target_clones: the loader picks
 * one for this CPU). Only integers cross the boundary: pointers from Tensor.data_ptr(),
 * checked by the Python side (qlora/models/decode_glue.py: dtypes, shapes, contiguity).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "matvec.h"
#include "exp_approx.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

/* Below this many multiply-adds of attention one thread beats waking the pool. */
#define ATTEND_PARALLEL_MIN 65536
/* Columns scored at a time (an online softmax across chunks; one chunk up to this many). */
#define SCORE_CHUNK 512
#define MAX_HEAD_DIM 512

static inline float dot(const float *a, const float *b, int64_t d) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < d; i++) total += a[i] * b[i];
    return total;
}

HOT static void add_rms_norm(float *hidden, const float *delta, const float *weight, float *y,
                             int64_t n, int64_t h, float eps) {
    for (int64_t row = 0; row < n; row++) {
        float *x = hidden + row * h;
        if (delta != NULL) {
            const float *dx = delta + row * h;
#pragma omp simd
            for (int64_t i = 0; i < h; i++) x[i] = x[i] + dx[i];
        }
        double squares = 0.0;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < h; i++) squares += (double)x[i] * (double)x[i];
        const float mean = (float)(squares / (double)h);
        const float r = 1.0f / sqrtf(mean + eps);
        float *out = y + row * h;
#pragma omp simd
        for (int64_t i = 0; i < h; i++) {
            const float normed = x[i] * r;
            out[i] = weight[i] * normed;
        }
    }
}

/* x[d] <- x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]; products rounded first. */
HOT static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    float rotated[MAX_HEAD_DIM];
    for (int64_t i = 0; i < half; i++) rotated[i] = -x[i + half];
    for (int64_t i = half; i < d; i++) rotated[i] = x[i - half];
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
        const float a = x[i] * cos[i];
        const float b = rotated[i] * sin[i];
        x[i] = a + b;
    }
}

/* out[d] = softmax(scale * q.K[0..columns)) . V[0..columns): an online softmax over chunks
 * of SCORE_CHUNK columns (one chunk for every context up to that: the plain softmax). */
HOT static void attend_head(const float *q, const float *keys, const float *values,
                            int64_t columns, int64_t d, float scale, float *out) {
    float scores[SCORE_CHUNK];
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t start = 0; start < columns; start += SCORE_CHUNK) {
        const int64_t count = columns - start < SCORE_CHUNK ? columns - start : SCORE_CHUNK;
        float chunk_max = -INFINITY;
        for (int64_t j = 0; j < count; j++) {
            scores[j] = dot(q, keys + (start + j) * d, d) * scale;
            chunk_max = scores[j] > chunk_max ? scores[j] : chunk_max;
        }
        const float new_max = chunk_max > running_max ? chunk_max : running_max;
        if (running_max != -INFINITY && new_max != running_max) {
            const float shrink = exp_approx(running_max - new_max);
            running_sum *= shrink;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) out[i] *= shrink;
        }
        running_max = new_max;
        float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
        for (int64_t j = 0; j < count; j++) {
            scores[j] = exp_approx(scores[j] - new_max);
            chunk_sum += scores[j];
        }
        running_sum += chunk_sum;
        for (int64_t j = 0; j < count; j++) {
            const float p = scores[j];
            const float *v = values + (start + j) * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) out[i] += p * v[i];
        }
    }
    const float inverse = 1.0f / running_sum;
#pragma omp simd
    for (int64_t i = 0; i < d; i++) out[i] *= inverse;
}

typedef struct {
    float *q, *k, *v;               /* [n, heads, d], [n, kv_heads, d] x 2 (rotary in place) */
    float *key_cache, *value_cache; /* [slots, kv_heads, capacity, d] */
    const int64_t *lengths;         /* [n]: the new token's column in each row */
    const float *cos, *sin;         /* [n, d] */
    float *out;                     /* [n, heads, d] */
    int64_t n, heads, kv_heads, d, capacity;
    float scale;
} Attention;

static void attend(const Attention *a, int nthreads) {
    const int64_t d = a->d, group = a->heads / a->kv_heads;
    int64_t work = 0;
    for (int64_t r = 0; r < a->n; r++) {
        const int64_t p = a->lengths[r];
        const float *cos = a->cos + r * d, *sin = a->sin + r * d;
        for (int64_t h = 0; h < a->heads; h++) rope(a->q + (r * a->heads + h) * d, cos, sin, d);
        for (int64_t g = 0; g < a->kv_heads; g++) {
            float *k = a->k + (r * a->kv_heads + g) * d;
            const float *v = a->v + (r * a->kv_heads + g) * d;
            rope(k, cos, sin, d);
            const int64_t at = ((r * a->kv_heads + g) * a->capacity + p) * d;
            for (int64_t i = 0; i < d; i++) {
                a->key_cache[at + i] = k[i];
                a->value_cache[at + i] = v[i];
            }
        }
        work += (p + 1) * a->heads * d;
    }
    if (work < ATTEND_PARALLEL_MIN) nthreads = 1;
    const int64_t tasks = a->n * a->heads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t r = t / a->heads, h = t % a->heads, g = h / group;
        const int64_t base = (r * a->kv_heads + g) * a->capacity * d;
        attend_head(a->q + t * d, a->key_cache + base, a->value_cache + base, a->lengths[r] + 1,
                    d, a->scale, a->out + t * d);
    }
}

HOT static void swiglu(float *gate, const float *up, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) {
        const float x = gate[i];
        const float silu = x / (1.0f + exp_approx(-x));
        gate[i] = silu * up[i];
    }
}

/* A site's low-rank update for one adapter, as lora_rows.SiteUpdate.descriptor lays it out
 * (int64): a [rank, in] (scaled), rank, in, then per projection j < 3: bt_j [r_j, out_j]
 * (B transposed; 0: the adapter leaves projection j alone), first and last of its ranks
 * within a's rows, out_j. */
enum { DESC_A, DESC_RANK, DESC_IN, DESC_PARTS, DESC_PART_SIZE = 4 };
#define MAX_SITE_RANK 1024 /* lora_rows.MAX_DESCRIBED_RANK */
#define LORA_CHUNK 256
/* Below this many multiply-adds of low-rank updates one thread beats waking the pool. */
#define LORA_PARALLEL_MIN 262144

/* Rows that share an adapter are updated together, up to this many at a time: the adapter's
 * weights are read once for all of them (each row's arithmetic is the same as alone). */
#define LORA_GROUP 8

/* out_i[out_width] += bt[r, out_width]^T h_i[r] for the m rows of a group, LORA_CHUNK outputs
 * at a time: each row of bt is loaded once for all m rows. */
HOT static void add_low_rank(float *const *outs, const float (*h)[MAX_SITE_RANK], int m,
                             int64_t first, const float *bt, int64_t r, int64_t out_width) {
    float delta[LORA_GROUP][LORA_CHUNK];
    for (int64_t c0 = 0; c0 < out_width; c0 += LORA_CHUNK) {
        const int64_t width = out_width - c0 < LORA_CHUNK ? out_width - c0 : LORA_CHUNK;
        for (int i = 0; i < m; i++)
            for (int64_t c = 0; c < width; c++) delta[i][c] = 0.0f;
        for (int64_t k = 0; k < r; k++) {
            const float *row = bt + k * out_width + c0;
            for (int i = 0; i < m; i++) {
                const float hk = h[i][first + k];
                float *d = delta[i];
#pragma omp simd
                for (int64_t c = 0; c < width; c++) d[c] += hk * row[c];
            }
        }
        for (int i = 0; i < m; i++) {
            float *out = outs[i] + c0;
            const float *d = delta[i];
#pragma omp simd
            for (int64_t c = 0; c < width; c++) out[c] = out[c] + d[c];
        }
    }
}

/* The update of `m` rows (indices rows[0..m)) that share the descriptor `desc`. */
HOT static void low_rank_rows(const float *x, const int64_t *desc, float *const *outs,
                              const int64_t *widths, const int64_t *rows, int m) {
    const float *a = (const float *)desc[DESC_A];
    const int64_t rank = desc[DESC_RANK], in = desc[DESC_IN];
    float h[LORA_GROUP][MAX_SITE_RANK]; /* 32 KiB of stack */
    for (int64_t k = 0; k < rank; k++) {
        const float *ak = a + k * in;
        for (int i = 0; i < m; i++) h[i][k] = dot(ak, x + rows[i] * in, in);
    }
    for (int j = 0; j < 3; j++) {
        const int64_t *part = desc + DESC_PARTS + j * DESC_PART_SIZE;
        if (part[0] == 0) continue;
        float *row_outs[LORA_GROUP];
        for (int i = 0; i < m; i++) row_outs[i] = outs[j] + rows[i] * widths[j];
        add_low_rank(row_outs, (const float(*)[MAX_SITE_RANK])h, m, part[1],
                     (const float *)part[0], part[2] - part[1], widths[j]);
    }
}

static PyObject *py_add_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long hidden, delta, weight, y;
    long long n, h;
    float eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLf", &hidden, &delta, &weight, &y, &n, &h, &eps))
        return NULL;
    if (n < 0 || h <= 0) {
        PyErr_SetString(PyExc_ValueError, "add_rms_norm needs n >= 0 and h > 0");
        return NULL;
    }
    add_rms_norm((float *)hidden, (const float *)delta, (const float *)weight, (float *)y, n, h,
                 eps);
    Py_RETURN_NONE;
}

/* Every row's new column must lie inside the KV cache: 0 when it does, else -1 with a
   ValueError naming the caller and the row. */
static int check_columns(const char *who, const int64_t *columns, long long n,
                         long long capacity) {
    for (long long r = 0; r < n; r++) {
        if (columns[r] < 0 || columns[r] >= capacity) {
            PyErr_Format(PyExc_ValueError, "%s: row %lld's column %lld is outside the "
                         "cache's %lld columns", who, r, (long long)columns[r], capacity);
            return -1;
        }
    }
    return 0;
}

static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, key_cache, value_cache, lengths, cos, sin, out;
    long long n, heads, kv_heads, d, capacity;
    float scale;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKLLLLLfi", &q, &k, &v, &key_cache, &value_cache,
                          &lengths, &cos, &sin, &out, &n, &heads, &kv_heads, &d, &capacity,
                          &scale, &nthreads))
        return NULL;
    if (n < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || d <= 0 || d % 2 ||
        d > MAX_HEAD_DIM || capacity <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "attend needs heads a multiple of kv_heads and an even head dim <= 512");
        return NULL;
    }
    const int64_t *len = (const int64_t *)lengths;
    if (check_columns("attend", len, n, capacity))
        return NULL;
    const Attention a = {(float *)q, (float *)k, (float *)v, (float *)key_cache,
                         (float *)value_cache, len, (const float *)cos, (const float *)sin,
                         (float *)out, n, heads, kv_heads, d, capacity, scale};
    Py_BEGIN_ALLOW_THREADS;
    attend(&a, nthreads < 1 ? 1 : nthreads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    unsigned long long gate, up;
    long long count;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKL", &gate, &up, &count)) return NULL;
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "swiglu needs count >= 0");
        return NULL;
    }
    swiglu((float *)gate, (const float *)up, count);
    Py_RETURN_NONE;
}

/* Checks the descriptors of a site's n rows (NULL: no update) against the site's input width
 * and outputs; returns the update's multiply-adds, or -1 with `message` filled. */
static int64_t check_site(const int64_t *const *descs, int64_t n, int64_t in,
                          float *const outs[3], const int64_t widths[3], char *message,
                          size_t length) {
    int64_t work = 0;
    for (int64_t r = 0; r < n; r++) {
        const int64_t *desc = descs[r];
        if (desc == NULL) continue;
        if (desc[DESC_IN] != in || desc[DESC_RANK] < 0 || desc[DESC_RANK] > MAX_SITE_RANK) {
            snprintf(message, length, "lora_rows: row %lld's update reads %lld features at "
                     "rank %lld; the site has %lld (ranks up to %d)", (long long)r,
                     (long long)desc[DESC_IN], (long long)desc[DESC_RANK], (long long)in,
                     MAX_SITE_RANK);
            return -1;
        }
        work += desc[DESC_RANK] * in;
        for (int j = 0; j < 3; j++) {
            const int64_t *part = desc + DESC_PARTS + j * DESC_PART_SIZE;
            if (part[0] == 0) continue;
            if (outs[j] == NULL || part[3] != widths[j] || part[1] < 0 || part[1] > part[2] ||
                part[2] > desc[DESC_RANK]) {
                snprintf(message, length, "lora_rows: row %lld's projection %d update (%lld "
                         "outputs, ranks %lld..%lld) does not fit the site's output of %lld",
                         (long long)r, j, (long long)part[3], (long long)part[1],
                         (long long)part[2], (long long)widths[j]);
                return -1;
            }
            work += (part[2] - part[1]) * part[3];
        }
    }
    return work;
}

/* Adds each row's update (descriptors checked by check_site). `order` [n] and `starts`
 * [n + 1] are scratch. Rows that share a descriptor go together, LORA_GROUP at a time, in
 * order of first appearance. */
static void run_site(const float *x, int64_t n, int64_t in, const int64_t *const *descs,
                     float *const outs[3], const int64_t widths[3], int64_t work, int nthreads,
                     int64_t *order, int64_t *starts) {
    if (work == 0) return;
    if (work < LORA_PARALLEL_MIN || nthreads < 1) nthreads = 1;
    int64_t placed = 0, tasks = 0;
    for (int64_t r = 0; r < n; r++) {
        if (descs[r] == NULL) continue;
        int seen = 0;
        for (int64_t earlier = 0; earlier < r; earlier++) seen |= descs[earlier] == descs[r];
        if (seen) continue;
        for (int64_t s = r; s < n; s++) {
            if (descs[s] != descs[r]) continue;
            if (tasks == 0 || placed - starts[tasks - 1] == LORA_GROUP ||
                descs[order[placed - 1]] != descs[r])
                starts[tasks++] = placed;
            order[placed++] = s;
        }
    }
    starts[tasks] = placed;
    (void)in;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t *rows = order + starts[t];
        low_rank_rows(x, descs[rows[0]], outs, widths, rows, (int)(starts[t + 1] - starts[t]));
    }
}

static PyObject *py_lora_rows(PyObject *self, PyObject *args) {
    unsigned long long x, table, out0, out1, out2;
    long long n, in, width0, width1, width2;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLKKKKLLLi", &x, &n, &in, &table, &out0, &out1, &out2,
                          &width0, &width1, &width2, &nthreads))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "lora_rows needs n >= 0");
        return NULL;
    }
    float *const outs[3] = {(float *)out0, (float *)out1, (float *)out2};
    const int64_t widths[3] = {width0, width1, width2};
    const int64_t *const *descs = (const int64_t *const *)table;
    char message[256];
    const int64_t work = check_site(descs, n, in, outs, widths, message, sizeof message);
    if (work < 0) {
        PyErr_SetString(PyExc_ValueError, message);
        return NULL;
    }
    int64_t *scratch = malloc(sizeof(int64_t) * (size_t)(2 * n + 1));
    if (scratch == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS;
    run_site((const float *)x, n, in, descs, outs, widths, work, nthreads, scratch,
             scratch + n);
    Py_END_ALLOW_THREADS;
    free(scratch);
    Py_RETURN_NONE;
}

/* ---- a whole step's layers ----------------------------------------------------------------
 *
 * layers() runs every decoder layer of a step in one call: per layer the two norms, the
 * seven projections through _matvec's kernel (its capsule), their biases, each row's adapter
 * updates, attention and SwiGLU, then the final norm; Python does the rest (embedding,
 * rotary angles, the output head). The same arithmetic as the calls above made one by one
 * from Python (add_rms_norm, matmul, lora_rows, attend, swiglu), in the same order: the
 * layers' results are bit for bit those of BatchDecoder's per-op glue path (tested).
 *
 * A layer's description (int64, LAYER_FIELDS, built by qlora.models.decode_glue): the two
 * norms' weights and eps (float32 bits), then per projection (q, k, v, o, gate, up, down)
 * PROJ_FIELDS: packed, absmax (0 with double quantization), code, absmax_codes, nested_code,
 * nested_absmax, offset (float32 bits), nested_blocksize, out, in, blocksize, bits, bias
 * (0: none). */
enum { PROJ_FIELDS = 13, LAYER_HEAD_FIELDS = 4, PROJECTIONS = 7 };
enum { LAYER_FIELDS = LAYER_HEAD_FIELDS + PROJECTIONS * PROJ_FIELDS };
enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };
enum { SITES_PER_LAYER = 4 };

static const MatvecApi *matvec_api = NULL;

static float float_bits(int64_t bits) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)bits;
    return v.f;
}

HOT static void add_row_bias(float *y, const float *bias, int64_t width) {
#pragma omp simd
    for (int64_t i = 0; i < width; i++) y[i] = y[i] + bias[i];
}

/* y[n, out] = x[n, in] @ deq(W)^T (+ bias) for projection `which` of a layer description. */
static int project(const int64_t *layer, int which, const float *x, int64_t n, float *y,
                   int nthreads) {
    const int64_t *f = layer + LAYER_HEAD_FIELDS + which * PROJ_FIELDS;
    const Problem p = {x, (const uint8_t *)f[0], (const float *)f[1], (const uint8_t *)f[3],
                       (const float *)f[4], (const float *)f[5], float_bits(f[6]), f[7], -1,
                       (const float *)f[2], y, n, f[8], f[9], f[10], (int)f[11], 0};
    if (matvec_api->matmul(p, nthreads)) return -1;
    const float *bias = (const float *)f[12];
    if (bias != NULL)
        for (int64_t r = 0; r < n; r++) add_row_bias(y + r * f[8], bias, f[8]);
    return 0;
}

typedef struct {
    const int64_t *layers;     /* [count, LAYER_FIELDS] */
    int64_t count;
    float *hidden;             /* [n, hidden] (updated in place: the residual stream) */
    int64_t n, hidden_size, intermediate, heads, kv_heads, d, capacity;
    const int64_t *positions;  /* [n] */
    const float *cos, *sin;    /* [n, d] */
    const int64_t *caches;     /* [count, 2]: each layer's key and value cache */
    const int64_t *const *table; /* [count * SITES_PER_LAYER, n] descriptors, or NULL */
    const int64_t *work;       /* [count * SITES_PER_LAYER]: each site's multiply-adds */
    float scale;
    const float *final_norm;
    float final_eps;
    float *out;                /* [n, hidden]: the final norm's output */
} Layers;

static int run_layers(const Layers *L, int nthreads, float *buffer, int64_t *scratch) {
    const int64_t n = L->n, h = L->hidden_size, qd = L->heads * L->d, kvd = L->kv_heads * L->d;
    float *x = buffer, *q = x + n * h, *k = q + n * qd, *v = k + n * kvd, *att = v + n * kvd;
    float *o = att + n * qd, *gate = o + n * h, *up = gate + n * L->intermediate;
    float *down = up + n * L->intermediate;
    const float *pending = NULL;
    for (int64_t i = 0; i < L->count; i++) {
        const int64_t *layer = L->layers + i * LAYER_FIELDS;
        const int64_t *const *sites = L->table ? L->table + i * SITES_PER_LAYER * n : NULL;
        const int64_t *work = L->work + i * SITES_PER_LAYER;
        add_rms_norm(L->hidden, pending, (const float *)layer[0], x, n, h, float_bits(layer[2]));
        if (project(layer, P_Q, x, n, q, nthreads) || project(layer, P_K, x, n, k, nthreads) ||
            project(layer, P_V, x, n, v, nthreads))
            return -1;
        float *const qkv[3] = {q, k, v};
        const int64_t qkv_widths[3] = {qd, kvd, kvd};
        if (sites) run_site(x, n, h, sites, qkv, qkv_widths, work[0], nthreads, scratch, scratch + n);
        const Attention a = {q, k, v, (float *)L->caches[2 * i], (float *)L->caches[2 * i + 1],
                             L->positions, L->cos, L->sin, att, n, L->heads, L->kv_heads, L->d,
                             L->capacity, L->scale};
        attend(&a, nthreads);
        if (project(layer, P_O, att, n, o, nthreads)) return -1;
        float *const o_out[3] = {o, NULL, NULL};
        const int64_t o_widths[3] = {h, 0, 0};
        if (sites) run_site(att, n, qd, sites + n, o_out, o_widths, work[1], nthreads, scratch, scratch + n);
        add_rms_norm(L->hidden, o, (const float *)layer[1], x, n, h, float_bits(layer[3]));
        if (project(layer, P_GATE, x, n, gate, nthreads) ||
            project(layer, P_UP, x, n, up, nthreads))
            return -1;
        float *const mlp_in[3] = {gate, up, NULL};
        const int64_t mlp_widths[3] = {L->intermediate, L->intermediate, 0};
        if (sites) run_site(x, n, h, sites + 2 * n, mlp_in, mlp_widths, work[2], nthreads, scratch, scratch + n);
        swiglu(gate, up, n * L->intermediate);
        if (project(layer, P_DOWN, gate, n, down, nthreads)) return -1;
        float *const down_out[3] = {down, NULL, NULL};
        const int64_t down_widths[3] = {h, 0, 0};
        if (sites) run_site(gate, n, L->intermediate, sites + 3 * n, down_out, down_widths, work[3], nthreads, scratch, scratch + n);
        pending = down;
    }
    add_rms_norm(L->hidden, pending, L->final_norm, L->out, n, h, L->final_eps);
    return 0;
}

static _Thread_local struct {
    void *data;
    size_t bytes;
} layer_buffer = {NULL, 0};

static PyObject *py_layers(PyObject *self, PyObject *args) {
    unsigned long long layers, hidden, positions, cos, sin, caches, table, final_norm, out;
    long long count, n, hidden_size, intermediate, heads, kv_heads, d, capacity;
    float scale, final_eps;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLKLLLLLLLKKKKKfKfKi", &layers, &count, &hidden, &n,
                          &hidden_size, &intermediate, &heads, &kv_heads, &d, &capacity,
                          &positions, &cos, &sin, &caches, &table, &scale, &final_norm,
                          &final_eps, &out, &nthreads))
        return NULL;
    if (matvec_api == NULL) {
        const MatvecApi *api = PyCapsule_Import(QLORA_MATVEC_CAPSULE, 0);
        if (api == NULL) return NULL;
        if (api->version != QLORA_MATVEC_API_VERSION) {
            PyErr_Format(PyExc_ImportError, "_matvec's C API is version %d, _decode needs %d: "
                         "rebuild the package", api->version, QLORA_MATVEC_API_VERSION);
            return NULL;
        }
        matvec_api = api;
    }
    if (n < 0 || count < 1 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || d <= 0 ||
        d % 2 || d > MAX_HEAD_DIM || capacity <= 0 || hidden_size <= 0 || intermediate <= 0) {
        PyErr_SetString(PyExc_ValueError, "layers: bad sizes (heads a multiple of kv_heads, an "
                        "even head dim <= 512, positive widths)");
        return NULL;
    }
    const int64_t *pos = (const int64_t *)positions;
    if (check_columns("layers", pos, n, capacity))
        return NULL;
    const int64_t qd = heads * d, kvd = kv_heads * d;
    /* out, in of each projection, as the layer's sizes want them */
    const int64_t shapes[PROJECTIONS][2] = {{qd, hidden_size}, {kvd, hidden_size},
                                            {kvd, hidden_size}, {hidden_size, qd},
                                            {intermediate, hidden_size},
                                            {intermediate, hidden_size},
                                            {hidden_size, intermediate}};
    const int64_t *desc = (const int64_t *)layers;
    for (long long i = 0; i < count; i++)
        for (int j = 0; j < PROJECTIONS; j++) {
            const int64_t *f = desc + i * LAYER_FIELDS + LAYER_HEAD_FIELDS + j * PROJ_FIELDS;
            if (f[8] != shapes[j][0] || f[9] != shapes[j][1] || f[10] < 32 || f[10] % 32 ||
                f[9] % f[10] || (f[11] != 2 && f[11] != 4 && f[11] != 8)) {
                PyErr_Format(PyExc_ValueError, "layers: layer %lld projection %d is %lld x %lld "
                             "(blocksize %lld, %lld bits); expected %lld x %lld", i, j,
                             (long long)f[8], (long long)f[9], (long long)f[10],
                             (long long)f[11], (long long)shapes[j][0],
                             (long long)shapes[j][1]);
                return NULL;
            }
        }
    const int64_t sites = count * SITES_PER_LAYER;
    int64_t *work = calloc((size_t)sites, sizeof(int64_t));
    int64_t *scratch = malloc(sizeof(int64_t) * (size_t)(2 * n + 1));
    if (work == NULL || scratch == NULL) {
        free(work);
        free(scratch);
        return PyErr_NoMemory();
    }
    const int64_t *const *descs = (const int64_t *const *)table;
    if (descs != NULL) {
        float *dummy = (float *)&scale; /* a non-NULL output: check_site only tests presence */
        const int64_t site_widths[SITES_PER_LAYER][3] = {{qd, kvd, kvd}, {hidden_size, 0, 0},
                                                         {intermediate, intermediate, 0},
                                                         {hidden_size, 0, 0}};
        const int64_t site_in[SITES_PER_LAYER] = {hidden_size, qd, hidden_size, intermediate};
        for (int64_t site = 0; site < sites; site++) {
            const int kind = (int)(site % SITES_PER_LAYER);
            float *const present[3] = {site_widths[kind][0] ? dummy : NULL,
                                       site_widths[kind][1] ? dummy : NULL,
                                       site_widths[kind][2] ? dummy : NULL};
            char message[256];
            work[site] = check_site(descs + site * n, n, site_in[kind], present,
                                    site_widths[kind], message, sizeof message);
            if (work[site] < 0) {
                free(work);
                free(scratch);
                PyErr_Format(PyExc_ValueError, "layer %lld site %d: %s",
                             (long long)(site / SITES_PER_LAYER), kind, message);
                return NULL;
            }
        }
    }
    const size_t floats = (size_t)n * (size_t)(3 * hidden_size + 2 * qd + 2 * kvd + 2 * intermediate);
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    if (bytes > layer_buffer.bytes) {
        free(layer_buffer.data);
        layer_buffer.data = aligned_alloc(64, bytes > 0 ? bytes : 64);
        layer_buffer.bytes = layer_buffer.data != NULL ? bytes : 0;
        if (layer_buffer.data == NULL) {
            free(work);
            free(scratch);
            return PyErr_NoMemory();
        }
    }
    const Layers L = {desc, count, (float *)hidden, n, hidden_size, intermediate, heads,
                      kv_heads, d, capacity, pos, (const float *)cos, (const float *)sin,
                      (const int64_t *)caches, descs, work, scale, (const float *)final_norm,
                      final_eps, (float *)out};
    int rc = 0;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS;
        rc = run_layers(&L, nthreads < 1 ? 1 : nthreads, (float *)layer_buffer.data, scratch);
        Py_END_ALLOW_THREADS;
    }
    free(work);
    free(scratch);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rms_norm", py_add_rms_norm, METH_VARARGS,
     "add_rms_norm(hidden, delta, weight, y, n, h, eps): hidden[n, h] += delta (0: none); "
     "y = weight * hidden * rsqrt(mean(hidden^2) + eps); float32 pointers"},
    {"attend", py_attend, METH_VARARGS,
     "attend(q, k, v, key_cache, value_cache, lengths, cos, sin, out, n, heads, kv_heads, d, "
     "capacity, scale, nthreads): rotary on q, k in place, k/v into the cache at each row's "
     "column lengths[r], out[n, heads, d] = attention over columns 0..lengths[r]"},
    {"swiglu", py_swiglu, METH_VARARGS, "swiglu(gate, up, count): gate = silu(gate) * up"},
    {"lora_rows", py_lora_rows, METH_VARARGS,
     "lora_rows(x, n, in, table, out0, out1, out2, width0, width1, width2, nthreads): for each "
     "row r whose table[r] (a pointer to an int64 site descriptor) is not 0, out_j[r] += "
     "bt_j^T (a x[r])[part j]"},
    {"layers", py_layers, METH_VARARGS,
     "layers(layers, count, hidden, n, hidden_size, intermediate, heads, kv_heads, d, "
     "capacity, positions, cos, sin, caches, table, scale, final_norm, final_eps, out, "
     "nthreads): every decoder layer of one step (see decode.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) { return PyModule_Create(&module); }
