/* Declarations of shmalloc's native core, read by build_ffi.py as the cffi cdef.
   Kept free of preprocessor lines so cffi can parse it; every function returns
   0 / -1 (or a pointer / NULL) and leaves errno set on failure. */

int shmalloc_open(const char *name, int flags, unsigned int mode);
int shmalloc_unlink(const char *name);
int shmalloc_close(int fd);
int shmalloc_write_all(int fd, const void *buf, size_t len, long long offset);
int shmalloc_read_all(int fd, void *buf, size_t len, long long offset);
/* also stores the address (or NULL) in *out unless out is NULL */
void *shmalloc_map(int fd, size_t len, long long offset, int writable_private, void **out);
void *shmalloc_map_shared(int fd, size_t len, long long offset, int writable);
int shmalloc_unmap(void *addr, size_t len);
int shmalloc_fallocate(int fd, long long size);
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
void *shmalloc_map_populated(int fd, size_t len);
