/* shmalloc's native core: system calls on POSIX shared memory objects and a
   numpy memory handler (NEP 49) through which arrays own private mappings.
   No policy lives here: callers check sizes and owners and raise errors. */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shmalloc_core.h"

/* Linux caps one read/write at a little under 2 GiB; stay well below it. */
#define IO_CHUNK ((size_t)1 << 30)
/* Parts given to one pwritev (IOV_MAX is 1024 on Linux). */
#define IOV_BATCH 64

int shmalloc_open(const char *name, int flags, unsigned int mode)
{
    int fd;
    do {
        fd = shm_open(name, flags, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

int shmalloc_unlink(const char *name)
{
    return shm_unlink(name);
}

int shmalloc_close(int fd)
{
    return close(fd);
}


int shmalloc_write_parts(int fd, const uintptr_t *addresses, const size_t *lengths, size_t n, long long offset)
{
    struct iovec iov[IOV_BATCH];
    size_t part = 0, done = 0; /* the first part not yet written whole, and its bytes written */
    for (;;) {
        while (part < n && done == lengths[part]) {
            part++;
            done = 0;
        }
        if (part == n)
            return 0;
        int count = 0;
        size_t total = 0;
        for (size_t i = part; i < n && count < IOV_BATCH && total < IO_CHUNK; i++) {
            size_t skip = i == part ? done : 0, len = lengths[i] - skip;
            if (len > IO_CHUNK - total)
                len = IO_CHUNK - total;
            iov[count].iov_base = (char *)addresses[i] + skip;
            iov[count].iov_len = len;
            count++;
            total += len;
        }
        ssize_t n_written = pwritev(fd, iov, count, (off_t)offset);
        if (n_written < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n_written == 0) { /* no progress and no error: treat as out of space */
            errno = ENOSPC;
            return -1;
        }
        offset += n_written;
        for (size_t left = (size_t)n_written; left > 0;) {
            size_t rest = lengths[part] - done;
            if (left < rest) {
                done += left;
                break;
            }
            left -= rest;
            part++;
            done = 0;
        }
    }
}

int shmalloc_write_all(int fd, const void *buf, size_t len, long long offset)
{
    uintptr_t address = (uintptr_t)buf;
    return shmalloc_write_parts(fd, &address, &len, 1, offset);
}

int shmalloc_read_all(int fd, void *buf, size_t len, long long offset)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len < IO_CHUNK ? len : IO_CHUNK, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {  /* the object ended early: it was truncated */
            errno = EIO;
            return -1;
        }
        p += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* The address is also stored in *out (if not NULL) before returning, so that
   Python code interrupted right after the call still knows what to unmap. */
void *shmalloc_map(int fd, size_t len, long long offset, int writable_private, void **out)
{
    int prot = writable_private ? PROT_READ | PROT_WRITE : PROT_READ;
    void *addr = mmap(NULL, len, prot, MAP_PRIVATE, fd, (off_t)offset);
    if (addr == MAP_FAILED)
        addr = NULL;
    if (out)
        *out = addr;
    return addr;
}

/* As shmalloc_map, then unmaps the pages outside the nspans spans (start, length pairs relative to
   the mapping: page aligned, sorted, not overlapping), all in one call: an interrupt cannot leave them
   mapped, nor have them unmapped twice. */
void *shmalloc_map_parts(int fd, size_t len, long long offset, int writable_private, const size_t *spans, size_t nspans,
                         void **out)
{
    char *addr = shmalloc_map(fd, len, offset, writable_private, out);
    if (!addr)
        return NULL;
    size_t at = 0;
    for (size_t i = 0; i < nspans; i++) {
        size_t start = spans[2 * i], end = start + spans[2 * i + 1];
        if (start > at)
            munmap(addr + at, start - at);
        if (end > at)
            at = end;
    }
    if (len > at)
        munmap(addr + at, len - at);
    return addr;
}

void *shmalloc_map_shared(int fd, size_t len, long long offset, int writable)
{
    int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    void *addr = mmap(NULL, len, prot, MAP_SHARED, fd, (off_t)offset);
    return addr == MAP_FAILED ? NULL : addr;
}

/* Reserve every page now, so that a full /dev/shm is an error here and not a SIGBUS later. */
int shmalloc_fallocate(int fd, long long size)
{
    int rc;
#ifdef __APPLE__
    /* no posix_fallocate on macOS: sizing the object is the best there is */
    rc = ftruncate(fd, (off_t)size) < 0 ? errno : 0;
#else
    do {
        rc = posix_fallocate(fd, 0, (off_t)size);
    } while (rc == EINTR);
#endif
    if (rc) {
        errno = rc;
        return -1;
    }
    return 0;
}

/* Free the pages of len bytes at offset, keeping the object's size: a private mapping's copied pages
   there stay (a cut would take them, and any access past the new end would be a SIGBUS). */
int shmalloc_punch(int fd, long long offset, long long len)
{
#if defined(FALLOC_FL_PUNCH_HOLE) && defined(FALLOC_FL_KEEP_SIZE)
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len);
#else
    (void)fd;
    (void)offset;
    (void)len;
    errno = ENOSYS;
    return -1;
#endif
}

int shmalloc_unmap(void *addr, size_t len)
{
    return munmap(addr, len);
}

/* ---- parallel memcpy: large copies use several cores ---- */

typedef struct {
    char *dst;
    const char *src;
    size_t len;
} copy_job;

static void *copy_worker(void *arg)
{
    copy_job *job = arg;
    memcpy(job->dst, job->src, job->len);
    return NULL;
}

void shmalloc_copy(void *dst, const void *src, size_t len, int nthreads)
{
    enum { MAX_THREADS = 16 };
    if (nthreads > MAX_THREADS)
        nthreads = MAX_THREADS;
    if (nthreads <= 1 || len < ((size_t)8 << 20)) {
        memcpy(dst, src, len);
        return;
    }
    pthread_t threads[MAX_THREADS];
    copy_job jobs[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    /* chunks on page boundaries so threads never share a page */
    size_t chunk = (((len + (size_t)nthreads - 1) / (size_t)nthreads) + 4095) & ~(size_t)4095;
    size_t done = 0;
    int i;
    for (i = 0; i < nthreads && done < len; i++) {
        size_t n = len - done < chunk ? len - done : chunk;
        jobs[i].dst = (char *)dst + done;
        jobs[i].src = (const char *)src + done;
        jobs[i].len = n;
        done += n;
        /* the last chunk runs on this thread; a thread that fails to start does too */
        if (done < len && pthread_create(&threads[i], NULL, copy_worker, &jobs[i]) == 0)
            started[i] = 1;
        else
            copy_worker(&jobs[i]);
    }
    for (int j = 0; j < i; j++)
        if (started[j])
            pthread_join(threads[j], NULL);
}

/* ---- registry of mappings owned by arrays: address -> mapped length ----
   numpy's free() is not always told the allocated size, so the true length
   of each mapping is kept here. Open addressing, guarded by one mutex. */

typedef struct {
    void *addr;
    size_t len;
} mapping;

#define TOMBSTONE ((void *)1)

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static mapping *registry;
static size_t registry_cap, registry_live, registry_used;

static size_t slot_of(void *addr, size_t cap)
{
    uint64_t h = ((uint64_t)(uintptr_t)addr >> 12) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 17) & (cap - 1);
}

static int registry_grow(void)
{
    size_t cap = registry_cap ? registry_cap : 64;
    while (cap < 4 * (registry_live + 1))
        cap *= 2;
    mapping *fresh = calloc(cap, sizeof(mapping));
    if (!fresh)
        return -1;
    for (size_t i = 0; i < registry_cap; i++) {
        void *a = registry[i].addr;
        if (a && a != TOMBSTONE) {
            size_t s = slot_of(a, cap);
            while (fresh[s].addr)
                s = (s + 1) & (cap - 1);
            fresh[s] = registry[i];
        }
    }
    free(registry);
    registry = fresh;
    registry_cap = cap;
    registry_used = registry_live;
    return 0;
}

static int registry_add(void *addr, size_t len)
{
    int rc = 0;
    pthread_mutex_lock(&registry_lock);
    if (2 * (registry_used + 1) > registry_cap && registry_grow() < 0) {
        rc = -1;
    } else {
        size_t s = slot_of(addr, registry_cap);
        while (registry[s].addr && registry[s].addr != TOMBSTONE)
            s = (s + 1) & (registry_cap - 1);
        if (!registry[s].addr)
            registry_used++;
        registry[s].addr = addr;
        registry[s].len = len;
        registry_live++;
    }
    pthread_mutex_unlock(&registry_lock);
    return rc;
}

/* Returns the mapped length of addr (0 if it is not a mapping); removes it if asked. */
static size_t registry_find(void *addr, int remove)
{
    size_t len = 0;
    pthread_mutex_lock(&registry_lock);
    if (registry_cap) {
        size_t s = slot_of(addr, registry_cap);
        while (registry[s].addr) {
            if (registry[s].addr == addr) {
                len = registry[s].len;
                if (remove) {
                    registry[s].addr = TOMBSTONE;
                    registry_live--;
                }
                break;
            }
            s = (s + 1) & (registry_cap - 1);
        }
    }
    pthread_mutex_unlock(&registry_lock);
    return len;
}

size_t shmalloc_live_mappings(void)
{
    pthread_mutex_lock(&registry_lock);
    size_t n = registry_live;
    pthread_mutex_unlock(&registry_lock);
    return n;
}

/* A fork while another thread holds the lock must not leave the child locked. */
static void lock_before_fork(void) { pthread_mutex_lock(&registry_lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&registry_lock); }

/* ---- the numpy handler ----
   Arrays never receive a mapping through allocation: shmalloc_adopt makes an
   array over the mapping and hands it ownership, all in one call with the GIL
   held. The handler then only frees (munmap for a registered mapping) and
   reallocates; its malloc and calloc serve numpy's own later allocations for
   such an array (e.g. after arr.resize). */

/* munmap failures in the handler: it may not raise, print or allocate, so they
   are counted here for Python to read (a failure leaves the mapping behind). */
static atomic_size_t unmap_failures;
static atomic_int last_unmap_errno;

static void unmap_owned(void *addr, size_t len)
{
    if (munmap(addr, len) < 0) {
        atomic_store(&last_unmap_errno, errno);
        atomic_fetch_add(&unmap_failures, 1);
    }
}

size_t shmalloc_unmap_failures(int *last_errno)
{
    if (last_errno)
        *last_errno = atomic_load(&last_unmap_errno);
    return atomic_load(&unmap_failures);
}

static void *handler_malloc(void *ctx, size_t size)
{
    (void)ctx;
    return malloc(size ? size : 1);
}

static void *handler_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
}

static void *handler_realloc(void *ctx, void *ptr, size_t new_size)
{
    (void)ctx;
    size_t mapped = ptr ? registry_find(ptr, 0) : 0;
    if (!mapped)
        return realloc(ptr, new_size ? new_size : 1);
    /* a mapping cannot grow in place: move the data to the heap */
    void *fresh = malloc(new_size ? new_size : 1);
    if (!fresh)
        return NULL;
    memcpy(fresh, ptr, new_size < mapped ? new_size : mapped);
    registry_find(ptr, 1);
    unmap_owned(ptr, mapped);
    return fresh;
}

static void handler_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    (void)size;  /* numpy passes the array's byte count: the registry knows the mapped length */
    if (!ptr)
        return;
    size_t mapped = registry_find(ptr, 1);
    if (mapped)
        unmap_owned(ptr, mapped);
    else
        free(ptr);
}

static PyDataMem_Handler shm_handler = {
    "shmalloc",
    1,
    {NULL, handler_malloc, handler_calloc, handler_realloc, handler_free},
};

static PyObject *handler_capsule;

int shmalloc_handler_init(void)
{
    int rc = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!handler_capsule) {
        if (_import_array() < 0) {
            PyErr_Clear();
            errno = ENOSYS;
            rc = -1;
        } else {
            handler_capsule = PyCapsule_New(&shm_handler, "mem_handler", NULL);
            if (!handler_capsule) {
                PyErr_Clear();
                errno = ENOMEM;
                rc = -1;
            } else {
                pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
            }
        }
    }
    int saved_errno = errno;  /* releasing the GIL may touch errno; the caller reads it */
    PyGILState_Release(gil);
    errno = saved_errno;
    return rc;
}

/* npy_intp is what the cdef calls intptr_t */
typedef char npy_intp_is_intptr_t[sizeof(npy_intp) == sizeof(intptr_t) ? 1 : -1];

/* Make an array of dtype descr and shape dims (nd of them; Fortran order if
   fortran) over the mapping addr of len bytes, hand it ownership of the
   mapping (numpy frees it through the handler, which munmaps len bytes), and
   store it as the only item of the list out. descr and out are PyObject
   pointers the caller keeps alive. Everything happens with the GIL held, and
   no Python code can run between registering the mapping and the array owning
   it: no other code can ever receive the mapping. (Creating the array may run
   Python code, e.g. finalisers from the collector, but that is before the
   mapping is registered, and the array only points at it.) *owned is set to 1
   at the moment the array owns the mapping: from then on only the array may
   unmap it, even if an interrupt drops the array before the caller sees it.
   Returns 0, or -1 with errno set: then nothing is registered, no array owns
   the mapping, and out and *owned are unchanged. */
int shmalloc_adopt(void *addr, size_t len, void *descr, int nd, const intptr_t *dims, int fortran, void *out,
                   int *owned)
{
    int rc = -1;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *list = out;
    PyArrayObject *array = NULL;
    if (!handler_capsule || !addr || !owned || !PyArray_DescrCheck((PyObject *)descr) || !PyList_Check(list)
        || PyList_GET_SIZE(list) != 1 || PyList_GET_ITEM(list, 0) != Py_None || nd < 0 || nd > NPY_MAXDIMS) {
        errno = EINVAL;
        goto done;
    }
    Py_INCREF(descr);  /* PyArray_NewFromDescr steals a reference */
    array = (PyArrayObject *)PyArray_NewFromDescr(
        &PyArray_Type, (PyArray_Descr *)descr, nd, (const npy_intp *)dims, NULL, addr,
        fortran ? NPY_ARRAY_FARRAY : NPY_ARRAY_CARRAY, NULL);
    if (!array) {
        errno = PyErr_ExceptionMatches(PyExc_MemoryError) ? ENOMEM : EINVAL;
        PyErr_Clear();
        goto done;
    }
    /* From here on no Python code runs until the array owns the mapping. */
    if (PyArray_DATA(array) != addr || (size_t)PyArray_NBYTES(array) > len
        || (PyArray_FLAGS(array) & NPY_ARRAY_OWNDATA) || PyArray_HANDLER(array) != NULL) {
        errno = EINVAL;  /* not the plain view over the mapping that was asked for */
        goto done;
    }
    if (registry_add(addr, len) < 0) {
        errno = ENOMEM;
        goto done;
    }
    Py_INCREF(handler_capsule);
    ((PyArrayObject_fields *)array)->mem_handler = handler_capsule;
    PyArray_ENABLEFLAGS(array, NPY_ARRAY_OWNDATA);
    *owned = 1;
    PyList_SetItem(list, 0, (PyObject *)array);  /* steals the reference; releases the None */
    array = NULL;
    rc = 0;
done:
    if (rc < 0 && array) {
        int saved = errno;
        Py_DECREF(array);  /* it does not own the mapping: nothing is freed */
        errno = saved;
    }
    int saved_errno = errno;  /* releasing the GIL may touch errno; the caller reads it */
    PyGILState_Release(gil);
    errno = saved_errno;
    return rc;
}

int shmalloc_is_adopted(void *addr)
{
    return registry_find(addr, 0) != 0;
}

/* recycling: a writable shared mapping with its page tables filled at once, so
   that a worker refilling a recycled object through it copies without faults */
void *shmalloc_map_populated(int fd, size_t len, size_t populated)
{
    int flags = MAP_SHARED;
#ifdef MAP_POPULATE
    if (populated >= len)
        flags |= MAP_POPULATE;
#endif
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_POPULATE_WRITE
    /* only the first part: the rest may be holes (freed pages of a spare), which populating would fill */
    if (populated && populated < len)
        madvise(p, populated, MADV_POPULATE_WRITE); /* a failure leaves them to fault in when written */
#endif
    return p;
}
