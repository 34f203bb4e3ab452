// The kernel's interfaces Swift cannot call directly: variadic ioctl and the
// linux/vfio.h definitions the kernel backend uses, eventfds, and what kind of
// file a descriptor a client sent is.
#ifndef CVFU_KERNEL_H
#define CVFU_KERNEL_H

#include <stdint.h>
#include <linux/vfio.h>

int cvfu_ioctl(int fd, unsigned long request, void *arg);
int cvfu_eventfd(unsigned int initval, int flags);
int cvfu_eventfd_signal(int fd);
/// Reads and clears an eventfd counter without blocking; -errno (EAGAIN) if 0.
int64_t cvfu_eventfd_drain(int fd);

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

#endif
