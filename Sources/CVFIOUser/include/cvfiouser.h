// C shim for what Swift cannot express directly: variadic ioctl, CMSG_*
// ancillary-data walking for SCM_RIGHTS, and the linux/vfio.h definitions the
// kernel backend uses.
#ifndef CVFIOUSER_H
#define CVFIOUSER_H

#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/vfio.h>

#include "cvfu_posix.h"

// Most fds one recvmsg can carry on Linux (SCM_MAX_FD). The receive buffer is
// sized for it so surplus fds are received and closed, never silently dropped.
#define CVFU_SCM_MAX_FD 253

/// sendmsg() of `iov` with `nfds` descriptors as SCM_RIGHTS, retrying EINTR.
/// Returns bytes sent or -errno.
ssize_t cvfu_sendmsg(int sock, const struct iovec *iov, int iovcnt,
                     const int *fds, int nfds);

/// recvmsg() into `buf`; descriptors go to `fds` (close-on-exec). At most
/// `maxfds` are kept; the count received is stored in `*nfds`, and any beyond
/// `maxfds` are closed here. Returns bytes read, 0 on EOF, or -errno.
ssize_t cvfu_recvmsg(int sock, void *buf, size_t len, int *fds, int maxfds,
                     int *nfds, int flags);

int cvfu_ioctl(int fd, unsigned long request, void *arg);
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
int cvfu_eventfd(unsigned int initval, int flags);

/// CRC-32C (Castagnoli) of `len` bytes continuing from `crc` (0 to start):
/// crc32c(b, crc32c(a, 0)) == crc32c(a ++ b, 0). Uses SSE4.2's crc32
/// instruction on three interleaved lanes where the CPU has it (the save
/// file's checksum must not slow a multi-GiB save), a table otherwise.
uint32_t cvfu_crc32c(uint32_t crc, const void *data, size_t len);
/// Whether all `len` bytes at `data` are zero: how a checkpoint finds the
/// VRAM pages it need not store. Stops at the first nonzero 64-byte block,
/// so a page of data costs a few loads and a zero page one pass at memory speed.
bool cvfu_all_zero(const void *data, size_t len);
/// A pipe (close-on-exec) for `cvfu_splice_exact`, grown to 1 MiB where the
/// system allows. 0 or -errno.
int cvfu_relay_pipe(int fds[2]);
/// Moves exactly `count` bytes from socket `from` to socket `to` through the
/// empty pipe `pipe_fds`, by splice(2): the kernel passes page references
/// along (a Unix socket takes spliced pages since Linux 6.5), so no byte is
/// copied in user space. 0, or -errno with `*side` 0 when reading `from`
/// failed (ECONNRESET: it closed) and 1 when writing `to` failed; `*moved`
/// says how many bytes reached `to` either way (on a failure reading `from`
/// the pipe is empty again), and `*taken` how many were read from `from`
/// (the rest of `count` is still in that socket).
int cvfu_splice_exact(
    int from, int to, const int pipe_fds[2], size_t count, int *side, size_t *moved,
    size_t *taken);
int cvfu_eventfd_signal(int fd);
/// Reads and clears an eventfd counter without blocking; -errno (EAGAIN) if 0.
int64_t cvfu_eventfd_drain(int fd);
int cvfu_pin_to_cpu(int cpu);
/// Lets the calling thread run on every CPU again.
int cvfu_unpin(void);
int cvfu_socket_buffers(int sock, int bytes);
int cvfu_socketpair(int fds[2]);
int cvfu_set_recv_timeout_ms(int sock, int ms);
/// Peer credentials of a connected unix socket (pid, uid, gid).
int cvfu_peer_cred(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

/// A listening AF_UNIX stream socket bound at `path` (close-on-exec). A stale
/// socket file nobody listens on is replaced; a live one gives -EADDRINUSE,
/// a symbolic link (never followed) -ELOOP, a directory -EISDIR and anything
/// else that is not a socket -ENOTSOCK.
int cvfu_listen_unix(const char *path, int backlog);
/// A connected AF_UNIX stream socket to `path` (close-on-exec), or -errno.
int cvfu_connect_unix(const char *path);
/// accept4 with SOCK_CLOEXEC, retrying EINTR.
int cvfu_accept(int listener);
/// Waits up to `ms` for `fd` to become readable: 1 ready, 0 timeout, -errno.
int cvfu_wait_readable(int fd, int ms);
/// Sets SO_SNDTIMEO: a send that makes no progress for `ms` fails with EAGAIN (0: never).
int cvfu_set_send_timeout_ms(int sock, int ms);
/// Milliseconds on CLOCK_MONOTONIC.
int64_t cvfu_monotonic_ms(void);

/// What kind of file a descriptor a client sent is, checked before use.
enum cvfu_fd_kind {
  CVFU_FD_OTHER = 0,    // an anonymous inode other than an eventfd, or anything unknown
  CVFU_FD_REGULAR = 1,  // a regular file: memfd, tmpfs, hugetlbfs, /dev/shm, disk (mappable memory)
  CVFU_FD_EVENTFD = 2,
  CVFU_FD_SOCKET = 3,
  CVFU_FD_PIPE = 4,
  CVFU_FD_DIRECTORY = 5,
  CVFU_FD_DEVICE = 6,   // a character or block device
};
/// The kind of `fd` (fstat, and /proc/self/fd/N for anonymous inodes, which
/// have no file type); its size in `*size` for a regular file. -errno (EBADF).
int cvfu_fd_kind(int fd, int64_t *size);

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
