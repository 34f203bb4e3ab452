// Files as memory: memfds, holes, page residency, whole reads, the zero-page scan,
// and copies of client memory that survive the client shrinking its file (cvfu_guard.c).
#ifndef CVFU_MEMORY_H
#define CVFU_MEMORY_H

#include <stdbool.h>
#include <stddef.h>

int cvfu_memfd_create(const char *name, unsigned int flags);
/* Frees the pages of [offset, offset+length) of a file, keeping its size: reads give zeros. */
int cvfu_punch_hole(int fd, long long offset, long long length);
/* lseek(fd, offset, SEEK_DATA): the next byte of data
 * at or after offset, or -errno (-ENXIO: none before the end). */
long long cvfu_seek_data(int fd, long long offset);
/* Whether every page of [addr, addr+len) of a shared file mapping is in the
 * file's page cache (mincore), so reading it through the mapping allocates
 * nothing: 1, 0, or -errno. addr need not be page-aligned. */
int cvfu_all_resident(const void *addr, size_t len);
/* pread until len bytes are read: 0, or -errno (-EIO at end of file). */
int cvfu_pread_all(int fd, void *buf, size_t len, long long offset);
/// Whether all `len` bytes at `data` are zero: how a checkpoint finds the
/// VRAM pages it need not store. Stops at the first nonzero 64-byte block,
/// so a page of data costs a few loads and a zero page one pass at memory speed.
bool cvfu_all_zero(const void *data, size_t len);

/// Installs (once per process) the SIGBUS handler `cvfu_guarded_copy` needs.
/// 0 or -errno.
int cvfu_guard_install(void);
/// memcpy of client memory that a client may have cut short (ftruncate of
/// the file behind a DMA window): 0, or -EFAULT when a page of `dst` or `src`
/// lies past the end of its file (some bytes may have been copied). Needs
/// `cvfu_guard_install`.
int cvfu_guarded_copy(void *dst, const void *src, size_t count);
/// Whether `fd` is sealed against shrinking (F_SEAL_SHRINK, which QEMU's
/// memory-backend-memfd sets): its mappings need no guarded copy.
bool cvfu_file_cannot_shrink(int fd);
/// memfd_create flags (Glibc's module imports them only with _GNU_SOURCE).
#define CVFU_MFD_CLOEXEC 1
#define CVFU_MFD_ALLOW_SEALING 2
/// Seals `fd` (a memfd made with CVFU_MFD_ALLOW_SEALING) against shrinking,
/// as QEMU's memory-backend-memfd does: 0 or -errno.
int cvfu_seal_shrink(int fd);

#endif
