// The kernel's interfaces Swift cannot call directly: variadic ioctl (the VFIO
// uAPI), eventfds, and what kind of file a descriptor a client sent is.
#define _GNU_SOURCE
#include "cvfu_kernel.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(struct vfio_region_info) == 32, "vfio_region_info");
_Static_assert(sizeof(struct vfio_irq_set) == 20, "vfio_irq_set");

int cvfu_ioctl(int fd, unsigned long request, void *arg) {
  int r = ioctl(fd, request, arg);
  return r < 0 ? -errno : r;
}

int cvfu_eventfd(unsigned int initval, int flags) {
  int r = eventfd(initval, flags);
  return r < 0 ? -errno : r;
}

int cvfu_eventfd_signal(int fd) {
  uint64_t one = 1;
  for (;;) {
    ssize_t n = write(fd, &one, sizeof(one));
    if (n == sizeof(one)) return 0;
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : -EIO;
  }
}

int64_t cvfu_eventfd_drain(int fd) {
  uint64_t value = 0;
  for (;;) {
    ssize_t n = read(fd, &value, sizeof(value));
    if (n == sizeof(value)) return (int64_t)value;
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : -EIO;
  }
}

int cvfu_fd_kind(int fd, int64_t *size) {
  struct stat st;
  if (fstat(fd, &st) < 0) return -errno;
  *size = 0;
  switch (st.st_mode & S_IFMT) {
  case S_IFREG:
    *size = st.st_size;
    return CVFU_FD_REGULAR;
  case S_IFSOCK: return CVFU_FD_SOCKET;
  case S_IFIFO: return CVFU_FD_PIPE;
  case S_IFDIR: return CVFU_FD_DIRECTORY;
  case S_IFCHR:
  case S_IFBLK: return CVFU_FD_DEVICE;
  case 0: break;  // an anonymous inode: its link names what it is
  default: return CVFU_FD_OTHER;
  }
  char path[64], target[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(path, target, sizeof target - 1);
  if (n < 0) return CVFU_FD_OTHER;
  target[n] = 0;
  return strcmp(target, "anon_inode:[eventfd]") == 0 ? CVFU_FD_EVENTFD : CVFU_FD_OTHER;
}
