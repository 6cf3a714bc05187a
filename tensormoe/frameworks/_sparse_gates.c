/* Fused CPU kernels of the exact sparse gates (1.5-entmax and sparsemax), forward and backward.
 *
 * Built by setuptools as the optional extension tensormoe._sparse_gates (see setup.py); when it is
 * absent tensormoe.gates computes the same values with array operations.  Each row is handled in a
 * few passes while it sits in the L1/L2 cache:
 *
 *   1. the row maximum m (and whether the row holds NaN or +inf, or only -inf: a NaN row);
 *   2. one Newton (entmax15) or Michelot (sparsemax) step from the bound tau >= -1 over the whole
 *      row, which gives a tighter lower bound t_c <= tau on the threshold (Newton from the left of
 *      the root of a convex decreasing function never overshoots);
 *   3. the logits above t_c are copied to a small buffer (the candidates: a superset of the
 *      support), where Newton (entmax15) or Michelot (sparsemax) iterations in float64 find the
 *      support, and the threshold is solved in closed form on it (exact: the support is checked
 *      consistent, and t_c <= tau is checked, else the search reruns from -1 on every logit);
 *   4. the output relu(z - tau)**2 (entmax15) or relu(z - tau) (sparsemax) is written.
 *
 * Shifted logits: entmax15 z = (x - m) / 2, sparsemax z = x - m; both thresholds lie in [-1, 0].
 * Backward (closed-form Jacobian-vector products, Peters et al. 2019; Martins & Astudillo 2016):
 *   entmax15:  s = sqrt(p), dz = s * dy - s * sum(s * dy) / sum(s)
 *   sparsemax: s = [p > 0], dz = s * (dy - sum(s * dy) / sum(s))
 *
 * Python interface (internal, called by tensormoe.gates with contiguous arrays):
 *   forward(gate, dtype, src_address, dst_address, rows, n, threads)
 *   backward(gate, dtype, p_address, dy_address, dz_address, rows, n, threads)
 * gate: 0 entmax15, 1 sparsemax; dtype: 0 float32, 1 float64; addresses of C-contiguous
 * [rows, n] buffers (dst may equal src); threads: how many threads share the rows.  The GIL is
 * released while the kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

#define MAX_STEPS 100

enum { ENTMAX15 = 0, SPARSEMAX = 1 };

/* ---- threshold search on the compacted candidates (float64) -------------------------------- */

/* 1.5-entmax: threshold of the candidates c[0..k) (shifted logits, maximum 0) from t0 <= tau. */
static double entmax15_threshold(const double *c, Py_ssize_t k, double t0) {
    double t = t0, tau = t0;
    for (int step = 0; step < MAX_STEPS; step++) {
        double s1 = 0.0, s2 = 0.0, low = INFINITY;
        Py_ssize_t count = 0;
        for (Py_ssize_t j = 0; j < k; j++) { /* branch-free: members are unpredictable */
            double d = c[j] - t;
            int in = d > 0;
            double dp = in ? d : 0.0;
            s1 += dp;
            s2 += dp * dp;
            count += in;
            double dl = in ? d : INFINITY;
            low = dl < low ? dl : low;
        }
        if (count == 0) return tau; /* cannot happen from the left of the root; keep the last */
        double excess = s2 - 1.0;
        double disc = s1 * s1 - (double)count * excess;
        int real = disc >= 0;
        double u = real ? excess / (s1 + sqrt(disc)) : 0.0;
        tau = t + u;
        /* consistent: every member of {c > t} lies at or above t + u (non-members lie below t) */
        if (real && (u <= 0 || low >= u)) break;
        double next = t + excess / (2.0 * s1);
        if (!(next > t)) break; /* converged to rounding */
        t = next;
    }
    /* the support S = {c > tau - 0}: solve once more, shifted by the estimate (no cancellation) */
    double s1 = 0.0, s2 = 0.0;
    Py_ssize_t count = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (c[j] > t) {
            double d = c[j] - tau;
            s1 += d;
            s2 += d * d;
            count++;
        }
    }
    double excess = s2 - 1.0;
    double disc = s1 * s1 - (double)count * excess;
    if (count > 0 && disc >= 0) tau += excess / (s1 + sqrt(disc));
    return tau;
}

/* sparsemax: Michelot's iteration on the candidates c[0..k) from t0 <= tau. */
static double sparsemax_threshold(const double *c, Py_ssize_t k, double t0) {
    double t = t0;
    Py_ssize_t size = k + 1;
    for (Py_ssize_t step = 0; step <= k + 1; step++) {
        double s = 0.0;
        Py_ssize_t count = 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            int in = c[j] > t;
            s += in ? c[j] : 0.0;
            count += in;
        }
        if (count == 0 || !(count < size)) break; /* the support stopped shrinking: t is final */
        size = count;
        t = (s - 1.0) / (double)count;
    }
    /* the threshold of the final support {c > t}, from the sum of its members */
    double s = 0.0;
    Py_ssize_t count = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (c[j] > t) {
            s += c[j];
            count++;
        }
    }
    return count ? (s - 1.0) / (double)count : t;
}

/* ---- one row, per dtype -------------------------------------------------------------------- */

#define SCALE(gate) ((gate) == ENTMAX15 ? 0.5 : 1.0)

/* Maximum of x[0..n) and whether the row must come out NaN (a NaN or +inf, or no finite entry). */
static int row_max_f32(const float *x, Py_ssize_t n, double *out) {
    Py_ssize_t j = 0;
    float m = -INFINITY;
    int bad = 0;
#if HAVE_SSE2
    __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0, b0 = _mm_setzero_ps(), b1 = b0;
    const __m128 inf = _mm_set1_ps(INFINITY);
    for (; j + 8 <= n; j += 8) {
        __m128 a = _mm_loadu_ps(x + j), b = _mm_loadu_ps(x + j + 4);
        m0 = _mm_max_ps(m0, a);
        m1 = _mm_max_ps(m1, b);
        b0 = _mm_or_ps(b0, _mm_cmpnlt_ps(a, inf)); /* NaN or +inf: not (a < inf) */
        b1 = _mm_or_ps(b1, _mm_cmpnlt_ps(b, inf));
    }
    float lanes[4];
    _mm_storeu_ps(lanes, _mm_max_ps(m0, m1));
    for (int l = 0; l < 4; l++) m = lanes[l] > m ? lanes[l] : m;
    bad = _mm_movemask_ps(_mm_or_ps(b0, b1)) != 0;
#endif
    for (; j < n; j++) {
        float v = x[j];
        if (v > m) m = v;
        if (!(v < INFINITY)) bad = 1;
    }
    *out = m;
    return bad || m == -INFINITY;
}

static int row_max_f64(const double *x, Py_ssize_t n, double *out) {
    double m0 = -INFINITY, m1 = -INFINITY;
    int bad = 0;
    Py_ssize_t j = 0;
    for (; j + 2 <= n; j += 2) {
        double a = x[j], b = x[j + 1];
        if (a > m0) m0 = a;
        if (b > m1) m1 = b;
        bad |= !(a < INFINITY) | !(b < INFINITY);
    }
    for (; j < n; j++) {
        double v = x[j];
        if (v > m0) m0 = v;
        bad |= !(v < INFINITY);
    }
    double m = m0 > m1 ? m0 : m1;
    *out = m;
    return bad || m == -INFINITY;
}

/* A tighter lower bound on the threshold from a lower bound t, over the whole row (shifted units).
 * From the sums over {z > t} of d = z - t (s1 = sum d, s2 = sum d**2, count): entmax15 takes one
 * Newton step on g(t) = sum relu(z - t)**2 - 1 (from a point left of the root of a convex
 * decreasing function it stays left of it); sparsemax takes Michelot's step, the threshold of the
 * support {z > t}.  The sums are in float: the bound is lowered by a margin, and the caller checks
 * it against the threshold it finds. */
static double next_bound(double t, double s1, double s2, double count, int gate, double margin) {
    double bound;
    if (gate == ENTMAX15) {
        bound = s1 > 0 ? t + (s2 - 1.0) / (2.0 * s1) : t;
    } else {
        bound = count > 0 ? t + (s1 - 1.0) / count : t; /* sum z = s1 + count * t */
    }
    bound -= margin * (bound - t) + margin * 1e-2;
    return bound > t ? bound : t;
}

static double bound_step_f32(const float *x, Py_ssize_t n, double m, int gate, double t) {
    const float scale = (float)SCALE(gate), mf = (float)m, tf = (float)t;
    double s1 = 0.0, s2 = 0.0, count = 0.0;
    Py_ssize_t j = 0;
#if HAVE_SSE2
    const __m128 vm = _mm_set1_ps(mf), vs = _mm_set1_ps(scale), vt = _mm_set1_ps(tf), zero = _mm_setzero_ps();
    const __m128 one = _mm_set1_ps(1.0f);
    __m128 a1 = zero, a2 = zero, ac = zero, b1 = zero, b2 = zero, bc = zero;
    for (; j + 8 <= n; j += 8) {
        /* d = z - t = (x - m) * scale - t on the entries above t */
        __m128 da = _mm_sub_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + j), vm), vs), vt);
        __m128 db = _mm_sub_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + j + 4), vm), vs), vt);
        __m128 ma = _mm_cmpgt_ps(da, zero), mb = _mm_cmpgt_ps(db, zero);
        da = _mm_and_ps(ma, da);
        db = _mm_and_ps(mb, db);
        a1 = _mm_add_ps(a1, da);
        b1 = _mm_add_ps(b1, db);
        a2 = _mm_add_ps(a2, _mm_mul_ps(da, da));
        b2 = _mm_add_ps(b2, _mm_mul_ps(db, db));
        ac = _mm_add_ps(ac, _mm_and_ps(ma, one));
        bc = _mm_add_ps(bc, _mm_and_ps(mb, one));
    }
    float l1[4], l2[4], lc[4];
    _mm_storeu_ps(l1, _mm_add_ps(a1, b1));
    _mm_storeu_ps(l2, _mm_add_ps(a2, b2));
    _mm_storeu_ps(lc, _mm_add_ps(ac, bc));
    for (int l = 0; l < 4; l++) {
        s1 += l1[l];
        s2 += l2[l];
        count += lc[l];
    }
#endif
    for (; j < n; j++) {
        float d = (x[j] - mf) * scale - tf;
        if (d > 0) {
            s1 += d;
            s2 += (double)d * d;
            count += 1.0;
        }
    }
    return next_bound(tf, s1, s2, count, gate, 1e-4);
}

static double bound_step_f64(const double *x, Py_ssize_t n, double m, int gate, double t) {
    const double scale = SCALE(gate);
    double s1 = 0.0, s2 = 0.0, count = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) {
        double d = (x[j] - m) * scale - t;
        if (d > 0) {
            s1 += d;
            s2 += d * d;
            count += 1.0;
        }
    }
    return next_bound(t, s1, s2, count, gate, 1e-9);
}

/* Copy the shifted logits above t (in shifted units) to c; returns how many. */
static Py_ssize_t compact_f32(const float *x, Py_ssize_t n, double m, double scale, double t, double *c) {
    /* x > m + t / scale; screened in float with a threshold rounded down, then checked in float64 */
    float screen = (float)(m + t / scale);
    screen = nextafterf(screen, -INFINITY);
    Py_ssize_t k = 0, j = 0;
#if HAVE_SSE2
    const __m128 vs = _mm_set1_ps(screen);
    for (; j + 8 <= n; j += 8) {
        __m128 a = _mm_loadu_ps(x + j), b = _mm_loadu_ps(x + j + 4);
        int mask = _mm_movemask_ps(_mm_cmpgt_ps(a, vs)) | (_mm_movemask_ps(_mm_cmpgt_ps(b, vs)) << 4);
        while (mask) {
            int l = __builtin_ctz(mask);
            mask &= mask - 1;
            double z = ((double)x[j + l] - m) * scale;
            if (z > t) c[k++] = z;
        }
    }
#endif
    for (; j < n; j++) {
        if (x[j] > screen) {
            double z = ((double)x[j] - m) * scale;
            if (z > t) c[k++] = z;
        }
    }
    return k;
}

static Py_ssize_t compact_f64(const double *x, Py_ssize_t n, double m, double scale, double t, double *c) {
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        double z = (x[j] - m) * scale;
        if (z > t) c[k++] = z;
    }
    return k;
}

/* Whole-row steps before the candidates are copied: each costs a vectorised pass and leaves fewer
 * candidates (whose copying and search branch unpredictably).  Measured on an x86-64 CPU (AMD EPYC,
 * rows of normal logits, 16 to 16384 per row): entmax15 is fastest after three steps up to rows of a
 * thousand and two beyond; sparsemax after one step on short rows and none on long ones (its support
 * is wider: a step removes few candidates). */
static int bound_steps(Py_ssize_t n, int gate) {
    if (n < 16) return 0;
    if (gate == SPARSEMAX) return n < 512;
    return n < 64 ? 2 : (n < 2048 ? 3 : 2);
}

static double threshold(const double *c, Py_ssize_t k, double t0, int gate) {
    return gate == ENTMAX15 ? entmax15_threshold(c, k, t0) : sparsemax_threshold(c, k, t0);
}

static void forward_row_f32(const float *x, float *y, Py_ssize_t n, int gate, double *buffer) {
    double m;
    if (row_max_f32(x, n, &m)) {
        for (Py_ssize_t j = 0; j < n; j++) y[j] = NAN;
        return;
    }
    const double scale = SCALE(gate);
    double bound = -1.0;
    for (int step = 0; step < bound_steps(n, gate); step++) bound = bound_step_f32(x, n, m, gate, bound);
    Py_ssize_t k = compact_f32(x, n, m, scale, bound, buffer);
    double tau = threshold(buffer, k, bound, gate);
    if (!(bound <= tau) && bound > -1.0) { /* the screened bound overshot: search every candidate */
        k = compact_f32(x, n, m, scale, -1.0, buffer);
        tau = threshold(buffer, k, -1.0, gate);
    }
    /* entmax15: y = (max((x - m) - c, 0) / 2)**2; sparsemax: y = max((x - m) - c, 0), c = tau / scale
     * (x - m is exact for the entries near the maximum, so only c is rounded) */
    const float mf = (float)m, c = (float)(tau / scale);
    Py_ssize_t j = 0;
#if HAVE_SSE2
    const __m128 vm = _mm_set1_ps(mf), vc = _mm_set1_ps(c), zero = _mm_setzero_ps(), half = _mm_set1_ps(0.5f);
    if (gate == ENTMAX15) {
        for (; j + 4 <= n; j += 4) {
            __m128 d = _mm_sub_ps(_mm_sub_ps(_mm_loadu_ps(x + j), vm), vc);
            d = _mm_mul_ps(_mm_max_ps(d, zero), half);
            _mm_storeu_ps(y + j, _mm_mul_ps(d, d));
        }
    } else {
        for (; j + 4 <= n; j += 4) {
            __m128 d = _mm_sub_ps(_mm_sub_ps(_mm_loadu_ps(x + j), vm), vc);
            _mm_storeu_ps(y + j, _mm_max_ps(d, zero));
        }
    }
#endif
    for (; j < n; j++) {
        float d = (x[j] - mf) - c;
        d = d > 0 ? d : 0.0f;
        y[j] = gate == ENTMAX15 ? (0.5f * d) * (0.5f * d) : d;
    }
}

static void forward_row_f64(const double *x, double *y, Py_ssize_t n, int gate, double *buffer) {
    double m;
    if (row_max_f64(x, n, &m)) {
        for (Py_ssize_t j = 0; j < n; j++) y[j] = NAN;
        return;
    }
    const double scale = SCALE(gate);
    double bound = -1.0;
    for (int step = 0; step < bound_steps(n, gate); step++) bound = bound_step_f64(x, n, m, gate, bound);
    Py_ssize_t k = compact_f64(x, n, m, scale, bound, buffer);
    double tau = threshold(buffer, k, bound, gate);
    if (!(bound <= tau) && bound > -1.0) {
        k = compact_f64(x, n, m, scale, -1.0, buffer);
        tau = threshold(buffer, k, -1.0, gate);
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        double d = (x[j] - m) - tau / scale;
        d = d > 0 ? d * scale : 0.0;
        y[j] = gate == ENTMAX15 ? d * d : d;
    }
}

/* ---- backward rows ------------------------------------------------------------------------- */

static void backward_row_f32(const float *p, const float *dy, float *dz, Py_ssize_t n, int gate) {
    double num = 0.0, den = 0.0;
    Py_ssize_t j = 0;
#if HAVE_SSE2
    const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
    __m128 vn = zero, vd = zero;
    for (; j + 4 <= n; j += 4) {
        __m128 pv = _mm_loadu_ps(p + j);
        __m128 s = gate == ENTMAX15 ? _mm_sqrt_ps(pv) : _mm_and_ps(_mm_cmpgt_ps(pv, zero), one);
        /* NaN rows: sqrt(NaN) is NaN and keeps the gradient NaN; sparsemax keeps it through dy - v */
        if (gate != ENTMAX15) s = _mm_or_ps(s, _mm_and_ps(_mm_cmpunord_ps(pv, pv), pv));
        vn = _mm_add_ps(vn, _mm_mul_ps(s, _mm_loadu_ps(dy + j)));
        vd = _mm_add_ps(vd, s);
    }
    float ln[4], ld[4];
    _mm_storeu_ps(ln, vn);
    _mm_storeu_ps(ld, vd);
    for (int l = 0; l < 4; l++) {
        num += ln[l];
        den += ld[l];
    }
#endif
    for (; j < n; j++) {
        float s = gate == ENTMAX15 ? sqrtf(p[j]) : (p[j] > 0 ? 1.0f : (p[j] != p[j] ? p[j] : 0.0f));
        num += (double)s * dy[j];
        den += s;
    }
    const float v = (float)(num / den);
    j = 0;
#if HAVE_SSE2
    const __m128 vv = _mm_set1_ps(v);
    for (; j + 4 <= n; j += 4) {
        __m128 pv = _mm_loadu_ps(p + j);
        __m128 s = gate == ENTMAX15 ? _mm_sqrt_ps(pv) : _mm_and_ps(_mm_cmpgt_ps(pv, zero), one);
        if (gate != ENTMAX15) s = _mm_or_ps(s, _mm_and_ps(_mm_cmpunord_ps(pv, pv), pv));
        _mm_storeu_ps(dz + j, _mm_mul_ps(s, _mm_sub_ps(_mm_loadu_ps(dy + j), vv)));
    }
#endif
    for (; j < n; j++) {
        float s = gate == ENTMAX15 ? sqrtf(p[j]) : (p[j] > 0 ? 1.0f : (p[j] != p[j] ? p[j] : 0.0f));
        dz[j] = s * (dy[j] - v);
    }
}

static void backward_row_f64(const double *p, const double *dy, double *dz, Py_ssize_t n, int gate) {
    double num = 0.0, den = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) {
        double s = gate == ENTMAX15 ? sqrt(p[j]) : (p[j] > 0 ? 1.0 : (p[j] != p[j] ? p[j] : 0.0));
        num += s * dy[j];
        den += s;
    }
    const double v = num / den;
    for (Py_ssize_t j = 0; j < n; j++) {
        double s = gate == ENTMAX15 ? sqrt(p[j]) : (p[j] > 0 ? 1.0 : (p[j] != p[j] ? p[j] : 0.0));
        dz[j] = s * (dy[j] - v);
    }
}

/* ---- rows split between threads ------------------------------------------------------------ */

typedef struct {
    int backward, gate, dtype;
    const char *a, *b;
    char *out;
    Py_ssize_t first, last, n;
    int failed;
} Task;

static void *run_task(void *arg) {
    Task *t = (Task *)arg;
    const Py_ssize_t item = t->dtype ? 8 : 4, row = t->n * item;
    if (t->backward) {
        for (Py_ssize_t r = t->first; r < t->last; r++) {
            if (t->dtype)
                backward_row_f64((const double *)(t->a + r * row), (const double *)(t->b + r * row),
                                 (double *)(t->out + r * row), t->n, t->gate);
            else
                backward_row_f32((const float *)(t->a + r * row), (const float *)(t->b + r * row),
                                 (float *)(t->out + r * row), t->n, t->gate);
        }
        return NULL;
    }
    double *buffer = (double *)malloc((size_t)(t->n > 0 ? t->n : 1) * sizeof(double));
    if (buffer == NULL) {
        t->failed = 1;
        return NULL;
    }
    for (Py_ssize_t r = t->first; r < t->last; r++) {
        if (t->dtype)
            forward_row_f64((const double *)(t->a + r * row), (double *)(t->out + r * row), t->n, t->gate, buffer);
        else
            forward_row_f32((const float *)(t->a + r * row), (float *)(t->out + r * row), t->n, t->gate, buffer);
    }
    free(buffer);
    return NULL;
}

#define MAX_THREADS 64

static int run_rows(int backward, int gate, int dtype, const char *a, const char *b, char *out, Py_ssize_t rows,
                    Py_ssize_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    Task tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        tasks[i] = (Task){backward, gate, dtype, a, b, out, rows * i / threads, rows * (i + 1) / threads, n, 0};
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&handles[i], NULL, run_task, &tasks[i]) == 0;
    run_task(&tasks[0]);
    int failed = tasks[0].failed;
    for (int i = 1; i < threads; i++) {
        if (started[i]) {
            pthread_join(handles[i], NULL);
        } else {
            run_task(&tasks[i]); /* no thread to spare: do its rows here */
        }
        failed |= tasks[i].failed;
    }
    return failed;
}

/* ---- Python bindings ----------------------------------------------------------------------- */

static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *name, long long *out) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd integer arguments; got %zd", name, expected, nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nargs; k++) {
        out[k] = PyLong_AsLongLong(args[k]);
        if (out[k] == -1 && PyErr_Occurred()) return -1;
    }
    if ((out[0] != ENTMAX15 && out[0] != SPARSEMAX) || (out[1] != 0 && out[1] != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: gate must be 0 or 1 and dtype 0 or 1; got %lld and %lld", name, out[0],
                     out[1]);
        return -1;
    }
    return 0;
}

static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[7];
    if (parse(args, nargs, 7, "forward", v) < 0) return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_rows(0, (int)v[0], (int)v[1], (const char *)(uintptr_t)v[2], NULL, (char *)(uintptr_t)v[3],
                      (Py_ssize_t)v[4], (Py_ssize_t)v[5], (int)v[6]);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[8];
    if (parse(args, nargs, 8, "backward", v) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_rows(1, (int)v[0], (int)v[1], (const char *)(uintptr_t)v[2], (const char *)(uintptr_t)v[3],
             (char *)(uintptr_t)v[4], (Py_ssize_t)v[5], (Py_ssize_t)v[6], (int)v[7]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL,
     "forward(gate, dtype, src, dst, rows, n, threads): the gate of each row of src written to dst."},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_FASTCALL,
     "backward(gate, dtype, p, dy, dz, rows, n, threads): the gate's vector-Jacobian product written to dz."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sparse_gates", "Fused CPU kernels of the exact sparse gates.", -1, methods,
};

PyMODINIT_FUNC PyInit__sparse_gates(void) { return PyModule_Create(&module); }
