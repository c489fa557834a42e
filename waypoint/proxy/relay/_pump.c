/*
 * waypoint.proxy.relay._pump — the relay engine's hot path in C (Linux, epoll).
 *
 * The relay engine (engine.py) runs one OS thread with a level-triggered epoll loop.
 * Written in Python, each relayed chunk costs ~2.5 us of interpreter time and a GIL
 * hand-off around every system call; on a 2-core machine that is the difference
 * between Waypoint and PgBouncer (bench/results). This module moves only the
 * common case into C, with the GIL released for as long as nothing else happens:
 *
 *     epoll_wait -> recv into the pump's buffer -> count -> skip message headers -> send
 *
 * and, for a client that speaks TLS (see "Client TLS"), the same with its records
 * decrypted on the way in and encrypted on the way out, on the session's own SSL.
 * Everything else (back-pressure, EOF, errors, byte limits, FATAL injection at a
 * boundary, TLS alerts and close_notify, header hooks, recording the statement audit,
 * commands from trio) stays in Python
 * (loop.py drives, core.py decides): Pump.run() returns to Python
 * at the first event it does not handle, with what it already did to that event.
 *
 * Types:
 *   Lane  one socket of a relay: fd, the peer Lane, the bytes read from it, whether
 *         reading is wanted, the byte budget (shared by the two lanes of a relay), and
 *         the message-boundary tracker for what is read from it. Same semantics as
 *         waypoint.pgwire.boundary.BoundaryTracker (tests compare the two on random
 *         input). loop.py subclasses it (Side) and adds its Python-level state.
 *   Pump  the fd -> Lane table of the plain relays the C loop serves, over the
 *         engine's epoll fd, with a receive buffer of its own.
 *
 * Isolation (what a report may point to): a Pump reads into buffers of its own (buf:
 * plaintext; tbuf: TLS clients' ciphertext), allocated here and never exposed to Python;
 * only pump_lane() writes them, only inside run(), and one batch holds at most one report
 * about bytes read (a report that carries data ends the batch). Before run() returns, a
 * report that carries data (PARTIAL: the bytes the peer did not take, for a TLS client
 * the ciphertext it did not take followed by what its own session's write BIO still
 * holds; PAST_END and TAP: the whole chunk) gets them as a bytes object of its own. Every
 * TLS session's records stay in that session's own BIOs. A relay with statement audit has
 * an audit tap of its own: its session's AuditTracker (_audit.h), which the pump feeds
 * what either of that relay's lanes read (plaintext, for a TLS client after decrypting)
 * before sending it, and whose encoded records Python takes as a new bytes object; no
 * tracker is shared. So a report refers to no shared memory at all:
 * whatever Python does with one report (other relays' reads included) cannot change the
 * bytes of another, and no session can be handed bytes that another session read. The Python paths of loop.py
 * read into bytes objects of their own too (no engine-wide buffer).
 *
 * Threading: a Pump and its Lanes are used by one thread (the engine thread), except
 * that other threads (the trio thread, with the GIL) read Lane.received and
 * Lane.messages while the engine thread writes them without the GIL: both go through
 * relaxed __atomic loads and stores (one writer; readers need untorn values only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* OpenSSL is not linked: every OpenSSL function this module calls is the one the _ssl
 * module itself resolves (tls_bind(), given their addresses by client_tls.py through
 * ctypes on the _ssl module), so the SSL* taken from an ssl.SSLObject is always driven by
 * the very library that made it, and the extension adds no library to the process (or to
 * a repaired wheel). Until bound, no TLS lane can exist. Only OpenSSL's headers are
 * needed at build time (Debian: libssl-dev). */
#define OSSL_FUNCTIONS(X)                                                                         \
    X(SSL_read_ex) X(SSL_write_ex) X(SSL_get_error) X(SSL_get_SSL_CTX) X(SSL_get_rbio)          \
    X(SSL_get_wbio) X(SSL_is_server) X(SSL_is_init_finished) X(SSL_CTX_get_keylog_callback)     \
    X(SSL_set_options) X(SSL_pending) X(BIO_write) X(BIO_read) X(BIO_ctrl_pending) X(BIO_ctrl)                 \
    X(SSL_ctrl) X(ERR_peek_last_error) X(ERR_clear_error) X(ERR_reason_error_string)                \
    X(OpenSSL_version_num)
#define OSSL_POINTER(name) static __typeof__(name) *p_##name;
OSSL_FUNCTIONS(OSSL_POINTER)
#undef OSSL_POINTER
/* From here on every call (also those inside OpenSSL's macros) goes through the pointers. */
#define SSL_read_ex p_SSL_read_ex
#define SSL_write_ex p_SSL_write_ex
#define SSL_get_error p_SSL_get_error
#define SSL_get_SSL_CTX p_SSL_get_SSL_CTX
#define SSL_get_rbio p_SSL_get_rbio
#define SSL_get_wbio p_SSL_get_wbio
#define SSL_is_server p_SSL_is_server
#define SSL_is_init_finished p_SSL_is_init_finished
#define SSL_CTX_get_keylog_callback p_SSL_CTX_get_keylog_callback
#define SSL_set_options p_SSL_set_options
#define SSL_pending p_SSL_pending
#define SSL_ctrl p_SSL_ctrl
#define BIO_write p_BIO_write
#define BIO_read p_BIO_read
#define BIO_ctrl_pending p_BIO_ctrl_pending
#define BIO_ctrl p_BIO_ctrl
#define ERR_peek_last_error p_ERR_peek_last_error
#define ERR_clear_error p_ERR_clear_error
#define ERR_reason_error_string p_ERR_reason_error_string
#define OpenSSL_version_num p_OpenSSL_version_num

#define HEADER_SIZE 5
/* epoll_wait's bound for one wait (ms): a long timeout is waited in slices. */
#define MAX_WAIT_MS (1 << 30)

/* The counters other threads read: one writer (the thread that owns the lane). */
static inline long long
load_count(const long long *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void
add_count(long long *p, long long delta)
{
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + delta, __ATOMIC_RELAXED);
}

/* What Pump.run() reports (the first element of each tuple). */
enum {
    CODE_EVENT = 0,     /* an epoll event for Python to handle as it is */
    CODE_EOF = 1,       /* recv returned 0 */
    CODE_RECV_ERROR = 2,/* recv failed: arg = errno */
    CODE_PAST_END = 3,  /* n bytes read took the budget below 0: arg = those bytes (a copy) */
    CODE_PROTOCOL = 4,  /* n bytes read; a header had an invalid length: arg = exception */
    CODE_PARTIAL = 5,   /* n bytes read, some sent: arg = the bytes the peer did not take (a copy) */
    CODE_SEND_ERROR = 6,/* n bytes read, sending them to the peer failed: arg = errno */
    CODE_TLS_END = 7,   /* the client's TLS stream ended (close_notify): plaintext before it passed on */
    CODE_TLS_ERROR = 8, /* the client's TLS session failed (this lane's, or the peer's when
                           encrypting toward it): arg = OpenSSL's reason (str) */
    CODE_TLS_OWN = 9,   /* decrypting made TLS write records of its own (a key update answer,
                           an alert): Python takes them with tls_own() and sends them */
    CODE_TAP = 10,      /* n bytes read, counted and fed, not sent, for Python to record: the
                         * relay's audit tap holds its bound of records, its tracker halted
                         * (failed, or past its limit: then on these bytes), or (a client
                         * read) its sink refuses records: arg = those bytes (a copy) */
    CODE_TERMINATE = 11 /* n bytes read, counted and fed, not sent: a lane that stops at the
                         * client's Terminate saw one: arg = those bytes (a copy) */
};

static PyObject *bad_length_func; /* waypoint.pgwire.boundary.bad_length_error */
static PyObject *ssl_error_type;  /* ssl.SSLError */

/* ----------------------------------------------------------------------------------- */
/* Lane                                                                                  */
/* ----------------------------------------------------------------------------------- */

typedef struct Lane {
    PyObject_HEAD
    int fd;
    int reading;
    int in_pump;
    int hlen;                    /* bytes of a split header held in header[] */
    struct Lane *peer;           /* strong reference, or NULL */
    struct Lane *owner;          /* the lane holding the relay's budget: self or peer */
    PyObject *hook;              /* on_header(type, length) or NULL; Python path only */
    long long received;
    long long messages;
    long long skip;              /* body bytes of the current message still to skip */
    long long budget;
    unsigned char header[HEADER_SIZE];
    /* Where the stream stands, for the pool (a session that ends idle keeps its backend):
     * the types of the last two message headers, the last byte read (a ReadyForQuery's
     * status when it ends the stream), and counts of ReadyForQuery headers and of the
     * frontend's sync points (Query, Sync, FunctionCall: each is answered by one). */
    int last_type;
    int prev_type;
    unsigned char last_byte;
    char stop_at_terminate;      /* hand a read holding a Terminate ('X') to Python unsent */
    long long readies;
    long long syncs;
    /* Client TLS (see "Client TLS" below): the session's SSL and its memory BIOs, owned
     * by the Python objects in tls_refs (the ssl.SSLObject's _ssl._SSLSocket and the two
     * ssl.MemoryBIO), which this lane keeps alive. NULL: this lane's socket is plain. */
    SSL *ssl;
    BIO *rbio;
    BIO *wbio;
    PyObject *tls_refs;
    /* The audit tap (on the owner lane): the session's AuditTracker (_audit.h), fed what
     * both lanes read before it is sent; NULL: no tap. tap_max bounds the encoded records
     * it may hold before Python takes them. */
    PyObject *tracker;
    Py_ssize_t tap_max;
} Lane;

static PyTypeObject LaneType;

/* A message header of type t was read. */
static inline void
note_type(Lane *lane, int t)
{
    lane->prev_type = lane->last_type;
    lane->last_type = t;
    if (t == 'Z')
        lane->readies++;
    else if (t == 'Q' || t == 'S' || t == 'F')
        lane->syncs++;
}

/* The int32 length word of a message header (big-endian). */
static inline int32_t
read_length(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
                     (uint32_t)p[3]);
}

#include "_audit.h"

/* Complete a split header with bytes of chunk. Returns the position in the chunk after
 * the body of the completed message (possibly beyond n), or n if still incomplete;
 * -1 on an invalid length. */
static long long
complete_header(Lane *lane, const unsigned char *p, long long n, int *bad_type, int32_t *bad_len,
                int *got_header)
{
    long long take = HEADER_SIZE - lane->hlen;
    if (take > n)
        take = n;
    memcpy(lane->header + lane->hlen, p, (size_t)take);
    lane->hlen += (int)take;
    *got_header = 0;
    if (lane->hlen < HEADER_SIZE)
        return n;
    lane->hlen = 0;
    int32_t length = read_length(lane->header + 1);
    if (length < 4) {
        *bad_type = lane->header[0];
        *bad_len = length;
        return -1;
    }
    *got_header = 1;
    note_type(lane, lane->header[0]);
    add_count(&lane->messages, 1);
    return take + (long long)length - 4;
}

/* hook(type, length); 0, or -1 with a Python exception set. GIL held. */
static int
call_hook(PyObject *hook, int type_byte, int32_t length)
{
    PyObject *r = PyObject_CallFunction(hook, "ii", type_byte, (int)length);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* BoundaryTracker.feed. With with_hook (the GIL held), lane->hook(type, length) runs once
 * per header. Returns 0; -1 with *bad_type / *bad_len set for an invalid length; -2 when
 * the hook raised (a Python exception is set). Without with_hook it touches no Python
 * object, so the pump calls it with the GIL released. */
static int
feed(Lane *lane, const unsigned char *p, long long n, int with_hook, int *bad_type,
     int32_t *bad_len)
{
    long long pos;
    int completed = 0;
    if (n > 0)
        lane->last_byte = p[n - 1];
    if (lane->hlen == 0) {
        if (lane->skip >= n) {
            /* The whole chunk lies inside the current message body (or is empty). */
            lane->skip -= n;
            return 0;
        }
        pos = lane->skip;
    }
    else {
        int got;
        pos = complete_header(lane, p, n, bad_type, bad_len, &got);
        if (pos < 0)
            return -1;
        if (lane->hlen)
            return 0;
        completed = 1;
    }
    /* Every hook call holds a strong reference: a hook may replace itself (lane.hook =
     * other), which drops the lane's own reference to it. As BoundaryTracker, the hook
     * that completes a split header is called first; the rest of the chunk goes to the
     * hook in place after that call. */
    if (completed && with_hook && lane->hook != NULL) {
        PyObject *first = Py_NewRef(lane->hook);
        int failed = call_hook(first, lane->header[0], read_length(lane->header + 1)) < 0;
        Py_DECREF(first);
        if (failed) {
            add_count(&lane->messages, -1); /* as BoundaryTracker: counted once its hook returned */
            lane->skip = pos >= n ? pos - n : 0;
            return -2;
        }
    }
    PyObject *hook = with_hook ? lane->hook : NULL;
    Py_XINCREF(hook);
    int rc = 0;
    long long count = 0;
    while (pos <= n - HEADER_SIZE) {
        int32_t length = read_length(p + pos + 1);
        if (length < 4) {
            *bad_type = p[pos];
            *bad_len = length;
            rc = -1;
            break;
        }
        if (hook != NULL && call_hook(hook, p[pos], length) < 0) {
            rc = -2;
            break;
        }
        note_type(lane, p[pos]);
        count += 1;
        pos += 1 + (long long)length;
    }
    Py_XDECREF(hook);
    add_count(&lane->messages, count);
    if (rc < 0)
        return rc;
    if (pos >= n) {
        lane->skip = pos - n;
    }
    else {
        /* A header split across chunks: keep its first bytes. */
        lane->skip = 0;
        memcpy(lane->header, p + pos, (size_t)(n - pos));
        lane->hlen = (int)(n - pos);
    }
    return 0;
}

static PyObject *
make_protocol_error(int type_byte, int32_t length)
{
    return PyObject_CallFunction(bad_length_func, "ii", type_byte, (int)length);
}

/* Raise the ProtocolError for an invalid length; returns -1. */
static int
set_protocol_error(int type_byte, int32_t length)
{
    PyObject *exc = make_protocol_error(type_byte, length);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* The argument as a Lane, or NULL with TypeError ("<what> needs a Lane"). */
static Lane *
as_lane(PyObject *arg, const char *what)
{
    if (!PyObject_TypeCheck(arg, &LaneType)) {
        PyErr_Format(PyExc_TypeError, "%s needs a Lane", what);
        return NULL;
    }
    return (Lane *)arg;
}

static int
Lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &fd))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a Lane needs an open file descriptor");
        return -1;
    }
    if (self->in_pump) {
        PyErr_SetString(PyExc_RuntimeError, "cannot re-initialize a Lane in a Pump");
        return -1;
    }
    self->fd = fd;
    self->reading = 1;
    self->hlen = 0;
    self->received = 0;
    self->messages = 0;
    self->skip = 0;
    self->budget = 0;
    self->last_type = self->prev_type = 0;
    self->last_byte = 0;
    self->stop_at_terminate = 0;
    self->readies = self->syncs = 0;
    if (self->owner == NULL)
        self->owner = self;
    return 0;
}

static PyObject *
Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->owner = self;
    }
    return (PyObject *)self;
}

static int
Lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->peer);
    Py_VISIT(self->hook);
    Py_VISIT(self->tls_refs);
    Py_VISIT(self->tracker);
    return 0;
}

static int
Lane_clear(Lane *self)
{
    Lane *peer = self->peer;
    if (peer != NULL && peer->owner == self) {
        /* The peer borrowed our budget: it keeps its own from now on. */
        peer->budget = self->budget;
        peer->owner = peer;
    }
    if (self->owner != self) {
        self->budget = self->owner->budget;
        self->owner = self;
    }
    Py_CLEAR(self->peer);
    Py_CLEAR(self->hook);
    self->ssl = NULL;
    self->rbio = self->wbio = NULL;
    Py_CLEAR(self->tls_refs);
    Py_CLEAR(self->tracker);
    return 0;
}

static void
Lane_dealloc(Lane *self)
{
    /* Also reached from a Python subclass's dealloc, which owns the type reference. */
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Lane_link(Lane *self, PyObject *arg)
{
    Lane *peer = as_lane(arg, "link()");
    if (peer == NULL)
        return NULL;
    if (peer == self) {
        PyErr_SetString(PyExc_ValueError, "a Lane cannot be its own peer");
        return NULL;
    }
    if (self->peer != NULL || peer->peer != NULL) {
        PyErr_SetString(PyExc_ValueError, "Lane already linked");
        return NULL;
    }
    Py_INCREF(peer);
    self->peer = peer;
    Py_INCREF(self);
    peer->peer = self;
    self->owner = self;
    peer->owner = self;
    Py_RETURN_NONE;
}

static PyObject *
Lane_feed(Lane *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int bad_type = 0;
    int32_t bad_len = 0;
    int rc = feed(self, (const unsigned char *)view.buf, (long long)view.len, 1, &bad_type,
                  &bad_len);
    PyBuffer_Release(&view);
    if (rc == -1)
        set_protocol_error(bad_type, bad_len);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Lane_feed_until_boundary(Lane *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    long long n = (long long)view.len;
    long long result;
    if (self->skip == 0 && self->hlen == 0) {
        result = 0;
    }
    else {
        long long pos;
        if (self->hlen) {
            int bad_type = 0, got = 0;
            int32_t bad_len = 0;
            pos = complete_header(self, p, n, &bad_type, &bad_len, &got);
            if (pos < 0) {
                PyBuffer_Release(&view);
                set_protocol_error(bad_type, bad_len);
                return NULL;
            }
            if (got && self->hook != NULL) {
                PyObject *hook = Py_NewRef(self->hook); /* it may replace itself */
                int rc = call_hook(hook, self->header[0], read_length(self->header + 1));
                Py_DECREF(hook);
                if (rc < 0) {
                    PyBuffer_Release(&view);
                    return NULL;
                }
            }
            if (self->hlen) {
                PyBuffer_Release(&view);
                return PyLong_FromLongLong(n);
            }
        }
        else {
            pos = self->skip;
        }
        if (pos <= n) {
            self->skip = 0;
            result = pos;
        }
        else {
            self->skip = pos - n;
            result = n;
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(result);
}

static PyObject *
Lane_get_at_boundary(Lane *self, void *closure)
{
    return PyBool_FromLong(self->skip == 0 && self->hlen == 0);
}

static PyObject *
Lane_get_budget(Lane *self, void *closure)
{
    return PyLong_FromLongLong(self->owner->budget);
}

static int
Lane_set_budget(Lane *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete budget");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    self->owner->budget = v;
    return 0;
}

static PyObject *
Lane_get_reading(Lane *self, void *closure)
{
    return PyBool_FromLong(self->reading);
}

static int
Lane_set_reading(Lane *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete reading");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    self->reading = v;
    return 0;
}

static PyObject *
Lane_get_linked(Lane *self, void *closure)
{
    return PyBool_FromLong(self->peer != NULL);
}

static PyObject *
Lane_get_hook(Lane *self, void *closure)
{
    if (self->hook == NULL)
        Py_RETURN_NONE;
    Py_INCREF(self->hook);
    return self->hook;
}

static int
Lane_set_hook(Lane *self, PyObject *value, void *closure)
{
    if (self->in_pump) {
        PyErr_SetString(PyExc_RuntimeError, "cannot set a hook on a Lane in a Pump");
        return -1;
    }
    if (value == Py_None)
        value = NULL;
    if (value != NULL && !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "hook must be callable or None");
        return -1;
    }
    Py_XINCREF(value);
    Py_XSETREF(self->hook, value);
    return 0;
}

static PyObject *
Lane_get_received(Lane *self, void *closure)
{
    return PyLong_FromLongLong(load_count(&self->received));
}

static int
Lane_set_received(Lane *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete received");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    __atomic_store_n(&self->received, v, __ATOMIC_RELAXED);
    return 0;
}

static PyObject *
Lane_get_messages(Lane *self, void *closure)
{
    return PyLong_FromLongLong(load_count(&self->messages));
}

static PyObject *
Lane_get_partial_header(Lane *self, void *closure)
{
    return PyLong_FromLong(self->hlen);
}

static PyObject *
Lane_get_skip(Lane *self, void *closure)
{
    return PyLong_FromLongLong(self->skip);
}


/* ----------------------------------------------------------------------------------- */
/* Client TLS                                                                            */
/* ----------------------------------------------------------------------------------- */
/*
 * The client's TLS handshake is done in Python (waypoint/proxy/streams.py: certificate
 * choice by SNI, ALPN, direct TLS) by an ssl.SSLObject over two ssl.MemoryBIO. After it,
 * tls_attach() takes the very SSL* of that SSLObject, and its two memory BIOs, so that
 * the pump runs the record layer (SSL_read / SSL_write of application data) without the
 * GIL. CPython does not expose the SSL*: tls_attach() reads it out of the _ssl objects,
 * whose leading fields are declared below as CPython 3.11 to 3.13 lay them out, and
 * refuses (returns False: the engine then keeps the Python record layer) unless
 *   - OpenSSL was bound (tls_bind: the _ssl module's own functions, OpenSSL 3, the
 *     version the _ssl module reports);
 *   - the objects are of the _ssl types (the context: or a subclass) and those types are
 *     large enough for the fields read;
 *   - the socket's context field is the very context object Python reports for it, the
 *     SSL* belongs to that context's SSL_CTX, and its read / write BIOs are the two
 *     MemoryBIO objects handed over;
 *   - the session is a server's, its handshake is complete, and no key-log callback is set.
 * The lane keeps those Python objects alive; from the hand-over on only the engine
 * thread uses them (Python never touches the SSLObject again). Renegotiation is refused
 * (SSL_OP_NO_RENEGOTIATION); TLS 1.3 key updates are answered by OpenSSL (the answer is a
 * CODE_TLS_OWN report). */

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} SSLContextHead;

typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
    PyObject *ctx;
} SSLSocketHead;

typedef struct {
    PyObject_HEAD
    BIO *bio;
} MemoryBIOHead;

/* tls_bind() succeeded: the function pointers are set, and the _ssl types known. */
static int tls_bound;
/* _ssl._SSLSocket, _ssl._SSLContext, _ssl.MemoryBIO. */
static PyTypeObject *ssl_socket_type, *ssl_context_type, *memory_bio_type;

/* The _ssl type called name, at least size bytes large, in *out (a new reference).
 * 1: found; 0: not usable; -1: an exception. */
static int
get_ssl_type(PyObject *mod, const char *name, size_t size, PyTypeObject **out)
{
    PyObject *t = PyObject_GetAttrString(mod, name);
    if (t == NULL)
        return -1;
    if (!PyType_Check(t) || (size_t)((PyTypeObject *)t)->tp_basicsize < size) {
        Py_DECREF(t);
        return 0;
    }
    Py_XSETREF(*out, (PyTypeObject *)t);
    return 1;
}

#define OSSL_NAME(name) #name,
static const char *const ossl_names[] = {OSSL_FUNCTIONS(OSSL_NAME) NULL};
#undef OSSL_NAME

/* tls_bind({name: address}): the addresses of the _ssl module's OpenSSL functions (every
 * name of TLS_FUNCTIONS). True when client TLS can run in C: OpenSSL 3, the version the
 * _ssl module reports, and _ssl types of the expected size. Once bound, it stays bound. */
static PyObject *
pump_tls_bind(PyObject *module, PyObject *addresses)
{
    if (tls_bound)
        Py_RETURN_TRUE;
    if (!PyDict_Check(addresses)) {
        PyErr_SetString(PyExc_TypeError, "tls_bind() needs a dict of addresses");
        return NULL;
    }
    void *found[sizeof(ossl_names) / sizeof(ossl_names[0])];
    for (size_t i = 0; ossl_names[i] != NULL; i++) {
        PyObject *v = PyDict_GetItemString(addresses, ossl_names[i]);
        if (v == NULL || v == Py_None)
            Py_RETURN_FALSE;
        found[i] = PyLong_AsVoidPtr(v);
        if (found[i] == NULL) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_FALSE;
        }
    }
    PyObject *mod = PyImport_ImportModule("_ssl");
    if (mod == NULL)
        return NULL;
    PyObject *version = PyObject_GetAttrString(mod, "OPENSSL_VERSION_NUMBER");
    if (version == NULL) {
        Py_DECREF(mod);
        return NULL;
    }
    unsigned long expected = PyLong_AsUnsignedLong(version);
    Py_DECREF(version);
    if (expected == (unsigned long)-1 && PyErr_Occurred()) {
        Py_DECREF(mod);
        return NULL;
    }
    int ok = get_ssl_type(mod, "_SSLSocket", sizeof(SSLSocketHead), &ssl_socket_type);
    if (ok > 0)
        ok = get_ssl_type(mod, "_SSLContext", sizeof(SSLContextHead), &ssl_context_type);
    if (ok > 0)
        ok = get_ssl_type(mod, "MemoryBIO", sizeof(MemoryBIOHead), &memory_bio_type);
    Py_DECREF(mod);
    if (ok < 0)
        return NULL;
    if (ok == 0)
        Py_RETURN_FALSE;
    /* OpenSSL_version_num is the last name: ask the library itself which it is. */
    unsigned long (*version_num)(void) = (unsigned long (*)(void))found[sizeof(ossl_names) / sizeof(ossl_names[0]) - 2];
    unsigned long actual = version_num();
    if (actual != expected || actual < 0x30000000UL || actual >= 0x40000000UL)
        Py_RETURN_FALSE;
    size_t i = 0;
#define OSSL_SET(name) p_##name = (__typeof__(p_##name))found[i++];
    OSSL_FUNCTIONS(OSSL_SET)
#undef OSSL_SET
    tls_bound = 1;
    Py_RETURN_TRUE;
}

/* OpenSSL's reason for an error code, as the str of a report or an exception. */
static PyObject *
tls_reason(unsigned long code)
{
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    return PyUnicode_FromString(reason ? reason : "TLS failure");
}

/* Raise ssl.SSLError for OpenSSL's last error (the thread's error queue is cleared). */
static PyObject *
raise_tls_error(void)
{
    unsigned long code = ERR_peek_last_error();
    ERR_clear_error();
    PyObject *reason = tls_reason(code);
    if (reason == NULL)
        return NULL;
    PyObject *exc = PyObject_CallFunction(ssl_error_type, "iO", 1, reason);
    if (exc != NULL && PyObject_SetAttrString(exc, "reason", reason) == 0)
        PyErr_SetObject(ssl_error_type, exc);
    Py_XDECREF(exc);
    Py_DECREF(reason);
    return NULL;
}

/* What the write BIO holds, as bytes (empty: nothing). */
static PyObject *
drain_bio(BIO *bio)
{
    size_t pending = BIO_ctrl_pending(bio);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)pending);
    if (out == NULL || pending == 0)
        return out;
    int got = BIO_read(bio, PyBytes_AS_STRING(out), (int)pending);
    if (got != (int)pending) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "TLS write buffer: short read");
        return NULL;
    }
    return out;
}

static PyObject *
Lane_tls_attach(Lane *self, PyObject *args)
{
    PyObject *sslobject, *incoming, *outgoing;
    if (!PyArg_ParseTuple(args, "OOO", &sslobject, &incoming, &outgoing))
        return NULL;
    if (self->ssl != NULL || self->in_pump) {
        PyErr_SetString(PyExc_RuntimeError, "tls_attach() once, before the Lane is pumped");
        return NULL;
    }
    if (!tls_bound)
        Py_RETURN_FALSE;
    PyObject *sock = PyObject_GetAttrString(sslobject, "_sslobj");
    if (sock == NULL)
        return NULL;
    PyObject *context = PyObject_GetAttrString(sock, "context");
    if (context == NULL) {
        Py_DECREF(sock);
        return NULL;
    }
    /* ssl.SSLContext subclasses _ssl._SSLContext: its leading fields stay where they are. */
    int ok = Py_IS_TYPE(sock, ssl_socket_type) && PyObject_TypeCheck(context, ssl_context_type) &&
             Py_IS_TYPE(incoming, memory_bio_type) && Py_IS_TYPE(outgoing, memory_bio_type) &&
             ((SSLSocketHead *)sock)->ctx == context;
    SSL *ssl = ok ? ((SSLSocketHead *)sock)->ssl : NULL;
    SSL_CTX *ctx = ok ? ((SSLContextHead *)context)->ctx : NULL;
    BIO *rbio = ok ? ((MemoryBIOHead *)incoming)->bio : NULL;
    BIO *wbio = ok ? ((MemoryBIOHead *)outgoing)->bio : NULL;
    ok = ok && ssl != NULL && ctx != NULL && SSL_get_SSL_CTX(ssl) == ctx &&
         SSL_get_rbio(ssl) == rbio && SSL_get_wbio(ssl) == wbio && SSL_is_server(ssl) &&
         SSL_is_init_finished(ssl) && SSL_CTX_get_keylog_callback(ctx) == NULL &&
         BIO_ctrl_pending(wbio) == 0;
    Py_DECREF(context);
    if (!ok) {
        Py_DECREF(sock);
        Py_RETURN_FALSE;
    }
    PyObject *refs = PyTuple_Pack(4, sslobject, sock, incoming, outgoing);
    Py_DECREF(sock);
    if (refs == NULL)
        return NULL;
    SSL_set_options(ssl, SSL_OP_NO_RENEGOTIATION);
    /* Python's contexts set SSL_MODE_RELEASE_BUFFERS: the record buffers freed whenever they
     * are empty, so allocated again (malloc, free) for every record. A relayed session
     * keeps them, as PgBouncer's do (about 33 KiB per session). */
    SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
    Py_XSETREF(self->tls_refs, refs);
    self->ssl = ssl;
    self->rbio = rbio;
    self->wbio = wbio;
    Py_RETURN_TRUE;
}

static int
require_tls(Lane *self)
{
    if (self->ssl == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Lane has no TLS session (tls_attach)");
        return -1;
    }
    return 0;
}

static PyObject *
Lane_tls_take(Lane *self, PyObject *arg)
{
    if (require_tls(self) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len > INT_MAX) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_OverflowError, "ciphertext chunk too large");
        return NULL;
    }
    int rc = 0;
    if (view.len == 0)
        BIO_set_mem_eof_return(self->rbio, 0); /* EOF under TLS */
    else
        rc = BIO_write(self->rbio, view.buf, (int)view.len) == (int)view.len ? 0 : -1;
    PyBuffer_Release(&view);
    if (rc < 0)
        return raise_tls_error();
    Py_RETURN_NONE;
}

static PyObject *
Lane_tap_enable(Lane *self, PyObject *args)
{
    PyObject *tracker;
    Py_ssize_t max;
    if (!PyArg_ParseTuple(args, "O!n", &TrackerType, &tracker, &max))
        return NULL;
    if (max < 1024 || max > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "tap size must be between 1024 and 2**30");
        return NULL;
    }
    if (self->in_pump || self->owner != self) {
        PyErr_SetString(PyExc_RuntimeError,
                        "tap_enable() on the relay's owner lane, before it is pumped");
        return NULL;
    }
    Py_XSETREF(self->tracker, Py_NewRef(tracker));
    self->tap_max = max;
    Py_RETURN_NONE;
}

static PyObject *
Lane_tls_decrypt(Lane *self, PyObject *arg)
{
    if (require_tls(self) < 0)
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 1 || size > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "size must be between 1 and 2**31-1");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    size_t got = 0;
    if (SSL_read_ex(self->ssl, PyBytes_AS_STRING(out), (size_t)size, &got) == 1) {
        if (_PyBytes_Resize(&out, (Py_ssize_t)got) < 0)
            return NULL;
        return out;
    }
    Py_DECREF(out);
    int err = SSL_get_error(self->ssl, 0);
    if (err == SSL_ERROR_WANT_READ) {
        ERR_clear_error();
        Py_RETURN_NONE;
    }
    if (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL ||
        (err == SSL_ERROR_SSL &&
         ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)) {
        ERR_clear_error();
        return PyBytes_FromStringAndSize(NULL, 0); /* the end of the client's stream */
    }
    return raise_tls_error();
}

static PyObject *
Lane_tls_encrypt(Lane *self, PyObject *arg)
{
    if (require_tls(self) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = 1;
    if (view.len > 0) {
        size_t written = 0;
        ok = SSL_write_ex(self->ssl, view.buf, (size_t)view.len, &written) == 1 &&
             written == (size_t)view.len;
    }
    PyBuffer_Release(&view);
    if (!ok)
        return raise_tls_error();
    return drain_bio(self->wbio);
}

static PyObject *
Lane_tls_own(Lane *self, PyObject *noargs)
{
    if (require_tls(self) < 0)
        return NULL;
    return drain_bio(self->wbio);
}

static PyObject *
Lane_get_tls(Lane *self, void *closure)
{
    return PyBool_FromLong(self->ssl != NULL);
}

static PyObject *
Lane_get_tap_used(Lane *self, void *closure)
{
    return PyLong_FromSize_t(self->tracker ? ((Tracker *)self->tracker)->out.len : 0);
}

static PyMethodDef Lane_methods[] = {
    {"tap_enable", (PyCFunction)Lane_tap_enable, METH_VARARGS,
     "tap_enable(tracker, max_bytes): feed what both lanes read to the session's "
     "AuditTracker before it is sent; once it holds max_bytes of records not yet taken, "
     "a read is reported as TAP instead."},
    {"link", (PyCFunction)Lane_link, METH_O,
     "link(peer): make the two lanes each other's peer; self holds the shared budget."},
    {"feed", (PyCFunction)Lane_feed, METH_O,
     "Account for the next chunk read from this lane (BoundaryTracker.feed)."},
    {"feed_until_boundary", (PyCFunction)Lane_feed_until_boundary, METH_O,
     "Consume the chunk only up to the next message boundary; return how many bytes."},
    {"tls_attach", (PyCFunction)Lane_tls_attach, METH_VARARGS,
     "tls_attach(ssl_object, incoming, outgoing): run this client lane's TLS record layer "
     "in C on the session's own SSL; False when it cannot be taken over safely."},
    {"tls_take", (PyCFunction)Lane_tls_take, METH_O,
     "Ciphertext received from the client (b'': EOF under TLS)."},
    {"tls_decrypt", (PyCFunction)Lane_tls_decrypt, METH_O,
     "tls_decrypt(size): plaintext; None until more ciphertext comes; b'' at the end."},
    {"tls_encrypt", (PyCFunction)Lane_tls_encrypt, METH_O,
     "The TLS records for the plaintext (raises ssl.SSLError)."},
    {"tls_own", (PyCFunction)Lane_tls_own, METH_NOARGS,
     "Records TLS wrote by itself while decrypting (a key update answer, an alert)."},
    {NULL},
};

static PyMemberDef Lane_members[] = {
    {"fd", T_INT, offsetof(Lane, fd), READONLY, "the socket's file descriptor"},
    {"in_pump", T_BOOL, offsetof(Lane, in_pump), READONLY, "served by a Pump's C loop"},
    {"last_type", T_INT, offsetof(Lane, last_type), READONLY,
     "the type byte of the last message header (0: none yet)"},
    {"prev_type", T_INT, offsetof(Lane, prev_type), READONLY,
     "the type byte of the header before it (0: none)"},
    {"last_byte", T_UBYTE, offsetof(Lane, last_byte), READONLY, "the last byte fed"},
    {"readies", T_LONGLONG, offsetof(Lane, readies), READONLY, "ReadyForQuery headers seen"},
    {"syncs", T_LONGLONG, offsetof(Lane, syncs), READONLY,
     "Query, Sync and FunctionCall headers seen"},
    {"stop_at_terminate", T_BOOL, offsetof(Lane, stop_at_terminate), 0,
     "a read whose last header is a Terminate goes to Python unsent (TERMINATE)"},
    {NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"at_boundary", (getter)Lane_get_at_boundary, NULL,
     "everything fed so far ends exactly at the end of a message", NULL},
    {"budget", (getter)Lane_get_budget, (setter)Lane_set_budget,
     "bytes the relay may still read (shared by both lanes); < 0 sends reads to Python", NULL},
    {"reading", (getter)Lane_get_reading, (setter)Lane_set_reading, "reads are wanted", NULL},
    {"linked", (getter)Lane_get_linked, NULL, "link() was called", NULL},
    {"tls_in_c", (getter)Lane_get_tls, NULL, "the client's TLS record layer runs in C", NULL},
    {"hook", (getter)Lane_get_hook, (setter)Lane_set_hook,
     "on_header(type, length) per message header, or None", NULL},
    {"partial_header", (getter)Lane_get_partial_header, NULL,
     "bytes of a header split across chunks", NULL},
    {"skip", (getter)Lane_get_skip, NULL, "body bytes still to skip", NULL},
    {"tap_used", (getter)Lane_get_tap_used, NULL,
     "bytes of records in the audit tap's tracker not yet taken", NULL},
    {"received", (getter)Lane_get_received, (setter)Lane_set_received,
     "bytes read from this lane (readable from any thread)", NULL},
    {"messages", (getter)Lane_get_messages, NULL,
     "message headers seen in what was read (readable from any thread)", NULL},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "waypoint.proxy.relay._pump.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One socket of a relay, with its message-boundary tracker.",
    .tp_new = Lane_new,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
    .tp_getset = Lane_getset,
};

/* ----------------------------------------------------------------------------------- */
/* Pump                                                                                  */
/* ----------------------------------------------------------------------------------- */

typedef struct {
    int code;
    int fd;
    uint32_t events;
    long long n;
    long long arg; /* errno, bytes sent */
    int bad_type;
    int32_t bad_len;
    int from_tbuf;   /* PARTIAL of ciphertext: tbuf[arg:tlen], then what more holds */
    long long tlen;
    BIO *more;
} Report;

typedef struct {
    PyObject_HEAD
    int epfd;
    unsigned char *buf;  /* private: see "Isolation" above */
    unsigned char *tbuf; /* private too: ciphertext to or from TLS clients */
    Py_ssize_t tbufsize; /* bufsize and room for the records' framing */
    Py_ssize_t bufsize;
    Lane **table; /* indexed by fd */
    int capacity;
    Py_ssize_t count;
    struct epoll_event *events;
    int max_events;
    Report *reports;
    int running;
    /* During run(): how long an audit tap may hold records before run() returns for Python
     * to queue them (< 0: no bound), and when the first records fed since run() began are
     * due (< 0: none fed yet). An idle relay with a tap adds no wake-up. */
    double tap_wait;
    double tap_due;
} Pump;

static int
Pump_init(Pump *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoll_fd", "buffer_size", "max_events", NULL};
    int epfd;
    Py_ssize_t bufsize;
    int max_events = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in|i", kwlist, &epfd, &bufsize, &max_events))
        return -1;
    if (self->buf != NULL || self->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pump already initialized");
        return -1;
    }
    if (epfd < 0 || max_events < 1 || max_events > 65536) {
        PyErr_SetString(PyExc_ValueError, "bad epoll fd or max_events");
        return -1;
    }
    if (bufsize < 1 || bufsize > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "buffer_size must be between 1 and 2**30");
        return -1;
    }
    self->epfd = epfd;
    self->max_events = max_events;
    self->events = PyMem_Calloc((size_t)max_events, sizeof(struct epoll_event));
    self->reports = PyMem_Calloc((size_t)max_events, sizeof(Report));
    self->buf = PyMem_Malloc((size_t)bufsize);
    /* One buffer of plaintext encrypted fits in one send: TLS adds at most a few hundred
     * bytes per 16 KiB record. */
    self->tbufsize = bufsize + (bufsize / 16384 + 1) * 512;
    self->tbuf = PyMem_Malloc((size_t)self->tbufsize);
    self->bufsize = bufsize;
    if (self->events == NULL || self->reports == NULL || self->buf == NULL || self->tbuf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int
Pump_traverse(Pump *self, visitproc visit, void *arg)
{
    for (int i = 0; i < self->capacity; i++)
        Py_VISIT(self->table[i]);
    return 0;
}

static int
Pump_clear(Pump *self)
{
    for (int i = 0; i < self->capacity; i++) {
        if (self->table[i] != NULL) {
            self->table[i]->in_pump = 0;
            Py_CLEAR(self->table[i]);
        }
    }
    self->count = 0;
    return 0;
}

static void
Pump_dealloc(Pump *self)
{
    PyObject_GC_UnTrack(self);
    Pump_clear(self);
    PyMem_Free(self->table);
    PyMem_Free(self->events);
    PyMem_Free(self->reports);
    PyMem_Free(self->buf);
    PyMem_Free(self->tbuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Pump_add(Pump *self, PyObject *arg)
{
    Lane *lane = as_lane(arg, "add()");
    if (lane == NULL)
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Pump.add() during run()");
        return NULL;
    }
    if (lane->fd < 0 || lane->peer == NULL) {
        PyErr_SetString(PyExc_ValueError, "only an initialized, linked Lane can be pumped");
        return NULL;
    }
    if (lane->hook != NULL) {
        PyErr_SetString(PyExc_ValueError, "a Lane with a hook is served by Python, not a Pump");
        return NULL;
    }
    if (lane->in_pump) {
        PyErr_SetString(PyExc_ValueError, "Lane already in a Pump");
        return NULL;
    }
    int fd = lane->fd;
    if (fd >= self->capacity) {
        int capacity = self->capacity ? self->capacity : 64;
        while (capacity <= fd)
            capacity *= 2;
        Lane **table = PyMem_Realloc(self->table, (size_t)capacity * sizeof(Lane *));
        if (table == NULL)
            return PyErr_NoMemory();
        memset(table + self->capacity, 0, (size_t)(capacity - self->capacity) * sizeof(Lane *));
        self->table = table;
        self->capacity = capacity;
    }
    if (self->table[fd] != NULL) {
        PyErr_Format(PyExc_ValueError, "file descriptor %d is already pumped", fd);
        return NULL;
    }
    Py_INCREF(lane);
    self->table[fd] = lane;
    lane->in_pump = 1;
    self->count += 1;
    Py_RETURN_NONE;
}

static PyObject *
Pump_discard(Pump *self, PyObject *arg)
{
    Lane *lane = as_lane(arg, "discard()");
    if (lane == NULL)
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Pump.discard() during run()");
        return NULL;
    }
    int fd = lane->fd;
    if (fd >= 0 && fd < self->capacity && self->table[fd] == lane) {
        self->table[fd] = NULL;
        lane->in_pump = 0;
        self->count -= 1;
        Py_DECREF(lane);
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
Pump_len(Pump *self)
{
    return self->count;
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One non-blocking send of n bytes to fd: how many went (0 when the socket is full), or -1
 * with rep set to CODE_SEND_ERROR (errno in arg). */
static ssize_t
send_now(int fd, const void *buf, size_t n, Report *rep)
{
    ssize_t sent;
    do {
        sent = send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent >= 0)
        return sent;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
    rep->code = CODE_SEND_ERROR;
    rep->arg = errno;
    return -1;
}

/* Encrypt n plaintext bytes toward peer (a TLS client) and send the records. 1 when a
 * report was written: TLS_ERROR, SEND_ERROR, or PARTIAL with the ciphertext the client
 * did not take (tbuf[arg:tlen] and what its write BIO still holds). */
static int
send_tls(Pump *self, Lane *peer, const unsigned char *data, long long n, Report *rep)
{
    size_t written = 0;
    if (SSL_write_ex(peer->ssl, data, (size_t)n, &written) != 1 || written != (size_t)n) {
        rep->code = CODE_TLS_ERROR;
        rep->arg = (long long)ERR_peek_last_error();
        ERR_clear_error();
        return 1;
    }
    int size = self->tbufsize > INT_MAX ? INT_MAX : (int)self->tbufsize;
    for (;;) {
        int m = BIO_read(peer->wbio, self->tbuf, size);
        if (m <= 0)
            return 0;
        ssize_t sent = send_now(peer->fd, self->tbuf, (size_t)m, rep);
        if (sent < 0)
            return 1;
        if (sent != m) {
            rep->code = CODE_PARTIAL;
            rep->from_tbuf = 1;
            rep->arg = sent;
            rep->tlen = m;
            rep->more = peer->wbio;
            return 1;
        }
    }
}

/* n bytes read from lane (plaintext, in data): count, track, pass on to the peer. 1 when
 * a report was written (stop the batch). */
static int
pass_on(Pump *self, Lane *lane, const unsigned char *data, long long n, Report *rep)
{
    rep->n = n;
    add_count(&lane->received, n);
    Lane *owner = lane->owner;
    owner->budget -= n;
    if (owner->budget < 0) {
        rep->code = CODE_PAST_END;
        return 1;
    }
    if (feed(lane, data, n, 0, &rep->bad_type, &rep->bad_len) < 0) {
        rep->code = CODE_PROTOCOL;
        return 1;
    }
    Tracker *tracker = (Tracker *)owner->tracker;
    if (tracker != NULL && ((Py_ssize_t)tracker->out.len >= owner->tap_max || tracker_halted(tracker) ||
                            (lane == owner && tracker_refusing(tracker)))) {
        rep->code = CODE_TAP; /* Python takes the records, records this, then sends it */
        return 1;
    }
    if (lane->stop_at_terminate && lane->last_type == 'X') {
        /* Python records what precedes it (audited relays) and passes that on */
        rep->code = CODE_TERMINATE;
        return 1;
    }
    if (tracker != NULL) {
        double now = monotonic_now();
        tracker_feed(tracker, lane == owner, data, (size_t)n, now);
        if (tracker_halted(tracker)) {
            rep->code = CODE_TAP; /* not recorded whole, or past the audit's limit: unsent */
            return 1;
        }
        if (self->tap_wait >= 0 && self->tap_due < 0 && tracker->out.len > 0)
            self->tap_due = now + self->tap_wait;
    }
    Lane *peer = lane->peer;
    if (peer->ssl != NULL)
        return send_tls(self, peer, data, n, rep);
    ssize_t sent = send_now(peer->fd, data, (size_t)n, rep);
    if (sent < 0)
        return 1;
    if (sent != n) {
        rep->code = CODE_PARTIAL;
        rep->arg = sent;
        return 1;
    }
    return 0;
}

/* recv from lane into into. > 0: bytes read; 0: nothing to read; -1: a report (EOF, error). */
static ssize_t
receive(Pump *self, Lane *lane, unsigned char *into, Report *rep)
{
    ssize_t n;
    do {
        n = recv(lane->fd, into, (size_t)self->bufsize, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        rep->code = CODE_RECV_ERROR;
        rep->arg = errno;
        return -1;
    }
    if (n == 0) {
        rep->code = CODE_EOF;
        return -1;
    }
    return n;
}

/* A TLS client's lane: its ciphertext (in tbuf) goes to its read BIO; the records that
 * are complete are decrypted into buf back to back, and passed on together (records that
 * arrived together leave in one send, up to bufsize at a time). Plaintext decrypted before
 * the end of the client's stream (close_notify) or a bad record is passed on first; when
 * passing it on is itself reported, the end is met again at the next read (the SSL keeps
 * its shutdown or error state). */
static int
pump_tls_in(Pump *self, Lane *lane, Report *rep)
{
    ssize_t n = receive(self, lane, self->tbuf, rep);
    if (n <= 0)
        return n < 0;
    if (n > INT_MAX || BIO_write(lane->rbio, self->tbuf, (int)n) != (int)n) {
        rep->code = CODE_TLS_ERROR;
        rep->arg = (long long)ERR_peek_last_error();
        ERR_clear_error();
        return 1;
    }
    for (;;) {
        long long have = 0;
        int more = 1; /* records may be left that decrypt without more ciphertext */
        int end = 0;
        long long end_arg = 0;
        while (have < self->bufsize) {
            size_t got = 0;
            if (SSL_read_ex(lane->ssl, self->buf + have, (size_t)(self->bufsize - have), &got) != 1) {
                int err = SSL_get_error(lane->ssl, 0);
                more = 0;
                if (err != SSL_ERROR_WANT_READ) {
                    end = err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL ? CODE_TLS_END
                                                                                   : CODE_TLS_ERROR;
                    end_arg = (long long)ERR_peek_last_error();
                }
                break;
            }
            have += (long long)got;
            if (SSL_pending(lane->ssl) == 0 && BIO_ctrl_pending(lane->rbio) == 0) {
                more = 0;
                break;
            }
        }
        ERR_clear_error();
        if (have > 0 && pass_on(self, lane, self->buf, have, rep))
            return 1;
        if (end) {
            rep->code = end;
            rep->arg = end_arg;
            return 1;
        }
        if (!more)
            break;
    }
    if (BIO_ctrl_pending(lane->wbio) > 0) {
        rep->code = CODE_TLS_OWN;
        return 1;
    }
    return 0;
}

/* Serve one readable lane in C. Returns 1 when a report was written (stop the batch),
 * 0 when the chunk went through (or there was nothing to read). */
static int
pump_lane(Pump *self, Lane *lane, Report *rep)
{
    if (lane->ssl != NULL)
        return pump_tls_in(self, lane, rep);
    ssize_t n = receive(self, lane, self->buf, rep);
    if (n <= 0)
        return n < 0;
    return pass_on(self, lane, self->buf, (long long)n, rep);
}

static PyObject *
Pump_run(Pump *self, PyObject *args)
{
    double timeout, tap_wait = -1.0;
    if (!PyArg_ParseTuple(args, "d|d", &timeout, &tap_wait))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Pump.run() is not reentrant");
        return NULL;
    }
    if (self->buf == NULL || self->events == NULL || self->reports == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pump not initialized");
        return NULL;
    }
    int nreports = 0;
    int failed_errno = 0;
    double deadline = timeout >= 0 ? monotonic_now() + timeout : -1.0;
    self->running = 1;
    self->tap_wait = tap_wait;
    self->tap_due = -1.0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        int wait_ms = -1;
        double until = deadline;
        if (self->tap_due >= 0 && (until < 0 || self->tap_due < until))
            until = self->tap_due;
        if (until >= 0) {
            double left = until - monotonic_now();
            if (left <= 0)
                wait_ms = 0;
            else if (left >= MAX_WAIT_MS / 1000.0)
                wait_ms = MAX_WAIT_MS; /* a long (or infinite) timeout: wait in slices */
            else
                wait_ms = (int)(left * 1000.0) + 1; /* round up: never return early */
        }
        int ready = epoll_wait(self->epfd, self->events, self->max_events, wait_ms);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            failed_errno = errno;
            break;
        }
        for (int i = 0; i < ready; i++) {
            int fd = self->events[i].data.fd;
            uint32_t events = self->events[i].events;
            Lane *lane = (fd >= 0 && fd < self->capacity) ? self->table[fd] : NULL;
            Report *rep = &self->reports[nreports];
            if (lane == NULL || events != EPOLLIN) {
                rep->code = CODE_EVENT;
                rep->fd = fd;
                rep->events = events;
                rep->n = 0;
                rep->arg = 0;
                nreports++;
                if (lane != NULL)
                    break; /* Python changes this relay: the rest of the batch comes again */
                continue;
            }
            if (!lane->reading)
                continue; /* stale */
            rep->fd = fd;
            rep->events = events;
            rep->n = 0;
            rep->arg = 0;
            rep->from_tbuf = 0;
            if (pump_lane(self, lane, rep)) {
                nreports++;
                break;
            }
        }
        if (nreports > 0)
            break;
        if (deadline >= 0 || self->tap_due >= 0) {
            double now = monotonic_now();
            if ((deadline >= 0 && now >= deadline) || (self->tap_due >= 0 && now >= self->tap_due))
                break;
        }
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    if (failed_errno) {
        errno = failed_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New(nreports);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < nreports; i++) {
        Report *rep = &self->reports[i];
        PyObject *arg;
        if (rep->code == CODE_PROTOCOL) {
            arg = make_protocol_error(rep->bad_type, rep->bad_len);
            if (arg == NULL) {
                Py_DECREF(list);
                return NULL;
            }
        }
        else if (rep->code == CODE_PARTIAL && rep->from_tbuf) {
            /* Ciphertext for a TLS client that it did not take: copied out of the pump's
             * buffer, with what the session's own write BIO still holds behind it. */
            size_t head = (size_t)(rep->tlen - rep->arg);
            size_t more = BIO_ctrl_pending(rep->more);
            arg = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(head + more));
            if (arg != NULL) {
                memcpy(PyBytes_AS_STRING(arg), self->tbuf + rep->arg, head);
                if (more && BIO_read(rep->more, PyBytes_AS_STRING(arg) + head, (int)more) != (int)more)
                    Py_CLEAR(arg);
                if (arg == NULL && !PyErr_Occurred())
                    PyErr_SetString(PyExc_RuntimeError, "TLS write buffer: short read");
            }
        }
        else if (rep->code == CODE_TLS_ERROR) {
            arg = tls_reason((unsigned long)rep->arg);
        }
        else if (rep->code == CODE_PAST_END || rep->code == CODE_PARTIAL ||
                 rep->code == CODE_TAP || rep->code == CODE_TERMINATE) {
            /* The batch's only data report (it ended the batch): its bytes are copied
             * out of the pump's buffer before anything else can run. */
            long long from = rep->code == CODE_PARTIAL ? rep->arg : 0;
            arg = PyBytes_FromStringAndSize((const char *)self->buf + from,
                                            (Py_ssize_t)(rep->n - from));
        }
        else {
            arg = PyLong_FromLongLong(rep->arg);
        }
        if (arg == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyObject *item = Py_BuildValue("(iiLLN)", rep->code, rep->fd, (long long)rep->events,
                                       rep->n, arg);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)Pump_add, METH_O, "Serve this linked Lane's reads in C."},
    {"discard", (PyCFunction)Pump_discard, METH_O, "Stop serving this Lane (if served)."},
    {"run", (PyCFunction)Pump_run, METH_VARARGS,
     "run(timeout, tap_wait=-1): wait and pump until an event needs Python or timeout "
     "seconds pass (< 0: no bound), or, with tap_wait >= 0, tap_wait seconds after an audit "
     "tap was first given records in this call. Returns a list of (code, fd, events, n, arg)."},
    {NULL},
};

static PySequenceMethods Pump_as_sequence = {
    .sq_length = (lenfunc)Pump_len,
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "waypoint.proxy.relay._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fd -> Lane table of the relays served in C, over an epoll fd.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_traverse = (traverseproc)Pump_traverse,
    .tp_clear = (inquiry)Pump_clear,
    .tp_methods = Pump_methods,
    .tp_as_sequence = &Pump_as_sequence,
};

/* ----------------------------------------------------------------------------------- */

static PyMethodDef pump_functions[] = {
    AUDIT_FUNCTIONS
    {"tls_bind", (PyCFunction)pump_tls_bind, METH_O,
     "tls_bind({name: address}): the _ssl module's OpenSSL functions (TLS_FUNCTIONS); True "
     "when client TLS can run in C."},
    {NULL},
};

static struct PyModuleDef pump_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "waypoint.proxy.relay._pump",
    .m_doc = "The relay engine's hot path in C (see engine.py).",
    .m_size = -1,
    .m_methods = pump_functions,
};

PyMODINIT_FUNC
PyInit__pump(void)
{
    PyObject *boundary = PyImport_ImportModule("waypoint.pgwire.boundary");
    if (boundary == NULL)
        return NULL;
    bad_length_func = PyObject_GetAttrString(boundary, "bad_length_error");
    Py_DECREF(boundary);
    if (bad_length_func == NULL)
        return NULL;
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (ssl == NULL)
        return NULL;
    ssl_error_type = PyObject_GetAttrString(ssl, "SSLError");
    Py_DECREF(ssl);
    if (ssl_error_type == NULL)
        return NULL;
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&PumpType) < 0 ||
        PyType_Ready(&TrackerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&pump_module);
    if (m == NULL)
        return NULL;
    size_t nnames = sizeof(ossl_names) / sizeof(ossl_names[0]) - 1;
    PyObject *names = PyTuple_New((Py_ssize_t)nnames);
    for (size_t i = 0; names != NULL && i < nnames; i++) {
        PyObject *name = PyUnicode_FromString(ossl_names[i]);
        if (name == NULL)
            Py_CLEAR(names);
        else
            PyTuple_SET_ITEM(names, (Py_ssize_t)i, name);
    }
    if (names == NULL || PyModule_AddObject(m, "TLS_FUNCTIONS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0 ||
        PyModule_AddObjectRef(m, "AuditTracker", (PyObject *)&TrackerType) < 0 ||
        PyModule_AddIntConstant(m, "EVENT", CODE_EVENT) < 0 ||
        PyModule_AddIntConstant(m, "EOF", CODE_EOF) < 0 ||
        PyModule_AddIntConstant(m, "RECV_ERROR", CODE_RECV_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "PAST_END", CODE_PAST_END) < 0 ||
        PyModule_AddIntConstant(m, "PROTOCOL", CODE_PROTOCOL) < 0 ||
        PyModule_AddIntConstant(m, "PARTIAL", CODE_PARTIAL) < 0 ||
        PyModule_AddIntConstant(m, "SEND_ERROR", CODE_SEND_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "TLS_END", CODE_TLS_END) < 0 ||
        PyModule_AddIntConstant(m, "TLS_ERROR", CODE_TLS_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "TLS_OWN", CODE_TLS_OWN) < 0 ||
        PyModule_AddIntConstant(m, "TAP", CODE_TAP) < 0 ||
        PyModule_AddIntConstant(m, "TERMINATE", CODE_TERMINATE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
