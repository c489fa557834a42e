/*
 * The statement audit's per-statement work in C (included by _pump.c).
 *
 * waypoint/audit/tracker.py (with messages.py and names.py) is the reference: this is the
 * same tracker (framing both directions, pairing the server's answers with the statements,
 * cutting oversized texts with the SHA-256 of the whole) with the same records, encoded
 * here as JSON object members (the session's identity members first, pre-encoded once per
 * session), one record per line. tests/test_audit_ctracker.py feeds both the same byte
 * streams and requires the same records. The pump feeds a relay's tracker without the GIL
 * (Lane.tap_enable); Python takes the encoded records (AuditTracker.take) after each batch.
 *
 * chain() is the sink's hash chain over such lines: each gets "seq" and "prev" (the
 * SHA-256 of the line before it), computed without the GIL.
 *
 * Memory: texts are kept up to max_statement_bytes (names 256, server texts 4096 bytes)
 * whatever their size; the rest is hashed as it passes. The statement and portal tables
 * each stay within max_session_statement_bytes (names.py's Table: the oldest entries
 * evicted, then dropped). Only the engine thread uses a
 * tracker once its relay runs (the pump, or Python on that thread with the GIL).
 */

#include <time.h>

#include <openssl/sha.h>

/* ----------------------------------------------------------------------------------- */
/* SHA-256 (FIPS 180-4)                                                                  */
/* ----------------------------------------------------------------------------------- */

typedef struct {
    uint32_t h[8];
    uint64_t len;
    unsigned char block[64];
    size_t used;
    int ossl;        /* driven by OpenSSL's functions (bound when it started) */
    SHA256_CTX ctx;
} Sha256;

/* OpenSSL's SHA-256 (SHA-NI where the CPU has it), from the library Python's _ssl module
 * loaded (sha256_bind, as tls_bind); until bound, the portable code below. */
static int (*p_sha_init)(SHA256_CTX *);
static int (*p_sha_update)(SHA256_CTX *, const void *, size_t);
static int (*p_sha_final)(unsigned char *, SHA256_CTX *);

static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void
sha256_init(Sha256 *s)
{
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    s->ossl = p_sha_init != NULL;
    if (s->ossl) {
        p_sha_init(&s->ctx);
        return;
    }
    memcpy(s->h, h0, sizeof(h0));
    s->len = 0;
    s->used = 0;
}

static void
sha256_block(Sha256 *s, const unsigned char *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR32(w[i - 15], 7) ^ ROR32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR32(w[i - 2], 17) ^ ROR32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5],
             g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR32(e, 6) ^ ROR32(e, 11) ^ ROR32(e, 25)) + ((e & f) ^ (~e & g)) +
                      sha256_k[i] + w[i];
        uint32_t t2 = (ROR32(a, 2) ^ ROR32(a, 13) ^ ROR32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    s->h[0] += a;
    s->h[1] += b;
    s->h[2] += c;
    s->h[3] += d;
    s->h[4] += e;
    s->h[5] += f;
    s->h[6] += g;
    s->h[7] += h;
}

static void
sha256_update(Sha256 *s, const unsigned char *p, size_t n)
{
    if (n == 0)
        return; /* p may be NULL (an empty buffer) */
    if (s->ossl) {
        p_sha_update(&s->ctx, p, n);
        return;
    }
    s->len += n;
    if (s->used) {
        size_t take = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->block + s->used, p, take);
        s->used += take;
        p += take;
        n -= take;
        if (s->used < 64)
            return;
        sha256_block(s, s->block);
        s->used = 0;
    }
    while (n >= 64) {
        sha256_block(s, p);
        p += 64;
        n -= 64;
    }
    memcpy(s->block, p, n);
    s->used = n;
}

/* The digest as 64 lowercase hex digits (and a NUL) in hex. s is spent. */
static void
sha256_hex(Sha256 *s, char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    if (s->ossl) {
        unsigned char md[32];
        p_sha_final(md, &s->ctx);
        for (int i = 0; i < 32; i++) {
            hex[2 * i] = digits[md[i] >> 4];
            hex[2 * i + 1] = digits[md[i] & 15];
        }
        hex[64] = '\0';
        return;
    }
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80;
    sha256_update(s, &pad, 1);
    unsigned char zero[64] = {0};
    size_t fill = s->used <= 56 ? 56 - s->used : 120 - s->used;
    sha256_update(s, zero, fill);
    unsigned char lenbytes[8];
    for (int i = 0; i < 8; i++)
        lenbytes[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, lenbytes, 8);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) {
            unsigned char byte = (unsigned char)(s->h[i] >> (24 - 8 * j));
            hex[8 * i + 2 * j] = digits[byte >> 4];
            hex[8 * i + 2 * j + 1] = digits[byte & 15];
        }
    hex[64] = '\0';
}

/* ----------------------------------------------------------------------------------- */
/* Allocation                                                                            */
/* ----------------------------------------------------------------------------------- */

/* Every allocation of the tracker goes through these (raw memory: they run without the
 * GIL). Whatever fails, the tracker goes to its failed state (nothing it holds is
 * trusted any more; the relay ends, nothing more is sent) and frees what it allocated.
 *
 * With WAYPOINT_AUDIT_FAULTS defined (the sanitizer build, or a test's own build), the
 * module has audit_faults(n): the n-th allocation from then on fails (0: none), so that
 * tests can make each allocation fail in turn, and the blocks alive are counted (a leak
 * shows). Not in a normal build. Tests only: the counters are not thread-safe. */
#ifdef WAYPOINT_AUDIT_FAULTS
static long long audit_alloc_count; /* allocations since audit_faults() */
static long long audit_fail_at;     /* the one that fails (0: none) */
static long long audit_live;        /* blocks allocated and not freed */

static int
audit_alloc_fails(void)
{
    return ++audit_alloc_count == audit_fail_at;
}

static void *
audit_counted(void *p)
{
    if (p != NULL)
        audit_live++;
    return p;
}

/* audit_faults(n) -> (allocations made since the previous call, blocks alive); the n-th
 * allocation from now fails. */
static PyObject *
audit_faults(PyObject *module, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    long long made = audit_alloc_count;
    audit_alloc_count = 0;
    audit_fail_at = n > 0 ? n : 0;
    return Py_BuildValue("(LL)", made, audit_live);
}
#define AUDIT_FAULTS_FUNCTION                                                                 \
    {"audit_faults", (PyCFunction)audit_faults, METH_O,                                       \
     "audit_faults(n): the n-th audit allocation from now fails (0: none); returns (the "     \
     "number made since the last call, blocks alive). Fault-injection builds only."},
#else
#define audit_alloc_fails() 0
#define audit_counted(p) (p)
#define AUDIT_FAULTS_FUNCTION
#endif

static void *
audit_malloc(size_t n)
{
    return audit_alloc_fails() ? NULL : audit_counted(PyMem_RawMalloc(n));
}

static void *
audit_calloc(size_t count, size_t size)
{
    return audit_alloc_fails() ? NULL : audit_counted(PyMem_RawCalloc(count, size));
}

static void *
audit_realloc(void *p, size_t n)
{
    if (audit_alloc_fails())
        return NULL;
    void *q = PyMem_RawRealloc(p, n);
    return p == NULL ? audit_counted(q) : q;
}

static void
audit_free(void *p)
{
#ifdef WAYPOINT_AUDIT_FAULTS
    if (p != NULL)
        audit_live--;
#endif
    PyMem_RawFree(p);
}

/* ----------------------------------------------------------------------------------- */
/* Buffers and JSON                                                                      */
/* ----------------------------------------------------------------------------------- */

/* A growable byte buffer in raw memory (grown without the GIL). failed is set when memory
 * ran out: what was appended since is lost, and the tracker fails (see tracker_check);
 * it stays set until the buffer is freed. */
typedef struct {
    unsigned char *p;
    size_t len;
    size_t cap;
    int failed;
} Buf;

static int
buf_reserve(Buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 1;
    if (b->failed)
        return 0;
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->len + more)
        cap *= 2;
    unsigned char *p = audit_realloc(b->p, cap);
    if (p == NULL) {
        b->failed = 1;
        return 0;
    }
    b->p = p;
    b->cap = cap;
    return 1;
}

static inline void
buf_put(Buf *b, const void *p, size_t n)
{
    if (n && buf_reserve(b, n)) {
        memcpy(b->p + b->len, p, n);
        b->len += n;
    }
}

static inline void
buf_putc(Buf *b, unsigned char c)
{
    if (buf_reserve(b, 1))
        b->p[b->len++] = c;
}

#define buf_lit(b, s) buf_put((b), (s), sizeof(s) - 1)

static void
buf_free(Buf *b)
{
    audit_free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

static void
buf_int(Buf *b, long long v)
{
    char tmp[24];
    int i = sizeof(tmp);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--i] = '-';
    buf_put(b, tmp + i, sizeof(tmp) - (size_t)i);
}

/* n decimal digits of v, zero-padded. */
static void
buf_digits(Buf *b, long long v, int n)
{
    char tmp[24];
    for (int i = n - 1; i >= 0; i--) {
        tmp[i] = (char)('0' + v % 10);
        v /= 10;
    }
    buf_put(b, tmp, (size_t)n);
}

/* The length of the well-formed UTF-8 sequence at s (> 0), or minus the length of its
 * maximal ill-formed subpart (one U+FFFD each, as Python's "replace" decoding). */
static long
utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    int need;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c == 0xE0) {
        need = 2;
        lo = 0xA0;
    }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
        need = 2;
    else if (c == 0xED) {
        need = 2;
        hi = 0x9F;
    }
    else if (c == 0xF0) {
        need = 3;
        lo = 0x90;
    }
    else if (c >= 0xF1 && c <= 0xF3)
        need = 3;
    else if (c == 0xF4) {
        need = 3;
        hi = 0x8F;
    }
    else
        return -1;
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n || s[k] < lo || s[k] > hi)
            return -k;
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

/* Well-formed UTF-8 throughout (Python's strict decoding succeeds). */
static int
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        long k = utf8_seq(s + i, n - i);
        if (k < 0)
            return 0;
        i += (size_t)k;
    }
    return 1;
}

/* A JSON string for bytes decoded as UTF-8 with replacement (json.dumps with
 * ensure_ascii=False of bytes.decode("utf-8", "replace")). */
static void
json_str(Buf *b, const unsigned char *s, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    if (!buf_reserve(b, n + 2))
        return;
    buf_putc(b, '"');
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && s[run] >= 0x20 && s[run] < 0x80 && s[run] != '"' && s[run] != '\\')
            run++;
        buf_put(b, s + i, run - i);
        i = run;
        if (i >= n)
            break;
        unsigned char c = s[i];
        if (c < 0x80) {
            char esc[7] = {'\\', 0, 0, 0, 0, 0, 0};
            size_t len = 2;
            switch (c) {
            case '"': esc[1] = '"'; break;
            case '\\': esc[1] = '\\'; break;
            case '\n': esc[1] = 'n'; break;
            case '\r': esc[1] = 'r'; break;
            case '\t': esc[1] = 't'; break;
            case '\b': esc[1] = 'b'; break;
            case '\f': esc[1] = 'f'; break;
            default:
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hexd[c >> 4];
                esc[5] = hexd[c & 15];
                len = 6;
            }
            buf_put(b, esc, len);
            i++;
            continue;
        }
        long k = utf8_seq(s + i, n - i);
        if (k > 0) {
            buf_put(b, s + i, (size_t)k);
            i += (size_t)k;
        }
        else {
            buf_lit(b, "\xef\xbf\xbd");
            i += (size_t)(-k);
        }
    }
    buf_putc(b, '"');
}

static void
json_hex(Buf *b, const unsigned char *s, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    if (!buf_reserve(b, 2 * n + 2))
        return;
    b->p[b->len++] = '"';
    for (size_t i = 0; i < n; i++) {
        b->p[b->len++] = (unsigned char)hexd[s[i] >> 4];
        b->p[b->len++] = (unsigned char)hexd[s[i] & 15];
    }
    b->p[b->len++] = '"';
}

/* ----------------------------------------------------------------------------------- */
/* Texts read incrementally (messages.py's Text)                                         */
/* ----------------------------------------------------------------------------------- */

typedef struct {
    Buf kept;
    size_t cap;
    long long size;
    int hashing;    /* the whole is being hashed (it was cut, or always_hash) */
    int discard;    /* keep nothing, hash nothing (parameters = "none") */
    Sha256 sha;
} Text;

static void
text_reset(Text *t, size_t cap, int always_hash)
{
    /* A large buffer is not kept idle; a failed one stays failed (tracker_check). */
    if (t->kept.cap > 65536 && cap < t->kept.cap && !t->kept.failed)
        buf_free(&t->kept);
    t->kept.len = 0;
    t->cap = cap;
    t->size = 0;
    t->discard = 0;
    t->hashing = always_hash;
    if (always_hash)
        sha256_init(&t->sha);
}

static void
text_add(Text *t, const unsigned char *p, size_t n)
{
    t->size += (long long)n;
    if (t->discard)
        return;
    size_t room = t->cap > t->kept.len ? t->cap - t->kept.len : 0;
    if (n > room && !t->hashing) {
        t->hashing = 1;
        sha256_init(&t->sha);
        sha256_update(&t->sha, t->kept.p, t->kept.len);
    }
    buf_put(&t->kept, p, n < room ? n : room);
    if (t->hashing)
        sha256_update(&t->sha, p, n);
}

static int
text_truncated(const Text *t)
{
    return t->size > (long long)t->kept.len;
}

/* The SHA-256 of the whole text (the text stays usable). */
static void
text_sha(const Text *t, char hex[65])
{
    Sha256 s;
    if (t->hashing)
        s = t->sha;
    else {
        sha256_init(&s);
        sha256_update(&s, t->kept.p, t->kept.len);
    }
    sha256_hex(&s, hex);
}

/* "text":"…"[,"text_truncated":true,"text_bytes":N,"text_sha256":"…"] */
static void
json_text_fields(Buf *b, const unsigned char *kept, size_t len, long long size, int truncated,
                 const char *sha)
{
    buf_lit(b, "\"text\":");
    json_str(b, kept, len);
    if (truncated) {
        buf_lit(b, ",\"text_truncated\":true,\"text_bytes\":");
        buf_int(b, size);
        buf_lit(b, ",\"text_sha256\":\"");
        buf_put(b, sha, 64);
        buf_putc(b, '"');
    }
}

/* ----------------------------------------------------------------------------------- */
/* Name tables (prepared statements, portals)                                           */
/* ----------------------------------------------------------------------------------- */

/* What one kept statement or portal counts for beyond its bytes (names.py's ENTRY_COST). */
#define ENTRY_COST 192
/* Cap on names (statement, portal) kept from the wire. */
#define NAME_CAP 256

typedef struct Named {
    struct Named *next;             /* hash chain */
    struct Named *older, *newer;    /* its list: kept, or evicted (oldest first) */
    unsigned char *key;
    size_t klen;
    /* A statement: its kept text, whole size, cut, SHA-256 of the whole (if cut, or
     * evicted). A portal: its statement's name (in text) and its parameter members (in
     * params). Evicted: a statement's text, a portal's parameters are dropped. */
    Buf text;
    long long size;
    int truncated;
    int evicted;
    int pinned;         /* neither counted nor evicted (the unnamed portal) */
    long long bind_id;  /* an evicted portal: the bind record with its parameters */
    char sha[65];
    Buf params;
    /* tracker.py's _change: a Parse, Bind or Close sent and not yet confirmed is kept under
     * its key (NAMED_CHANGE, NAMED_CLOSE: 0x01 and its number) with the name it changes
     * (counted in its cost); under 0x00 and a name, the number (op) of the name's newest
     * such change (NAMED_LATEST). */
    int role;
    Buf name;
    long long op;
    long long segment;  /* a change: the Sync segment it was sent in */
    long long epoch;    /* confirmed: the PREPARE / DEALLOCATE tags (a statement) or the
                         * DECLARE / CLOSE CURSOR tags (a portal) seen before */
} Named;

enum { NAMED_REAL = 0, NAMED_CHANGE, NAMED_CLOSE, NAMED_LATEST };

typedef struct {
    Named *oldest, *newest;
} NamedList;

typedef struct {
    Named **slots;
    size_t nslots; /* a power of two */
    size_t count;
    int is_statements; /* eviction drops the text (statements) or the parameters (portals) */
    long long budget, retained, dropped; /* names.py's Table */
    NamedList kept, evicted;
    int pin_unnamed;                     /* the entry of "" is pinned */
    void (*on_evict)(void *owner, Named *e);
    void *owner;
} Table;

static size_t
name_hash(const unsigned char *p, size_t n)
{
    size_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static long long
named_cost(const Named *e)
{
    return ENTRY_COST + (long long)(e->klen + e->text.len + e->params.len + e->name.len);
}

static void
list_unlink(NamedList *l, Named *e)
{
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        l->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        l->newest = e->older;
    e->older = e->newer = NULL;
}

static void
list_append(NamedList *l, Named *e)
{
    e->newer = NULL;
    e->older = l->newest;
    if (l->newest != NULL)
        l->newest->newer = e;
    else
        l->oldest = e;
    l->newest = e;
}

static void
named_free(Named *e)
{
    audit_free(e->key);
    buf_free(&e->text);
    buf_free(&e->params);
    buf_free(&e->name);
    audit_free(e);
}

static Named **
table_find(Table *t, const unsigned char *key, size_t klen)
{
    if (t->nslots == 0)
        return NULL;
    Named **at = &t->slots[name_hash(key, klen) & (t->nslots - 1)];
    while (*at != NULL && !((*at)->klen == klen && (klen == 0 || memcmp((*at)->key, key, klen) == 0)))
        at = &(*at)->next;
    return at;
}

static Named *
table_get(Table *t, const unsigned char *key, size_t klen)
{
    Named **at = table_find(t, key, klen);
    return at == NULL ? NULL : *at;
}

static void
table_unlink(Table *t, Named **at)
{
    Named *e = *at;
    *at = e->next;
    if (!e->pinned) {
        list_unlink(e->evicted ? &t->evicted : &t->kept, e);
        t->retained -= named_cost(e);
    }
    t->count--;
}

static void
table_remove(Table *t, const unsigned char *key, size_t klen)
{
    Named **at = table_find(t, key, klen);
    if (at != NULL && *at != NULL) {
        Named *e = *at;
        table_unlink(t, at);
        named_free(e);
    }
}

/* An emptied buffer of a reused entry keeps its memory only when small (a large one would
 * be memory the budget does not count). */
static void
buf_empty(Buf *b)
{
    if (b->cap > 1024)
        buf_free(b);
    b->len = 0;
    b->failed = 0;
}

/* The (empty) entry for key, the newest: the existing one emptied (the unnamed statement,
 * replaced at every Parse, keeps its small buffers), or a new one; NULL when memory ran
 * out. The caller fills it, then table_admit()s it. */
static Named *
table_put(Table *t, const unsigned char *key, size_t klen)
{
    Named *old = table_get(t, key, klen);
    if (old != NULL) {
        if (!old->pinned) {
            list_unlink(old->evicted ? &t->evicted : &t->kept, old);
            t->retained -= named_cost(old);
        }
        buf_empty(&old->text);
        buf_empty(&old->params);
        buf_empty(&old->name);
        old->role = NAMED_REAL;
        old->op = old->segment = old->epoch = 0;
        old->size = 0;
        old->truncated = old->evicted = 0;
        if (!old->pinned)
            list_append(&t->kept, old);
        return old;
    }
    if (t->count >= t->nslots) {
        size_t n = t->nslots ? t->nslots * 2 : 16;
        Named **slots = audit_calloc(n, sizeof(Named *));
        if (slots == NULL)
            return NULL;
        for (size_t i = 0; i < t->nslots; i++) {
            Named *e = t->slots[i];
            while (e != NULL) {
                Named *next = e->next;
                size_t j = name_hash(e->key, e->klen) & (n - 1);
                e->next = slots[j];
                slots[j] = e;
                e = next;
            }
        }
        audit_free(t->slots);
        t->slots = slots;
        t->nslots = n;
    }
    Named **at = table_find(t, key, klen);
    Named *e = audit_calloc(1, sizeof(Named));
    if (e == NULL)
        return NULL;
    e->key = audit_malloc(klen ? klen : 1);
    if (e->key == NULL) {
        audit_free(e);
        return NULL;
    }
    if (klen)
        memcpy(e->key, key, klen);
    e->klen = klen;
    *at = e;
    t->count++;
    if (t->pin_unnamed && klen == 0)
        e->pinned = 1;
    else
        list_append(&t->kept, e);
    return e;
}

/* The entry put last is filled: count it, then shrink the table to its budget (the oldest
 * kept entries evicted, then the oldest evicted ones dropped). */
static void
table_admit(Table *t, Named *e)
{
    if (e->pinned)
        return;
    t->retained += named_cost(e);
    while (t->retained > t->budget && t->kept.oldest != NULL) {
        Named *v = t->kept.oldest;
        t->retained -= named_cost(v);
        list_unlink(&t->kept, v);
        if (t->on_evict != NULL)
            t->on_evict(t->owner, v);
        if (t->is_statements) {
            if (!v->truncated) {
                Sha256 s;
                sha256_init(&s);
                sha256_update(&s, v->text.p, v->text.len);
                sha256_hex(&s, v->sha);
            }
            buf_free(&v->text);
        }
        else
            buf_free(&v->params);
        v->evicted = 1;
        t->retained += named_cost(v);
        list_append(&t->evicted, v);
    }
    while (t->retained > t->budget && t->evicted.oldest != NULL) {
        Named *v = t->evicted.oldest;
        /* An unconfirmed change forgotten (or which is a name's newest): what the name had
         * before is forgotten too, as it may be stale. */
        unsigned char also[NAME_CAP + 1];
        size_t alen = 0;
        int has_also = 0;
        if (v->role == NAMED_LATEST && v->klen >= 1 && v->klen - 1 <= NAME_CAP) {
            alen = v->klen - 1;
            memcpy(also, v->key + 1, alen);
            has_also = 1;
        }
        else if ((v->role == NAMED_CHANGE || v->role == NAMED_CLOSE) && v->name.len <= NAME_CAP) {
            alen = v->name.len;
            if (alen)
                memcpy(also, v->name.p, alen);
            has_also = 1;
        }
        table_remove(t, v->key, v->klen);
        t->dropped++;
        if (has_also)
            table_remove(t, also, alen);
    }
}

#define CHANGE_KEY 9

/* The key of the change numbered op (no name from the wire starts with 0x00 or 0x01). */
static void
change_key(unsigned char key[CHANGE_KEY], long long op)
{
    key[0] = 1;
    for (int i = 8; i >= 1; i--) {
        key[i] = (unsigned char)(op & 0xff);
        op >>= 8;
    }
}

/* The unconfirmed entry under key becomes name's, the newest (names.py's Table.adopt):
 * 0 when memory ran out. */
static int
table_adopt(Table *t, const unsigned char key[CHANGE_KEY], const unsigned char *name,
            size_t nlen)
{
    Named *n = table_put(t, name, nlen);
    if (n == NULL)
        return 0;
    Named **at = table_find(t, key, CHANGE_KEY);
    Named *e = *at;
    table_unlink(t, at); /* uncounted as it is, before its buffers move */
    Buf swap = n->text;
    n->text = e->text;
    e->text = swap;
    swap = n->params;
    n->params = e->params;
    e->params = swap;
    n->size = e->size;
    n->truncated = e->truncated;
    memcpy(n->sha, e->sha, sizeof(n->sha));
    n->bind_id = e->bind_id;
    n->epoch = e->epoch;
    n->evicted = e->evicted;
    if (n->evicted && !n->pinned) {
        list_unlink(&t->kept, n);
        list_append(&t->evicted, n);
    }
    named_free(e);
    table_admit(t, n);
    return 1;
}

static void
table_clear(Table *t)
{
    for (size_t i = 0; i < t->nslots; i++) {
        Named *e = t->slots[i];
        while (e != NULL) {
            Named *next = e->next;
            named_free(e);
            e = next;
        }
    }
    audit_free(t->slots);
    t->slots = NULL;
    t->nslots = t->count = 0;
    t->retained = 0;
    t->kept.oldest = t->kept.newest = t->evicted.oldest = t->evicted.newest = NULL;
}

/* ----------------------------------------------------------------------------------- */
/* The tracker                                                                           */
/* ----------------------------------------------------------------------------------- */

#define BACKEND_CAP 4096

enum { MODE_NONE = 0, MODE_HASH = 1, MODE_FULL = 2 };
enum { REQ_DONE = 0, REQ_TAKE, REQ_CSTR, REQ_BLOB };
enum { PEND_SYNC = 0, PEND_QUERY, PEND_EXEC, PEND_FCALL, /* statements: a result each */
       PEND_PARSE, PEND_BIND, PEND_CLOSE_S, PEND_CLOSE_P, PEND_CLOSE, PEND_DESCRIBE };

#define PEND_STATEMENT(k) ((k) == PEND_QUERY || (k) == PEND_EXEC || (k) == PEND_FCALL)

/* Statements and Syncs waiting for the server's answer, at most (tracker.py's
 * MAX_AWAITING): past it the session is ended (awaiting_limit). */
#define MAX_AWAITING 65536

/* One direction's message framing and the body parser of the current message. */
typedef struct {
    unsigned char hdr[HEADER_SIZE];
    int hlen;
    long long skip;      /* body bytes of an unparsed message still to come */
    int in_body;
    int kind;
    long long remaining; /* body bytes of the parsed message still to come */
    /* The body parser: its request, and where it is in its message. */
    int req;
    int need;            /* REQ_TAKE: bytes wanted (<= 4); REQ_BLOB: bytes left */
    unsigned char small[4];
    int got;
    Text *into;          /* REQ_CSTR / REQ_BLOB: where the bytes go */
    int step;
    int malformed;
    /* The message's fields. */
    Text t1, t2, param;
    long long nfmt, ifmt, count, iparam;
    size_t param_left;   /* bytes the message's parameters may still keep, together */
    unsigned char *fmts; /* 1: binary, per format code */
    long long fmts_cap;
    int32_t oid;
    int has_oid;
    unsigned char what;
    Buf values;          /* parameters (JSON values, comma-separated) */
    Buf params;          /* the parameter members of a complete Bind / FunctionCall */
    int has_sqlstate;
    Buf sqlstate;
} Framer;

typedef struct {
    int kind;
    /* An Execute of a named portal: the DECLARE / CLOSE CURSOR tags seen when it was sent,
     * modulo 2^31 (CURSOR_MARK; else -1). Beside kind, it keeps an entry 32 bytes. */
    int cursor;
    long long id;       /* its record's statement_id (0: none) */
    double started;
    /* A Parse, Bind or Close: its change's number. An Execute: the PREPARE / DEALLOCATE
     * tags seen when it was sent, if its statement is named (else -1). */
    long long arg;
} Pending;

#define CURSOR_MARK(n) ((int)((n) & 0x7fffffff))

typedef struct {
    PyObject_HEAD
    /* Configuration. */
    Buf ctx;        /* the identity members (no braces) */
    Buf ctx_short;  /* those a result or copy record carries */
    int mode;
    size_t cap;
    int wall;       /* records carry "time" */
    /* State. */
    long long seq;
    Framer front, back;
    Pending *pending;   /* a ring of pcap entries, pcount from phead */
    size_t pcap, phead, pcount;
    size_t max_awaiting;
    /* What the head of pending (its only entry the server answers) collected. */
    Buf tag;
    long long commands;
    int err_seen;
    int has_sqlstate;
    Buf sqlstate;
    long long copy_data;
    int copy_in;
    int skipping;   /* tracker.py's _skipping: until the client's Sync, nothing is answered */
    long long ops, segment, epoch; /* changes and Syncs sent, PREPARE tags seen */
    long long cursor_epoch;        /* DECLARE / CLOSE CURSOR tags seen */
    Table statements, portals;
    /* Encoded records not yet taken; the statement last run. */
    Buf out;
    long long out_records;
    Buf last;
    int last_set;   /* 0: none yet; 1: text in last; 2: None (an unknown statement) */
    /* refuse_with(): the sink's gate, a byte it sets while it refuses records (failing or
     * full, on_error = "close"): the pump then sends no client read it has not handed to
     * Python (tracker_refusing). */
    Py_buffer gate;
    int has_gate;
    int failed;     /* memory ran out: the tracker must not be trusted any more */
    int limited;    /* past max_awaiting: the session must end (awaiting_limit) */
    size_t mark_len;          /* out and out_records before the chunk being fed */
    long long mark_records;
    double now;
    /* The wall clock second last formatted, and its text. */
    time_t iso_second;
    char iso[32];
} Tracker;

static PyTypeObject TrackerType;

static void
framer_init(Framer *f)
{
    memset(f, 0, sizeof(*f));
}

static void
framer_free(Framer *f)
{
    buf_free(&f->t1.kept);
    buf_free(&f->t2.kept);
    buf_free(&f->param.kept);
    buf_free(&f->values);
    buf_free(&f->params);
    buf_free(&f->sqlstate);
    audit_free(f->fmts);
    f->fmts = NULL;
}

static void
head_reset(Tracker *t)
{
    t->tag.len = 0;
    t->commands = 0;
    t->err_seen = 0;
    t->has_sqlstate = 0;
    t->sqlstate.len = 0;
    t->copy_data = 0;
    t->copy_in = 0;
}

static void record_open(Tracker *t, const Buf *ctx, const char *event, long long id,
                        const char *protocol);
static void record_close(Tracker *t, int malformed);

/* One more statement or Sync would wait past max_awaiting (a client pipelining without
 * reading the answers): recorded, and the tracker stops (tracker.py's _wait). */
static void
awaiting_limit(Tracker *t)
{
    record_open(t, &t->ctx, "audit_limit", ++t->seq, NULL);
    buf_lit(&t->out, ",\"limit\":\"awaiting\",\"max_awaiting\":");
    buf_int(&t->out, (long long)t->max_awaiting);
    record_close(t, 0);
    t->limited = 1;
}

static int
pending_push(Tracker *t, int kind, long long id, long long arg)
{
    if (t->pcount >= t->max_awaiting) {
        awaiting_limit(t);
        return 0;
    }
    if (t->pcount == t->pcap) {
        size_t cap = t->pcap ? t->pcap * 2 : 16;
        if (cap > t->max_awaiting)
            cap = t->max_awaiting;
        Pending *p = audit_malloc(cap * sizeof(Pending));
        if (p == NULL) {
            t->failed = 1;
            return 0;
        }
        for (size_t i = 0; i < t->pcount; i++)
            p[i] = t->pending[(t->phead + i) % t->pcap];
        audit_free(t->pending);
        t->pending = p;
        t->pcap = cap;
        t->phead = 0;
    }
    Pending *e = &t->pending[(t->phead + t->pcount) % t->pcap];
    e->kind = kind;
    e->id = id;
    e->started = t->now;
    e->arg = arg;
    e->cursor = -1;
    t->pcount++;
    return 1;
}

static Pending *
pending_first(Tracker *t)
{
    return t->pcount ? &t->pending[t->phead] : NULL;
}

static Pending
pending_pop(Tracker *t)
{
    Pending e = t->pending[t->phead];
    t->phead = (t->phead + 1) % t->pcap;
    t->pcount--;
    return e;
}

static void
put_time(Tracker *t, Buf *b)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != t->iso_second || t->iso[0] == '\0') {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(t->iso, sizeof(t->iso), "%Y-%m-%dT%H:%M:%S", &tm);
        t->iso_second = ts.tv_sec;
    }
    buf_lit(b, ",\"time\":\"");
    buf_put(b, t->iso, strlen(t->iso));
    buf_putc(b, '.');
    buf_digits(b, ts.tv_nsec / 1000, 6);
    buf_lit(b, "+00:00\"");
}

/* Opens a record: context members, event, statement_id (and protocol, time). */
static void
record_open(Tracker *t, const Buf *ctx, const char *event, long long id, const char *protocol)
{
    Buf *b = &t->out;
    if (ctx->len) {
        buf_put(b, ctx->p, ctx->len);
        buf_putc(b, ',');
    }
    buf_lit(b, "\"event\":\"");
    buf_put(b, event, strlen(event));
    buf_lit(b, "\",\"statement_id\":");
    buf_int(b, id);
    if (protocol != NULL) {
        buf_lit(b, ",\"protocol\":\"");
        buf_put(b, protocol, strlen(protocol));
        buf_putc(b, '"');
    }
    if (t->wall)
        put_time(t, b);
}

static void
record_close(Tracker *t, int malformed)
{
    if (malformed)
        buf_lit(&t->out, ",\"malformed\":true");
    buf_putc(&t->out, '\n');
    t->out_records++;
}

static void
set_last(Tracker *t, const unsigned char *p, size_t n)
{
    t->last.len = 0;
    buf_put(&t->last, p, n);
    t->last_set = 1;
}

/* The COPY row count of a tag: "COPY " and ASCII digits after its last space. */
static int
copy_rows(const Buf *tag, size_t *from, size_t *to)
{
    if (tag->len < 6 || memcmp(tag->p, "COPY ", 5) != 0)
        return 0;
    size_t i = tag->len;
    while (i > 0 && tag->p[i - 1] != ' ')
        i--;
    if (i == tag->len)
        return 0;
    for (size_t k = i; k < tag->len; k++)
        if (tag->p[k] < '0' || tag->p[k] > '9')
            return 0;
    while (i < tag->len - 1 && tag->p[i] == '0')
        i++;
    *from = i;
    *to = tag->len;
    return 1;
}

/* The result record of the entry just popped (the head's collected state), then the
 * head's state is cleared. sqlstate: NULL for none, or (has_sqlstate 0) JSON null. */
static void
emit_result(Tracker *t, const Pending *e, const char *status, int with_sqlstate,
            int has_sqlstate, const Buf *sqlstate)
{
    Buf *b = &t->out;
    record_open(t, &t->ctx_short, "result", e->id, NULL);
    buf_lit(b, ",\"status\":\"");
    buf_put(b, status, strlen(status));
    buf_putc(b, '"');
    if (t->commands) {
        buf_lit(b, ",\"tag\":");
        json_str(b, t->tag.p, t->tag.len);
        buf_lit(b, ",\"commands\":");
        buf_int(b, t->commands);
        size_t from, to;
        if (copy_rows(&t->tag, &from, &to)) {
            buf_lit(b, ",\"rows\":");
            buf_put(b, t->tag.p + from, to - from);
        }
    }
    if (t->copy_data) {
        buf_lit(b, ",\"copy_data\":");
        buf_int(b, t->copy_data);
    }
    if (with_sqlstate) {
        buf_lit(b, ",\"sqlstate\":");
        if (has_sqlstate)
            json_str(b, sqlstate->p, sqlstate->len);
        else
            buf_lit(b, "null");
    }
    if (e->kind == PEND_EXEC && ((e->arg >= 0 && e->arg != t->epoch) ||
                                 (e->cursor >= 0 && e->cursor != CURSOR_MARK(t->cursor_epoch))))
        /* SQL PREPARE / DEALLOCATE or DECLARE / CLOSE CURSOR ran before the Execute did */
        buf_lit(b, ",\"text_unconfirmed\":true");
    double us = (t->now - e->started) * 1e6;
    long long micros = us > 0 && us < 9e18 ? (long long)(us + 0.5) : 0;
    buf_lit(b, ",\"duration_ms\":");
    buf_int(b, micros / 1000);
    buf_putc(b, '.');
    buf_digits(b, micros % 1000, 3);
    record_close(t, 0);
    head_reset(t);
}

/* -- the body parsers: each step asks for the next field (want_*) or ends (REQ_DONE) -- */

static void
want_take(Framer *f, int n)
{
    f->req = REQ_TAKE;
    f->need = n;
    f->got = 0;
}

static void
want_cstr(Framer *f, Text *into)
{
    f->req = REQ_CSTR;
    f->into = into;
}

static void
want_blob(Framer *f, long long n, Text *into)
{
    f->req = REQ_BLOB;
    f->need = (int)n;
    f->into = into;
}

static int32_t
small_i32(const Framer *f)
{
    return (int32_t)(((uint32_t)f->small[0] << 24) | ((uint32_t)f->small[1] << 16) |
                     ((uint32_t)f->small[2] << 8) | (uint32_t)f->small[3]);
}

static int16_t
small_i16(const Framer *f)
{
    return (int16_t)(((uint16_t)f->small[0] << 8) | (uint16_t)f->small[1]);
}

/* A parameter value, complete in f->param, appended to f->values (messages.py's
 * _param_value). */
static void
param_value(Tracker *t, Framer *f, int binary)
{
    Buf *b = &f->values;
    Text *d = &f->param;
    if (b->len)
        buf_putc(b, ',');
    char sha[65];
    if (t->mode == MODE_HASH) {
        text_sha(d, sha);
        buf_putc(b, '"');
        buf_put(b, sha, 64);
        buf_putc(b, '"');
        return;
    }
    if (!binary && utf8_valid(d->kept.p, d->kept.len)) {
        buf_lit(b, "{\"text\":");
        json_str(b, d->kept.p, d->kept.len);
    }
    else {
        buf_lit(b, "{\"hex\":");
        json_hex(b, d->kept.p, d->kept.len);
    }
    if (text_truncated(d)) {
        text_sha(d, sha);
        buf_lit(b, ",\"truncated\":true,\"bytes\":");
        buf_int(b, d->size);
        buf_lit(b, ",\"sha256\":\"");
        buf_put(b, sha, 64);
        buf_putc(b, '"');
    }
    buf_putc(b, '}');
}

/* The parameters of a Bind or FunctionCall, from the format codes on (steps 10..):
 * nfmt, formats, count, then per parameter its length and value. Returns 1 when the
 * parser asked for more, 0 when the parameters are complete (f->params is set). */
static int
params_step(Tracker *t, Framer *f)
{
    for (;;) {
        switch (f->step) {
        case 10: /* format count */
            want_take(f, 2);
            f->step = 11;
            return 1;
        case 11:
            f->nfmt = small_i16(f);
            f->ifmt = 0;
            if (f->nfmt > 0 && f->fmts_cap < f->nfmt) {
                unsigned char *p = audit_realloc(f->fmts, (size_t)f->nfmt);
                if (p == NULL) {
                    t->failed = 1;
                    f->nfmt = 0;
                }
                else {
                    f->fmts = p;
                    f->fmts_cap = f->nfmt;
                }
            }
            f->step = 12;
            continue;
        case 12: /* each format code */
            if (f->ifmt < f->nfmt) {
                want_take(f, 2);
                f->step = 13;
                return 1;
            }
            want_take(f, 2);
            f->step = 14;
            return 1;
        case 13:
            f->fmts[f->ifmt++] = small_i16(f) == 1;
            f->step = 12;
            continue;
        case 14: /* parameter count */
            f->count = small_i16(f);
            if (f->count < 0)
                f->count = 0;
            f->iparam = 0;
            f->values.len = 0;
            f->param_left = t->cap;
            f->step = 15;
            continue;
        case 15: /* each parameter's length */
            if (f->iparam < f->count) {
                want_take(f, 4);
                f->step = 16;
                return 1;
            }
            f->params.len = 0;
            buf_lit(&f->params, "\"parameter_count\":");
            buf_int(&f->params, f->count);
            if (t->mode != MODE_NONE) {
                buf_lit(&f->params, ",\"parameters\":[");
                buf_put(&f->params, f->values.p, f->values.len);
                buf_putc(&f->params, ']');
            }
            return 0;
        case 16: {
            int32_t len = small_i32(f);
            long long i = f->iparam++;
            if (len < 0) {
                if (t->mode != MODE_NONE) {
                    if (f->values.len)
                        buf_putc(&f->values, ',');
                    buf_lit(&f->values, "null");
                }
                f->step = 15;
                continue;
            }
            int binary = f->nfmt == 1 ? f->fmts[0] : (i < f->nfmt ? f->fmts[i] : 0);
            text_reset(&f->param, f->param_left, t->mode == MODE_HASH);
            f->param.discard = t->mode == MODE_NONE;
            f->what = (unsigned char)binary;
            if (len > 0) {
                want_blob(f, len, &f->param);
                f->step = 17;
                return 1;
            }
            f->step = 17;
            continue;
        }
        case 17:
            f->param_left -= f->param.kept.len;
            if (t->mode != MODE_NONE)
                param_value(t, f, f->what);
            f->step = 15;
            continue;
        default:
            return 0;
        }
    }
}

/* The fields of each parsed frontend message, in order: '1' / '2' a string into t1 / t2,
 * 'b' a byte (Close: what), 'o' an int32 (FunctionCall: the function's OID), 'p' the
 * parameters (format codes, values); what follows is not read. */
static const char *
front_fields(int kind)
{
    switch (kind) {
    case 'Q': return "2";   /* query text */
    case 'P': return "12";  /* statement name, text */
    case 'B': return "12p"; /* portal, statement name, parameters */
    case 'E': return "1";   /* portal */
    case 'C': return "b1";  /* 'S' or 'P', name */
    case 'F': return "op";  /* function OID, arguments */
    }
    return "";
}

/* The next request of the frontend message f->kind's parser (after the previous one was
 * answered); REQ_DONE at its end. Steps 0..9: its fields; 10..: params_step. */
static void
front_step(Tracker *t, Framer *f)
{
    if (f->step < 10) {
        const char *fields = front_fields(f->kind);
        if (f->step > 0) { /* the field just read */
            char done = fields[f->step - 1];
            if (done == 'b')
                f->what = f->small[0];
            else if (done == 'o') {
                f->oid = small_i32(f);
                f->has_oid = 1;
            }
        }
        switch (fields[f->step]) {
        case '1':
            want_cstr(f, &f->t1);
            f->step++;
            return;
        case '2':
            want_cstr(f, &f->t2);
            f->step++;
            return;
        case 'b':
            want_take(f, 1);
            f->step++;
            return;
        case 'o':
            want_take(f, 4);
            f->step++;
            return;
        case 'p':
            f->step = 10;
            break;
        default:
            f->req = REQ_DONE;
            return;
        }
    }
    if (!params_step(t, f))
        f->req = REQ_DONE;
}

static void
back_step(Tracker *t, Framer *f)
{
    if (f->kind == 'C') {
        if (f->step == 0) {
            want_cstr(f, &f->t1);
            f->step = 1;
            return;
        }
    }
    else if (f->kind == 'E') {
        for (;;) {
            if (f->step == 0) { /* a field code */
                want_take(f, 1);
                f->step = 1;
                return;
            }
            if (f->step == 1) {
                if (f->small[0] == 0)
                    break;
                f->what = f->small[0];
                text_reset(&f->t1, BACKEND_CAP, 0);
                if (f->what != 'C')
                    f->t1.discard = 1;
                want_cstr(f, &f->t1);
                f->step = 2;
                return;
            }
            /* step 2: a field value is complete */
            if (f->what == 'C') {
                f->has_sqlstate = 1;
                f->sqlstate.len = 0;
                buf_put(&f->sqlstate, f->t1.kept.p, f->t1.kept.len);
            }
            f->step = 0;
        }
    }
    f->req = REQ_DONE;
}

static int
front_parsed(int kind)
{
    return kind == 'Q' || kind == 'P' || kind == 'B' || kind == 'E' || kind == 'C' ||
           kind == 'F';
}

static int
back_parsed(int kind)
{
    return kind == 'C' || kind == 'E' || kind == 'G' || kind == 'H' || kind == 'W';
}

static void
parser_start(Tracker *t, Framer *f, int is_front, int kind)
{
    f->kind = kind;
    f->step = 0;
    f->malformed = 0;
    f->has_oid = 0;
    f->has_sqlstate = 0;
    f->what = 0;
    f->params.len = 0;
    size_t cap1 = (!is_front && kind == 'C') ? BACKEND_CAP : NAME_CAP;
    text_reset(&f->t1, cap1, 0);
    text_reset(&f->t2, (is_front && (kind == 'Q' || kind == 'P')) ? t->cap : NAME_CAP, 0);
    if (is_front)
        front_step(t, f);
    else
        back_step(t, f);
}

/* Body bytes for the current parser (the rest of a body it no longer wants is dropped). */
static void
parser_feed(Tracker *t, Framer *f, int is_front, const unsigned char *p, size_t n)
{
    size_t pos = 0;
    while (pos < n && f->req != REQ_DONE) {
        if (f->req == REQ_TAKE) {
            size_t take = (size_t)(f->need - f->got);
            if (take > n - pos)
                take = n - pos;
            memcpy(f->small + f->got, p + pos, take);
            f->got += (int)take;
            pos += take;
            if (f->got < f->need)
                continue;
        }
        else if (f->req == REQ_CSTR) {
            const unsigned char *nul = memchr(p + pos, 0, n - pos);
            if (nul == NULL) {
                text_add(f->into, p + pos, n - pos);
                pos = n;
                continue;
            }
            size_t len = (size_t)(nul - (p + pos));
            text_add(f->into, p + pos, len);
            pos += len + 1;
        }
        else { /* REQ_BLOB */
            size_t take = (size_t)f->need;
            if (take > n - pos)
                take = n - pos;
            text_add(f->into, p + pos, take);
            f->need -= (int)take;
            pos += take;
            if (f->need > 0)
                continue;
        }
        if (is_front)
            front_step(t, f);
        else
            back_step(t, f);
    }
}

/* A portal's parameters are about to be dropped: record them now (tracker.py's
 * _evict_portal). */
static void
evict_portal(void *owner, Named *e)
{
    Tracker *t = owner;
    Buf *b = &t->out;
    if (e->role == NAMED_CLOSE || e->role == NAMED_LATEST)
        return;
    e->bind_id = ++t->seq;
    record_open(t, &t->ctx, "bind", e->bind_id, "extended");
    buf_lit(b, ",\"statement\":");
    json_str(b, e->text.p, e->text.len);
    buf_lit(b, ",\"portal\":");
    if (e->role == NAMED_CHANGE) /* not yet confirmed: under its Bind's key */
        json_str(b, e->name.p, e->name.len);
    else
        json_str(b, e->key, e->klen);
    if (e->params.len) {
        buf_putc(b, ',');
        buf_put(b, e->params.p, e->params.len);
    }
    record_close(t, 0);
}

/* -- names changed when the server confirms it (tracker.py's _change, _settle) -- */

/* A Parse, Bind or Close of name was sent: its entry, kept under its own key until the
 * server confirms it (then it becomes name's) or refuses or skips it (then it never was),
 * for the caller to fill, then change_close() (NULL: memory ran out). */
static Named *
change_open(Tracker *t, Table *tb, int role)
{
    unsigned char key[CHANGE_KEY];
    change_key(key, ++t->ops);
    Named *e = table_put(tb, key, CHANGE_KEY);
    if (e == NULL) {
        t->failed = 1;
        return NULL;
    }
    e->role = role;
    e->segment = t->segment;
    return e;
}

/* The change's entry is filled: counted, and made its name's newest change (0x00 and the
 * name: what a statement sent now will find). */
static void
change_close(Tracker *t, Table *tb, Named *e, const unsigned char *name, size_t nlen)
{
    buf_put(&e->name, name, nlen);
    if (e->name.failed || e->text.failed || e->params.failed)
        t->failed = 1;
    table_admit(tb, e);
    unsigned char lk[NAME_CAP + 1];
    lk[0] = 0;
    if (nlen)
        memcpy(lk + 1, name, nlen);
    Named *l = table_put(tb, lk, nlen + 1);
    if (l == NULL) {
        t->failed = 1;
        return;
    }
    l->role = NAMED_LATEST;
    l->op = t->ops;
    table_admit(tb, l);
}

/* What name means for a statement sent now (tracker.py's _current): its entry (NULL: none,
 * closed or forgotten); confirmed: by the server; earlier: a change sent before a Sync not
 * yet answered (the server may refuse it and run the statement with what was before). */
static Named *
current(Tracker *t, Table *tb, const unsigned char *name, size_t nlen, int *confirmed,
        int *earlier)
{
    unsigned char lk[NAME_CAP + 1];
    *confirmed = 1;
    *earlier = 0;
    if (nlen > NAME_CAP)
        nlen = NAME_CAP;
    lk[0] = 0;
    if (nlen)
        memcpy(lk + 1, name, nlen);
    Named *l = table_get(tb, lk, nlen + 1);
    if (l == NULL)
        return table_get(tb, name != NULL ? name : (const unsigned char *)"", nlen);
    *confirmed = 0;
    unsigned char key[CHANGE_KEY];
    change_key(key, l->op);
    Named *c = table_get(tb, key, CHANGE_KEY);
    if (c == NULL)
        return NULL;
    *earlier = c->segment < t->segment;
    return c->role == NAMED_CLOSE ? NULL : c;
}

/* The server confirmed (ok), or refused or skipped, the change of e. */
static void
settle(Tracker *t, const Pending *e, int ok)
{
    Table *tb;
    if (e->kind == PEND_PARSE || e->kind == PEND_CLOSE_S)
        tb = &t->statements;
    else if (e->kind == PEND_BIND || e->kind == PEND_CLOSE_P)
        tb = &t->portals;
    else
        return;
    unsigned char key[CHANGE_KEY];
    change_key(key, e->arg);
    Named *c = table_get(tb, key, CHANGE_KEY);
    if (c == NULL) /* forgotten (the budget): so was its name's entry */
        return;
    unsigned char name[NAME_CAP + 1];
    size_t nlen = c->name.len <= NAME_CAP ? c->name.len : NAME_CAP;
    name[0] = 0;
    if (nlen)
        memcpy(name + 1, c->name.p, nlen);
    Named *l = table_get(tb, name, nlen + 1);
    if (l != NULL && l->op == e->arg)
        table_remove(tb, name, nlen + 1);
    if (!ok)
        table_remove(tb, key, CHANGE_KEY);
    else if (c->role == NAMED_CLOSE) {
        table_remove(tb, key, CHANGE_KEY);
        table_remove(tb, name + 1, nlen);
    }
    else {
        c->epoch = tb == &t->statements ? t->epoch : t->cursor_epoch;
        if (!table_adopt(tb, key, name + 1, nlen))
            t->failed = 1;
    }
}

/* The server skipped e (after an error, up to Sync). */
static void
skip(Tracker *t, const Pending *e)
{
    settle(t, e, 0);
    if (PEND_STATEMENT(e->kind) || e->kind == PEND_PARSE)
        emit_result(t, e, "not_run", 0, 0, NULL);
}

/* The extended-protocol message at the head of pending failed (tracker.py's _fail): the
 * server skips what follows up to Sync. The error is the head's result if it has a record
 * (a Parse, an Execute) and that of the first statement it kept from running. */
static void
fail(Tracker *t, Framer *f)
{
    Pending e = pending_pop(t);
    int charged = 0;
    if (e.kind == PEND_EXEC) {
        emit_result(t, &e, "error", 1, f->has_sqlstate, &f->sqlstate);
        charged = 1;
    }
    else {
        settle(t, &e, 0);
        if (e.kind == PEND_PARSE)
            emit_result(t, &e, "error", 1, f->has_sqlstate, &f->sqlstate);
    }
    Pending *head;
    while ((head = pending_first(t)) != NULL && head->kind != PEND_SYNC) {
        e = pending_pop(t);
        if (PEND_STATEMENT(e.kind) && !charged) {
            emit_result(t, &e, "error", 1, f->has_sqlstate, &f->sqlstate);
            charged = 1;
        }
        else
            skip(t, &e);
    }
    t->skipping = t->pcount == 0;
}

/* A message waits for the server's answer, unless the server will skip it (then it is
 * skipped at once; pending is empty then, so is the head's collected state). */
static void
await_answer(Tracker *t, int kind, long long id, long long arg, int cursor)
{
    if (t->skipping) {
        Pending e = {kind, cursor, id, t->now, arg};
        skip(t, &e);
    }
    else if (pending_push(t, kind, id, arg))
        t->pending[(t->phead + t->pcount - 1) % t->pcap].cursor = cursor;
}

/* A frontend message is complete (or unparsed: at its header). */
static void
on_front(Tracker *t, Framer *f, int kind, int parsed)
{
    if (kind == 'd') {
        if (t->copy_in)
            t->copy_data++;
        return;
    }
    if (kind == 'S') {
        t->skipping = 0;
        t->segment++;
        pending_push(t, PEND_SYNC, 0, 0);
        return;
    }
    if (kind == 'D') {
        if (!t->skipping)
            pending_push(t, PEND_DESCRIBE, 0, 0);
        return;
    }
    if (!parsed)
        return;
    int malformed = f->malformed;
    Buf *b = &t->out;
    char sha[65];
    if (kind == 'Q') {
        long long id = ++t->seq;
        record_open(t, &t->ctx, "query", id, "simple");
        buf_putc(b, ',');
        int cut = text_truncated(&f->t2);
        if (cut)
            text_sha(&f->t2, sha);
        json_text_fields(b, f->t2.kept.p, f->t2.kept.len, f->t2.size, cut, sha);
        record_close(t, malformed);
        set_last(t, f->t2.kept.p, f->t2.kept.len);
        await_answer(t, PEND_QUERY, id, 0, -1);
    }
    else if (kind == 'P') {
        int cut = text_truncated(&f->t2);
        if (cut)
            text_sha(&f->t2, sha);
        long long id = ++t->seq;
        record_open(t, &t->ctx, "parse", id, "extended");
        buf_lit(b, ",\"statement\":");
        json_str(b, f->t1.kept.p, f->t1.kept.len);
        buf_putc(b, ',');
        json_text_fields(b, f->t2.kept.p, f->t2.kept.len, f->t2.size, cut, sha);
        record_close(t, malformed);
        if (t->skipping) {
            await_answer(t, PEND_PARSE, id, 0, -1);
            return;
        }
        Named *s = change_open(t, &t->statements, NAMED_CHANGE);
        if (s == NULL)
            return;
        buf_put(&s->text, f->t2.kept.p, f->t2.kept.len);
        s->size = f->t2.size;
        s->truncated = cut;
        if (cut)
            memcpy(s->sha, sha, 65);
        long long op = t->ops;
        change_close(t, &t->statements, s, f->t1.kept.p, f->t1.kept.len);
        pending_push(t, PEND_PARSE, id, op);
    }
    else if (kind == 'B') {
        if (t->skipping)
            return;
        Named *portal = change_open(t, &t->portals, NAMED_CHANGE);
        if (portal == NULL)
            return;
        buf_put(&portal->text, f->t2.kept.p, f->t2.kept.len);
        if (!malformed)
            buf_put(&portal->params, f->params.p, f->params.len);
        long long op = t->ops;
        change_close(t, &t->portals, portal, f->t1.kept.p, f->t1.kept.len);
        pending_push(t, PEND_BIND, 0, op);
    }
    else if (kind == 'E') {
        int confirmed, earlier, unconfirmed, portal_confirmed;
        long long watch = -1;
        int cursor_watch = -1;
        Named *portal = current(t, &t->portals, f->t1.kept.p, f->t1.kept.len,
                                &portal_confirmed, &unconfirmed);
        long long id = ++t->seq;
        record_open(t, &t->ctx, "execute", id, "extended");
        if (portal == NULL && (t->portals.dropped || f->t1.kept.len)) {
            /* a forgotten portal (the budget), or a named one no Bind made: a cursor SQL
             * opened (DECLARE, or PL/pgSQL); its statement is not known here */
            buf_lit(b, ",\"statement\":null,\"portal\":");
            json_str(b, f->t1.kept.p, f->t1.kept.len);
            if (t->portals.dropped)
                buf_lit(b, ",\"text\":null,\"portal_evicted\":true");
            else
                buf_lit(b, ",\"text\":null,\"portal_unknown\":true");
            t->last.len = 0;
            t->last_set = 2;
        }
        else {
            if (f->t1.kept.len) {
                /* DECLARE / CLOSE CURSOR since the Bind was confirmed: SQL may have replaced
                 * the portal by a cursor of the same name */
                cursor_watch = CURSOR_MARK(t->cursor_epoch);
                if (portal_confirmed && portal->epoch < t->cursor_epoch)
                    unconfirmed = 1;
            }
            const unsigned char *sname = portal ? portal->text.p : NULL;
            size_t slen = portal ? portal->text.len : 0;
            Named *s = current(t, &t->statements, sname, slen, &confirmed, &earlier);
            unconfirmed = unconfirmed || earlier;
            if (slen) {
                /* SQL PREPARE / DEALLOCATE since this name's text was confirmed (or, no text
                 * known, at all): the server may run another text under it. */
                watch = t->epoch;
                int stale = s == NULL || (confirmed && s->epoch < t->epoch);
                if (t->epoch > 0 && stale)
                    unconfirmed = 1;
            }
            buf_lit(b, ",\"statement\":");
            json_str(b, sname, slen);
            buf_lit(b, ",\"portal\":");
            json_str(b, f->t1.kept.p, f->t1.kept.len);
            buf_putc(b, ',');
            if (s == NULL || s->evicted) {
                buf_lit(b, "\"text\":null");
                if (s != NULL) {
                    buf_lit(b, ",\"text_evicted\":true,\"text_bytes\":");
                    buf_int(b, s->size);
                    buf_lit(b, ",\"text_sha256\":\"");
                    buf_put(b, s->sha, 64);
                    buf_putc(b, '"');
                }
                else if (t->statements.dropped)
                    buf_lit(b, ",\"text_evicted\":true");
                t->last.len = 0;
                t->last_set = 2;
            }
            else {
                json_text_fields(b, s->text.p, s->text.len, s->size, s->truncated, s->sha);
                set_last(t, s->text.p, s->text.len);
            }
        }
        if (unconfirmed)
            buf_lit(b, ",\"text_unconfirmed\":true");
        if (portal != NULL && portal->evicted) {
            buf_lit(b, ",\"parameters_evicted\":true,\"bind_id\":");
            buf_int(b, portal->bind_id);
        }
        else if (portal != NULL && portal->params.len) {
            buf_putc(b, ',');
            buf_put(b, portal->params.p, portal->params.len);
        }
        record_close(t, malformed);
        await_answer(t, PEND_EXEC, id, watch, cursor_watch);
    }
    else if (kind == 'C') {
        if (t->skipping)
            return;
        if (malformed || (f->what != 'S' && f->what != 'P')) {
            pending_push(t, PEND_CLOSE, 0, 0); /* the server refuses it */
            return;
        }
        Table *tb = f->what == 'S' ? &t->statements : &t->portals;
        Named *mark = change_open(t, tb, NAMED_CLOSE);
        if (mark == NULL)
            return;
        long long op = t->ops;
        change_close(t, tb, mark, f->t1.kept.p, f->t1.kept.len);
        pending_push(t, f->what == 'S' ? PEND_CLOSE_S : PEND_CLOSE_P, 0, op);
    }
    else if (kind == 'F') {
        long long id = ++t->seq;
        record_open(t, &t->ctx, "function_call", id, "simple");
        buf_lit(b, ",\"function_oid\":");
        char tmp[48];
        int n;
        if (f->has_oid) {
            buf_int(b, f->oid);
            n = snprintf(tmp, sizeof(tmp), "function call %d", (int)f->oid);
        }
        else {
            buf_lit(b, "null");
            n = snprintf(tmp, sizeof(tmp), "function call None");
        }
        if (!malformed && f->params.len) {
            buf_putc(b, ',');
            buf_put(b, f->params.p, f->params.len);
        }
        record_close(t, malformed);
        set_last(t, (const unsigned char *)tmp, (size_t)n);
        await_answer(t, PEND_FCALL, id, 0, -1);
    }
}

/* Command tags of SQL that changes prepared statements behind the protocol's back. */
static int
prepare_tag(const Buf *tag)
{
    return (tag->len == 7 && memcmp(tag->p, "PREPARE", 7) == 0) ||
           (tag->len == 10 && memcmp(tag->p, "DEALLOCATE", 10) == 0) ||
           (tag->len == 14 && memcmp(tag->p, "DEALLOCATE ALL", 14) == 0);
}

/* Command tags of SQL that opens or closes cursors: portals by another name. */
static int
cursor_tag(const Buf *tag)
{
    return (tag->len == 14 && memcmp(tag->p, "DECLARE CURSOR", 14) == 0) ||
           (tag->len == 12 && memcmp(tag->p, "CLOSE CURSOR", 12) == 0) ||
           (tag->len == 16 && memcmp(tag->p, "CLOSE CURSOR ALL", 16) == 0);
}

/* A backend message is complete (or unparsed: at its header). */
static void
on_back(Tracker *t, Framer *f, int kind)
{
    if (kind == 'C' && prepare_tag(&f->t1.kept))
        t->epoch++;
    else if (kind == 'C' && cursor_tag(&f->t1.kept))
        t->cursor_epoch++;
    Pending *head = pending_first(t);
    if (head == NULL)
        return;
    int what = head->kind;
    if (kind == '1' || kind == '2' || kind == '3' || kind == 'T' || kind == 'n') {
        /* ParseComplete, BindComplete, CloseComplete, RowDescription / NoData (Describe) */
        if ((kind == '1' && what == PEND_PARSE) || (kind == '2' && what == PEND_BIND) ||
            (kind == '3' && (what == PEND_CLOSE || what == PEND_CLOSE_S || what == PEND_CLOSE_P)) ||
            ((kind == 'T' || kind == 'n') && what == PEND_DESCRIBE)) {
            Pending e = pending_pop(t);
            settle(t, &e, 1);
        }
    }
    else if (kind == 'Z') {
        while (t->pcount) {
            Pending e = pending_pop(t);
            if (e.kind == PEND_SYNC)
                return;
            if (e.kind == PEND_QUERY || e.kind == PEND_FCALL) {
                if (t->err_seen && t->has_sqlstate) {
                    Buf state = t->sqlstate; /* emit_result clears the head's state after */
                    emit_result(t, &e, "error", 1, 1, &state);
                }
                else
                    emit_result(t, &e, "ok", 0, 0, NULL);
                return;
            }
            skip(t, &e);
        }
    }
    else if (what == PEND_SYNC)
        return;
    else if (kind == 'E') {
        if (what == PEND_QUERY || what == PEND_FCALL) {
            if (!t->err_seen) {
                t->err_seen = 1;
                t->has_sqlstate = f->has_sqlstate;
                t->sqlstate.len = 0;
                buf_put(&t->sqlstate, f->sqlstate.p, f->sqlstate.len);
            }
        }
        else
            fail(t, f);
    }
    else if (!PEND_STATEMENT(what))
        return;
    else if (kind == 'C' || kind == 'I' || kind == 's') {
        if (kind == 'C') {
            t->tag.len = 0;
            buf_put(&t->tag, f->t1.kept.p, f->t1.kept.len);
            t->commands++;
        }
        if (what == PEND_EXEC) {
            Pending e = pending_pop(t);
            emit_result(t, &e, kind == 's' ? "suspended" : "ok", 0, 0, NULL);
        }
    }
    else if (kind == 'G' || kind == 'H' || kind == 'W') {
        if (kind == 'G')
            t->copy_in = 1;
        record_open(t, &t->ctx_short, "copy", head->id, NULL);
        buf_lit(&t->out, ",\"direction\":\"");
        buf_put(&t->out, kind == 'G' ? "in" : kind == 'H' ? "out" : "both",
                kind == 'G' ? 2 : kind == 'H' ? 3 : 4);
        buf_putc(&t->out, '"');
        record_close(t, 0);
    }
}

static void
message_done(Tracker *t, Framer *f, int is_front, int kind, int parsed)
{
    if (parsed && f->req != REQ_DONE)
        f->malformed = 1; /* the body ended before its parser did */
    if (is_front)
        on_front(t, f, kind, parsed);
    else
        on_back(t, f, kind);
}

static int
framer_failed(const Framer *f)
{
    return f->t1.kept.failed || f->t2.kept.failed || f->param.kept.failed || f->values.failed ||
           f->params.failed || f->sqlstate.failed;
}

/* After a feed: a buffer that ran out of memory fails the tracker. The records of the
 * chunk just fed are dropped (it is not sent: see tracker_feed); those before it stay
 * whole for take(). */
static void
tracker_check(Tracker *t)
{
    if (t->out.failed || t->last.failed || t->tag.failed || t->sqlstate.failed ||
        framer_failed(&t->front) || framer_failed(&t->back))
        t->failed = 1;
    if (t->failed) {
        t->out.len = t->mark_len;
        t->out_records = t->mark_records;
    }
}

/* Failed or past its limit: it takes nothing more, and what was fed last is not sent. */
static inline int
tracker_halted(const Tracker *t)
{
    return t->failed || t->limited;
}

/* The sink refuses records now (its gate, set by Python on any thread): a client read goes
 * to Python before it is fed or sent. Read without the GIL. */
static inline int
tracker_refusing(const Tracker *t)
{
    return t->has_gate && __atomic_load_n((const unsigned char *)t->gate.buf, __ATOMIC_RELAXED);
}

/* Bytes of one direction, in order (messages.py's Framer.feed). No Python object is
 * touched: the pump calls it without the GIL. Once halted (tracker_halted) it takes
 * nothing more: the caller must not send the chunk that halted it. */
static void
tracker_feed(Tracker *t, int is_front, const unsigned char *p, size_t n, double now)
{
    Framer *f = is_front ? &t->front : &t->back;
    if (tracker_halted(t))
        return;
    t->now = now;
    t->mark_len = t->out.len;
    t->mark_records = t->out_records;
    size_t pos = 0;
    while (pos < n && !tracker_halted(t)) {
        if (f->in_body) {
            size_t take = (long long)(n - pos) < f->remaining ? n - pos : (size_t)f->remaining;
            parser_feed(t, f, is_front, p + pos, take);
            pos += take;
            f->remaining -= (long long)take;
            if (f->remaining == 0) {
                f->in_body = 0;
                message_done(t, f, is_front, f->kind, 1);
            }
            continue;
        }
        if (f->skip) {
            size_t take = (long long)(n - pos) < f->skip ? n - pos : (size_t)f->skip;
            f->skip -= (long long)take;
            pos += take;
            continue;
        }
        size_t take = (size_t)(HEADER_SIZE - f->hlen);
        if (take > n - pos)
            take = n - pos;
        memcpy(f->hdr + f->hlen, p + pos, take);
        f->hlen += (int)take;
        pos += take;
        if (f->hlen < HEADER_SIZE)
            break;
        f->hlen = 0;
        int kind = f->hdr[0];
        int32_t length = read_length(f->hdr + 1);
        long long size = length > 4 ? (long long)length - 4 : 0;
        if (is_front ? front_parsed(kind) : back_parsed(kind)) {
            parser_start(t, f, is_front, kind);
            if (size == 0)
                message_done(t, f, is_front, kind, 1);
            else {
                f->in_body = 1;
                f->remaining = size;
            }
        }
        else {
            message_done(t, f, is_front, kind, 0);
            f->skip = size;
        }
    }
    tracker_check(t);
}

/* -- the Python type ------------------------------------------------------------------ */

static int
Tracker_init(Tracker *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"context", "short_context", "parameters", "max_statement_bytes",
                             "max_session_statement_bytes", "wall_clock", "max_awaiting",
                             NULL};
    Py_buffer ctx, short_ctx;
    const char *mode = "none";
    Py_ssize_t cap = 65536;
    long long budget = 4LL << 20;
    int wall = 1;
    Py_ssize_t max_awaiting = MAX_AWAITING;
    if (self->ctx.p != NULL || self->seq != 0 || self->out.len != 0) {
        PyErr_SetString(PyExc_RuntimeError, "AuditTracker already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*|$snLpn", kwlist, &ctx, &short_ctx,
                                     &mode, &cap, &budget, &wall, &max_awaiting))
        return -1;
    int rc = -1;
    if (cap < 1 || cap > (1 << 30))
        PyErr_SetString(PyExc_ValueError, "max_statement_bytes must be >= 1");
    else if (budget < 1)
        PyErr_SetString(PyExc_ValueError, "max_session_statement_bytes must be >= 1");
    else if (max_awaiting < 1 || max_awaiting > (1 << 24))
        PyErr_SetString(PyExc_ValueError, "max_awaiting must be between 1 and 2**24");
    else if (strcmp(mode, "none") && strcmp(mode, "hash") && strcmp(mode, "full"))
        PyErr_Format(PyExc_ValueError, "parameters must be none, hash or full, not %s", mode);
    else {
        self->mode = mode[0] == 'n' ? MODE_NONE : mode[0] == 'h' ? MODE_HASH : MODE_FULL;
        self->cap = (size_t)cap;
        self->wall = wall;
        self->max_awaiting = (size_t)max_awaiting;
        self->statements.budget = self->portals.budget = budget;
        self->statements.is_statements = 1;
        self->portals.pin_unnamed = 1;
        self->portals.on_evict = evict_portal;
        self->portals.owner = self;
        buf_put(&self->ctx, ctx.buf, (size_t)ctx.len);
        buf_put(&self->ctx_short, short_ctx.buf, (size_t)short_ctx.len);
        framer_init(&self->front);
        framer_init(&self->back);
        if (self->ctx.failed || self->ctx_short.failed)
            PyErr_NoMemory();
        else
            rc = 0;
    }
    PyBuffer_Release(&ctx);
    PyBuffer_Release(&short_ctx);
    return rc;
}

static void
Tracker_dealloc(Tracker *self)
{
    buf_free(&self->ctx);
    buf_free(&self->ctx_short);
    framer_free(&self->front);
    framer_free(&self->back);
    audit_free(self->pending);
    if (self->has_gate)
        PyBuffer_Release(&self->gate);
    buf_free(&self->tag);
    buf_free(&self->sqlstate);
    table_clear(&self->statements);
    table_clear(&self->portals);
    buf_free(&self->out);
    buf_free(&self->last);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* MemoryError once the tracker failed (the chunk must not be sent); past its limit it
 * takes nothing (0 records, limited is set). */
static PyObject *
tracker_feed_py(Tracker *self, PyObject *args, int is_front)
{
    Py_buffer view;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &view, &now))
        return NULL;
    long long before = self->out_records;
    tracker_feed(self, is_front, (const unsigned char *)view.buf, (size_t)view.len, now);
    PyBuffer_Release(&view);
    if (self->failed)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(self->out_records - before);
}

static PyObject *
Tracker_client(Tracker *self, PyObject *args)
{
    return tracker_feed_py(self, args, 1);
}

static PyObject *
Tracker_backend(Tracker *self, PyObject *args)
{
    return tracker_feed_py(self, args, 0);
}

/* Also once failed: the records of the chunks before the one that failed it are whole. */
static PyObject *
Tracker_take(Tracker *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyBytes_FromStringAndSize((const char *)self->out.p, (Py_ssize_t)self->out.len);
    PyObject *res = out == NULL ? NULL : Py_BuildValue("(NL)", out, self->out_records);
    if (res == NULL)
        return NULL;
    self->out.len = 0;
    self->out_records = 0;
    if (self->out.cap > 65536)
        buf_free(&self->out); /* an idle session keeps no large buffer */
    return res;
}

static PyObject *
Tracker_get_last(Tracker *self, void *closure)
{
    if (self->last_set != 1)
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8((const char *)self->last.p, (Py_ssize_t)self->last.len,
                                "replace");
}

static PyObject *
Tracker_get_queued(Tracker *self, void *closure)
{
    return PyLong_FromSize_t(self->out.len);
}

static PyObject *
Tracker_get_retained(Tracker *self, void *closure)
{
    return PyLong_FromLongLong(self->statements.retained + self->portals.retained);
}

static PyObject *
Tracker_get_awaiting(Tracker *self, void *closure)
{
    return PyLong_FromSize_t(self->pcount);
}

static PyObject *
Tracker_get_awaiting_bytes(Tracker *self, void *closure)
{
    return PyLong_FromSize_t(self->pcap * sizeof(Pending));
}

static PyObject *
Tracker_get_limited(Tracker *self, void *closure)
{
    return PyBool_FromLong(self->limited);
}

static PyObject *
Tracker_get_max_awaiting(Tracker *self, void *closure)
{
    return PyLong_FromSize_t(self->max_awaiting);
}

/* refuse_with(gate): a buffer whose first byte the sink sets while it refuses records. */
static PyObject *
Tracker_refuse_with(Tracker *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len < 1 || view.readonly) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the gate must be a writable buffer of one byte");
        return NULL;
    }
    if (self->has_gate)
        PyBuffer_Release(&self->gate);
    self->gate = view; /* held: a bytearray cannot be resized while exported */
    self->has_gate = 1;
    Py_RETURN_NONE;
}

static PyMethodDef Tracker_methods[] = {
    {"refuse_with", (PyCFunction)Tracker_refuse_with, METH_O,
     "refuse_with(gate): while gate[0] is set (the sink refuses records), the C loop hands "
     "each client read to Python before feeding or sending it."},
    {"client", (PyCFunction)Tracker_client, METH_VARARGS,
     "client(data, now): frontend bytes, in order; how many records they completed."},
    {"backend", (PyCFunction)Tracker_backend, METH_VARARGS,
     "backend(data, now): backend bytes, in order; how many records they completed."},
    {"take", (PyCFunction)Tracker_take, METH_NOARGS,
     "(lines, count): the records not yet taken (JSON object members, one per line)."},
    {NULL},
};

static PyGetSetDef Tracker_getset[] = {
    {"last_statement", (getter)Tracker_get_last, NULL,
     "the text of the current or last statement (None before one, or when unknown)", NULL},
    {"queued", (getter)Tracker_get_queued, NULL, "bytes of records not yet taken", NULL},
    {"retained_bytes", (getter)Tracker_get_retained, NULL,
     "what the statement and portal tables hold (each within max_session_statement_bytes)",
     NULL},
    {"awaiting", (getter)Tracker_get_awaiting, NULL,
     "statements and Syncs waiting for the server's answer (at most max_awaiting)", NULL},
    {"awaiting_bytes", (getter)Tracker_get_awaiting_bytes, NULL,
     "the memory holding them (fixed-size entries, at most max_awaiting of them)", NULL},
    {"limited", (getter)Tracker_get_limited, NULL,
     "past max_awaiting: an audit_limit record was made, nothing more is taken and the "
     "session must end",
     NULL},
    {"max_awaiting", (getter)Tracker_get_max_awaiting, NULL,
     "statements and Syncs that may wait for the server's answer", NULL},
    {NULL},
};

static PyTypeObject TrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "waypoint.proxy.relay._pump.AuditTracker",
    .tp_basicsize = sizeof(Tracker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AuditTracker(context, short_context, *, parameters, max_statement_bytes, "
              "max_session_statement_bytes, wall_clock, max_awaiting): the statement audit of one session (waypoint/audit/tracker.py "
              "in C), its records encoded.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tracker_init,
    .tp_dealloc = (destructor)Tracker_dealloc,
    .tp_methods = Tracker_methods,
    .tp_getset = Tracker_getset,
};

/* ----------------------------------------------------------------------------------- */
/* The hash chain                                                                        */
/* ----------------------------------------------------------------------------------- */

/* chain(prev, seq, bodies): bodies are records (JSON object members), one per line;
 * each becomes {"seq":N,"prev":"<prev>",<members>} (prev: the SHA-256 of the line before
 * it, as written without its newline). Returns (lines, last hash, last seq). */
static PyObject *
audit_chain(PyObject *module, PyObject *args)
{
    const char *prev_in;
    Py_ssize_t prev_len;
    long long seq;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "s#Ly*", &prev_in, &prev_len, &seq, &view))
        return NULL;
    if (prev_len != 64) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "prev must be 64 hex digits");
        return NULL;
    }
    char prev[65];
    memcpy(prev, prev_in, 64);
    prev[64] = '\0';
    Buf out = {0};
    const unsigned char *p = view.buf;
    size_t n = (size_t)view.len;
    Py_BEGIN_ALLOW_THREADS
    buf_reserve(&out, n + (n / 64 + 1) * 100);
    size_t pos = 0;
    while (pos < n) {
        const unsigned char *nl = memchr(p + pos, '\n', n - pos);
        size_t len = nl ? (size_t)(nl - (p + pos)) : n - pos;
        size_t start = out.len;
        buf_lit(&out, "{\"seq\":");
        buf_int(&out, ++seq);
        buf_lit(&out, ",\"prev\":\"");
        buf_put(&out, prev, 64);
        buf_lit(&out, "\",");
        buf_put(&out, p + pos, len);
        buf_putc(&out, '}');
        if (!out.failed) {
            Sha256 s;
            sha256_init(&s);
            sha256_update(&s, out.p + start, out.len - start);
            sha256_hex(&s, prev);
        }
        buf_putc(&out, '\n');
        pos += len + 1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (out.failed) {
        buf_free(&out);
        return PyErr_NoMemory();
    }
    PyObject *res = Py_BuildValue("(y#s#L)", out.p ? (const char *)out.p : "", (Py_ssize_t)out.len,
                                  prev, (Py_ssize_t)64, seq);
    buf_free(&out);
    return res;
}

/* sha256_bind({"SHA256_Init": address, ...}): OpenSSL's SHA-256 from the library
 * Python's _ssl module loaded (resolved by ctypes through that module). True when bound
 * (checked against a known digest first); False: the portable code stays. A context
 * keeps the implementation it started with, so binding while hashing is harmless. */
static PyObject *
audit_sha256_bind(PyObject *module, PyObject *addresses)
{
    if (p_sha_init != NULL)
        Py_RETURN_TRUE;
    if (!PyDict_Check(addresses)) {
        PyErr_SetString(PyExc_TypeError, "sha256_bind() needs a dict of addresses");
        return NULL;
    }
    static const char *const names[] = {"SHA256_Init", "SHA256_Update", "SHA256_Final"};
    void *found[3];
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyDict_GetItemString(addresses, names[i]);
        if (v == NULL || v == Py_None)
            Py_RETURN_FALSE;
        found[i] = PyLong_AsVoidPtr(v);
        if (found[i] == NULL) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_FALSE;
        }
    }
    int (*init)(SHA256_CTX *) = (int (*)(SHA256_CTX *))found[0];
    int (*update)(SHA256_CTX *, const void *, size_t) =
        (int (*)(SHA256_CTX *, const void *, size_t))found[1];
    int (*final)(unsigned char *, SHA256_CTX *) = (int (*)(unsigned char *, SHA256_CTX *))found[2];
    SHA256_CTX ctx;
    unsigned char md[32];
    static const unsigned char abc_digest[32] = {
        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22,
        0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00,
        0x15, 0xad};
    if (init(&ctx) != 1 || update(&ctx, "abc", 3) != 1 || final(md, &ctx) != 1 ||
        memcmp(md, abc_digest, 32) != 0)
        Py_RETURN_FALSE;
    p_sha_update = update;
    p_sha_final = final;
    p_sha_init = init; /* last: a context that sees it also sees the others */
    Py_RETURN_TRUE;
}

/* sha256(data) -> hex (the tests compare it with hashlib). */
static PyObject *
audit_sha256(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Sha256 s;
    char hex[65];
    sha256_init(&s);
    sha256_update(&s, view.buf, (size_t)view.len);
    sha256_hex(&s, hex);
    PyBuffer_Release(&view);
    return PyUnicode_FromStringAndSize(hex, 64);
}

/* The module functions of the audit (the extension's function table lists them). */
#define AUDIT_FUNCTIONS                                                                       \
    {"audit_chain", (PyCFunction)audit_chain, METH_VARARGS,                                   \
     "audit_chain(prev, seq, bodies): the audit hash chain over records (one per line): "     \
     "(lines, last hash, last seq)."},                                                        \
    {"sha256", (PyCFunction)audit_sha256, METH_O, "The SHA-256 of bytes, as hex."},          \
    {"sha256_bind", (PyCFunction)audit_sha256_bind, METH_O,                                   \
     "sha256_bind({name: address}): OpenSSL's SHA256_Init/Update/Final from the _ssl "       \
     "module's library; True when the audit hashes with them."},                             \
    AUDIT_FAULTS_FUNCTION
