/* The arena: while a pool's worker runs a task, numpy's allocations of at least
   a threshold made in that thread's context are carved out of the worker's
   shared mapping of the task's spare, whose pages are already there. A result
   computed there is shipped where it lies, without a copy, and faster than
   into fresh pages.

   A region is one such mapping. It lives on after its arena closes while
   arrays allocated in it live: kept shared while the worker decides what to
   do with it, then either released (no array of the task lives: the mapping
   is the worker's refill mapping again) or frozen (remapped privately and its
   live pages copied, see freeze: the arrays the worker keeps become its own
   memory, and the object may be reused; unmapped once its last array is
   freed). A fork while a region is shared with arrays in it, or its arena
   open, freezes it too and marks it spoiled: the object then no longer holds
   what the task writes.

   All state is guarded by one mutex; the numpy handler functions may run in
   any thread. Only the open and close calls touch Python (with the GIL). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shmalloc_core.h"

#define REGIONS 16
#define SPANS 1024 /* allocations (and free ranges) a region tracks; beyond, malloc serves */

enum { UNUSED, SHARED, FROZEN };
enum { RELEASED = 1, FROZEN_BY_SETTLE = 2 };

typedef struct {
    size_t off, len;
} span;

typedef struct {
    char *base;
    size_t len;
    int fd; /* a duplicate of the object's descriptor while shared, for freezing; else -1 */
    int state;
    int spoiled;
    size_t page;
    span free_spans[SPANS];
    size_t nfree;
    span used[SPANS]; /* numpy's allocations: what lives in the region */
    size_t nused;
    size_t in_use;    /* bytes of used spans and of placed copies */
    size_t wanted;    /* the most the task's large allocations (and placed copies) took or asked for at once */
    int outcome;      /* what settle did: 0 not yet, RELEASED, FROZEN_BY_SETTLE */
} region;

static pthread_mutex_t arena_lock = PTHREAD_MUTEX_INITIALIZER;
static region regions[REGIONS];
static region *open_region;
static size_t arena_threshold;
static PyObject *arena_capsule;
static PyObject *saved_handler;

static size_t round_up(size_t n, size_t page) { return (n + page - 1) / page * page; }

static region *region_of(const void *p)
{
    for (int i = 0; i < REGIONS; i++) {
        region *r = &regions[i];
        if (r->state != UNUSED && (const char *)p >= r->base && (const char *)p < r->base + r->len)
            return r;
    }
    return NULL;
}

/* first fit, on page boundaries; NULL if nothing fits */
static void *carve(region *r, size_t n, int counted)
{
    size_t need = round_up(n ? n : 1, r->page);
    if (r->state != SHARED || (counted && r->nused == SPANS))
        return NULL; /* a frozen region's free pages are still the object's: never hand them out */
    for (size_t i = 0; i < r->nfree; i++) {
        if (r->free_spans[i].len < need)
            continue;
        size_t off = r->free_spans[i].off;
        r->free_spans[i].off += need;
        r->free_spans[i].len -= need;
        if (!r->free_spans[i].len)
            r->free_spans[i] = r->free_spans[--r->nfree];
        if (counted) {
            r->used[r->nused].off = off;
            r->used[r->nused++].len = need;
        }
        r->in_use += need;
        if (r->in_use > r->wanted)
            r->wanted = r->in_use;
        return r->base + off;
    }
    return NULL;
}

static void unmap_region(region *r)
{
    munmap(r->base, r->len); /* a failure leaves address space behind, nothing else */
    r->state = UNUSED;
}

/* a numpy allocation in r is freed: its span becomes free again (merged with its neighbours) */
static void give_back(region *r, const char *p)
{
    size_t off = (size_t)(p - r->base), len = 0;
    for (size_t i = 0; i < r->nused; i++) {
        if (r->used[i].off == off) {
            len = r->used[i].len;
            r->used[i] = r->used[--r->nused];
            break;
        }
    }
    if (!len)
        return; /* not the start of an allocation: never handed out as one */
    r->in_use -= len;
    if (r->state == FROZEN) {
        if (!r->nused && r != open_region)
            unmap_region(r);
        return;
    }
    for (size_t i = 0; i < r->nfree;) {
        span s = r->free_spans[i];
        if (s.off + s.len == off || off + len == s.off) {
            off = s.off < off ? s.off : off;
            len += s.len;
            r->free_spans[i] = r->free_spans[--r->nfree];
            i = 0;
        } else {
            i++;
        }
    }
    if (r->nfree < SPANS) {
        r->free_spans[r->nfree].off = off;
        r->free_spans[r->nfree++].len = len;
    } /* else the span is lost to this task's arena: only space */
}

static void *take_for_numpy(size_t n)
{
    void *p = NULL;
    pthread_mutex_lock(&arena_lock);
    region *r = open_region;
    if (r && n >= arena_threshold) {
        p = carve(r, n, 1);
        if (!p) {
            size_t want = r->in_use + round_up(n, r->page);
            if (want > r->wanted)
                r->wanted = want;
        }
    }
    pthread_mutex_unlock(&arena_lock);
    return p;
}

static void *arena_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = take_for_numpy(size);
    return p ? p : malloc(size ? size : 1);
}

static void *arena_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    if (elsize && nelem > (size_t)-1 / elsize)
        return NULL;
    size_t size = nelem * elsize;
    void *p = take_for_numpy(size);
    if (!p)
        return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
    memset(p, 0, size); /* recycled pages hold earlier data */
    return p;
}

static void arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    (void)size;
    if (!ptr)
        return;
    pthread_mutex_lock(&arena_lock);
    region *r = region_of(ptr);
    if (r)
        give_back(r, ptr);
    pthread_mutex_unlock(&arena_lock);
    if (!r)
        free(ptr);
}

static void *arena_realloc(void *ctx, void *ptr, size_t new_size)
{
    size_t old = 0;
    pthread_mutex_lock(&arena_lock);
    region *r = ptr ? region_of(ptr) : NULL;
    if (r) {
        size_t off = (size_t)((char *)ptr - r->base);
        for (size_t i = 0; i < r->nused; i++)
            if (r->used[i].off == off)
                old = r->used[i].len;
    }
    pthread_mutex_unlock(&arena_lock);
    if (!r)
        return realloc(ptr, new_size ? new_size : 1);
    void *fresh = arena_malloc(ctx, new_size);
    if (!fresh)
        return NULL;
    memcpy(fresh, ptr, new_size < old ? new_size : old);
    arena_free(ctx, ptr, old);
    return fresh;
}

static PyDataMem_Handler arena_handler = {
    "shmalloc_arena",
    1,
    {NULL, arena_malloc, arena_calloc, arena_realloc, arena_free},
};

/* Remap r privately over the same pages, then write each page of its live allocations onto itself:
   the kernel copies it, so the arrays in r keep what they hold in memory of this process alone. From
   then on nothing this process writes reaches the object, and nothing written into the object (it may
   be reused) reaches those arrays. On failure the shared mapping stays (errno set). */
static int freeze(region *r)
{
    void *p = mmap(r->base, r->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, r->fd, 0);
    if (p == MAP_FAILED)
        return -1;
    for (size_t i = 0; i < r->nused; i++) {
        char *span_start = r->base + r->used[i].off;
#ifdef MADV_POPULATE_WRITE
        /* write faults without writing: another thread's write to the span is never undone */
        if (madvise(span_start, r->used[i].len, MADV_POPULATE_WRITE) == 0)
            continue;
#endif
        for (size_t k = 0; k < r->used[i].len; k += r->page)
            __atomic_fetch_add(span_start + k, 0, __ATOMIC_RELAXED); /* a write that changes nothing */
    }
    close(r->fd);
    r->fd = -1;
    r->state = FROZEN;
    return 0;
}

static void freeze_before_fork(void)
{
    pthread_mutex_lock(&arena_lock);
    for (int i = 0; i < REGIONS; i++) {
        region *r = &regions[i];
        if (r->state == SHARED && (r->nused || r == open_region)) {
            r->spoiled = 1; /* whether or not freezing works: never shipped where it lies */
            /* Not frozen (no memory for a private mapping): the child must not share the task's pages;
               it gets no mapping there at all (a fault if it reads them, never another's data). */
            if (freeze(r) != 0)
                madvise(r->base, r->len, MADV_DONTFORK);
        }
    }
}

static void unlock_after_fork(void) { pthread_mutex_unlock(&arena_lock); }

/* the child does not run the task's arena: its allocations come from the heap */
static void child_after_fork(void)
{
    open_region = NULL;
    pthread_mutex_unlock(&arena_lock);
}

int shmalloc_arena_init(void)
{
    int rc = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!arena_capsule) {
        if (_import_array() < 0) {
            PyErr_Clear();
            errno = ENOSYS;
            rc = -1;
        } else if (!(arena_capsule = PyCapsule_New(&arena_handler, "mem_handler", NULL))) {
            PyErr_Clear();
            errno = ENOMEM;
            rc = -1;
        } else {
            pthread_atfork(freeze_before_fork, unlock_after_fork, child_after_fork);
        }
    }
    int saved_errno = errno;
    PyGILState_Release(gil);
    errno = saved_errno;
    return rc;
}

int shmalloc_arena_open(void *base, size_t len, size_t head, int fd, size_t threshold, int *out)
{
    long page = sysconf(_SC_PAGESIZE);
    if (!arena_capsule || !base || page <= 0 || head % (size_t)page || len % (size_t)page || head >= len) {
        errno = EINVAL;
        return -1;
    }
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup_fd < 0)
        return -1;
    int id = -1;
    pthread_mutex_lock(&arena_lock);
    if (open_region) {
        errno = EBUSY;
    } else {
        for (int i = 0; i < REGIONS && id < 0; i++)
            if (regions[i].state == UNUSED)
                id = i;
        if (id < 0) {
            errno = ENFILE;
        } else {
            region *r = &regions[id];
            memset(r, 0, sizeof *r);
            r->base = base;
            r->len = len;
            r->fd = dup_fd;
            r->state = SHARED;
            r->page = (size_t)page;
            r->free_spans[0].off = head;
            r->free_spans[0].len = len - head;
            r->nfree = 1;
            arena_threshold = threshold;
            open_region = r;
            *out = id; /* before returning: an interrupt right after the call still knows the region */
        }
    }
    pthread_mutex_unlock(&arena_lock);
    if (id < 0) {
        int saved = errno;
        close(dup_fd);
        errno = saved;
        return -1;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    saved_handler = PyDataMem_SetHandler(arena_capsule);
    if (!saved_handler)
        PyErr_Clear();
    PyGILState_Release(gil);
    if (!saved_handler) {
        pthread_mutex_lock(&arena_lock);
        open_region = NULL;
        close(regions[id].fd);
        regions[id].state = UNUSED;
        pthread_mutex_unlock(&arena_lock);
        errno = ENOMEM;
        return -1;
    }
    return id;
}

/* Stops serving allocations and gives this context its handler back (call it in the thread that opened). */
int shmalloc_arena_close(void)
{
    pthread_mutex_lock(&arena_lock);
    open_region = NULL;
    pthread_mutex_unlock(&arena_lock);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *handler = saved_handler;
    saved_handler = NULL;
    PyObject *ours = handler ? PyDataMem_SetHandler(handler) : NULL;
    Py_XDECREF(ours);
    Py_XDECREF(handler);
    if (PyErr_Occurred())
        PyErr_Clear();
    PyGILState_Release(gil);
    return 0;
}

/* what region id holds: bytes of live numpy allocations and placed copies; the most its task's large
   allocations and placed copies took or asked for at once; 1 if a fork spoiled it */
int shmalloc_arena_state(int id, size_t *live_bytes, size_t *live_arrays, size_t *wanted, int *spoiled)
{
    if (id < 0 || id >= REGIONS) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&arena_lock);
    region *r = &regions[id];
    *live_bytes = r->state == UNUSED ? 0 : r->in_use;
    *live_arrays = r->state == UNUSED ? 0 : r->nused;
    *wanted = r->wanted;
    *spoiled = r->spoiled;
    pthread_mutex_unlock(&arena_lock);
    return 0;
}

/* offset of n bytes of free space in region id (page aligned), for a copy placed there; -1 if none */
long long shmalloc_arena_place(int id, size_t n)
{
    long long off = -1;
    pthread_mutex_lock(&arena_lock);
    region *r = (id >= 0 && id < REGIONS) ? &regions[id] : NULL;
    if (r && r->state == SHARED && r != open_region) {
        char *p = carve(r, n, 0);
        if (p)
            off = p - r->base;
    }
    pthread_mutex_unlock(&arena_lock);
    return off;
}

/* 1 if [p, p + n) lies in one live numpy allocation of region id, starting on a page boundary */
int shmalloc_arena_holds(int id, const void *p, size_t n)
{
    int holds = 0;
    pthread_mutex_lock(&arena_lock);
    region *r = (id >= 0 && id < REGIONS) ? &regions[id] : NULL;
    if (r && r->state == SHARED && (const char *)p >= r->base && (const char *)p < r->base + r->len) {
        size_t off = (size_t)((const char *)p - r->base);
        if (off % r->page == 0)
            for (size_t i = 0; i < r->nused && !holds; i++)
                holds = r->used[i].off <= off && off + n <= r->used[i].off + r->used[i].len;
    }
    pthread_mutex_unlock(&arena_lock);
    return holds;
}

/* The task's answer is ready: release region id if no numpy allocation lives in it and no fork came
   (the mapping stays the caller's), else freeze it (it owns the mapping from then on, and unmaps it with
   its last array). Returns 1 if released, 2 if frozen, -1 if freezing failed (errno set: still shared).
   Idempotent: called again, it returns what the first call did. */
int shmalloc_arena_settle(int id)
{
    int rc;
    pthread_mutex_lock(&arena_lock);
    region *r = (id >= 0 && id < REGIONS) ? &regions[id] : NULL;
    if (!r || r == open_region) {
        errno = EINVAL;
        rc = -1;
    } else if (r->outcome) {
        rc = r->outcome;
    } else if (r->state == UNUSED) {
        /* never served a task (its open failed), or frozen by a fork and unmapped with its last array */
        rc = r->outcome = r->spoiled ? FROZEN_BY_SETTLE : RELEASED;
    } else if (r->state == SHARED && !r->nused && !r->spoiled) {
        close(r->fd);
        r->state = UNUSED;
        rc = r->outcome = RELEASED;
    } else if (r->state == SHARED && freeze(r) < 0) {
        rc = -1;
    } else {
        if (r->state == FROZEN && !r->nused)
            unmap_region(r);
        rc = r->outcome = FROZEN_BY_SETTLE;
    }
    pthread_mutex_unlock(&arena_lock);
    return rc;
}
