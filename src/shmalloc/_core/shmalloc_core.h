/* Declarations of shmalloc's native core, read by build_ffi.py as the cffi cdef.
   Kept free of preprocessor lines so cffi can parse it; every function returns
   0 / -1 (or a pointer / NULL) and leaves errno set on failure. */

int shmalloc_open(const char *name, int flags, unsigned int mode);
int shmalloc_unlink(const char *name);
int shmalloc_close(int fd);
int shmalloc_write_all(int fd, const void *buf, size_t len, long long offset);
/* writes the n parts (addresses[i], lengths[i]) one after the other from offset, with pwritev */
int shmalloc_write_parts(int fd, const uintptr_t *addresses, const size_t *lengths, size_t n, long long offset);
int shmalloc_read_all(int fd, void *buf, size_t len, long long offset);
/* also stores the address (or NULL) in *out unless out is NULL */
void *shmalloc_map(int fd, size_t len, long long offset, int writable_private, void **out);
/* as shmalloc_map, keeping only the given spans (start, length pairs) mapped */
void *shmalloc_map_parts(int fd, size_t len, long long offset, int writable_private, const size_t *spans, size_t nspans,
                         void **out);
void *shmalloc_map_shared(int fd, size_t len, long long offset, int writable);
int shmalloc_unmap(void *addr, size_t len);
int shmalloc_fallocate(int fd, long long size);
int shmalloc_punch(int fd, long long offset, long long len);
void shmalloc_copy(void *dst, const void *src, size_t len, int nthreads);

/* numpy memory handler (NEP 49) */
int shmalloc_handler_init(void);
/* descr (a numpy dtype) and out (a list holding only None) are PyObject
   pointers, passed as void * because cffi has no type for them; *owned
   becomes 1 when the array owns the mapping */
int shmalloc_adopt(void *addr, size_t len, void *descr, int nd, const intptr_t *dims, int fortran, void *out,
                   int *owned);
size_t shmalloc_live_mappings(void);
/* munmap failures when arrays freed their mappings, and the errno of the last one */
size_t shmalloc_unmap_failures(int *last_errno);

/* recycling: 1 if addr is a mapping still owned by an array, else 0 */
int shmalloc_is_adopted(void *addr);
void *shmalloc_map_populated(int fd, size_t len, size_t populated);

/* the arena (shmalloc_arena.c): numpy's large allocations of a pool worker's task from the
   shared mapping of its spare; open returns a region id */
int shmalloc_arena_init(void);
int shmalloc_arena_open(void *base, size_t len, size_t head, int fd, size_t threshold, int *out);
int shmalloc_arena_close(void);
int shmalloc_arena_state(int id, size_t *live_bytes, size_t *live_arrays, size_t *wanted, int *spoiled);
long long shmalloc_arena_place(int id, size_t n);
int shmalloc_arena_holds(int id, const void *p, size_t n);
/* 1 released, 2 frozen, -1 freezing failed; idempotent */
int shmalloc_arena_settle(int id);
