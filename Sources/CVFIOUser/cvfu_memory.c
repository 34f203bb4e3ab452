// Files as memory: memfds, holes (punching and finding them), page residency,
// whole reads, and the zero-page scan.
#define _GNU_SOURCE
#include "cvfu_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int cvfu_memfd_create(const char *name, unsigned int flags) {
  int r = memfd_create(name, flags);
  return r < 0 ? -errno : r;
}

int cvfu_punch_hole(int fd, long long offset, long long length) {
  int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  return r < 0 ? -errno : 0;
}

long long cvfu_seek_data(int fd, long long offset) {
  off_t r = lseek(fd, offset, SEEK_DATA);
  return r < 0 ? -errno : r;
}

int cvfu_all_resident(const void *addr, size_t len) {
  const size_t page = 4096;
  uintptr_t start = (uintptr_t)addr & ~(uintptr_t)(page - 1);
  uintptr_t end = ((uintptr_t)addr + len + page - 1) & ~(uintptr_t)(page - 1);
  unsigned char vec[1024];
  while (start < end) {
    size_t pages = (end - start) / page;
    if (pages > sizeof vec) pages = sizeof vec;
    if (mincore((void *)start, pages * page, vec) != 0) return -errno;
    for (size_t i = 0; i < pages; i++) {
      if (!(vec[i] & 1)) return 0;
    }
    start += pages * page;
  }
  return 1;
}

int cvfu_pread_all(int fd, void *buf, size_t len, long long offset) {
  char *p = buf;
  while (len > 0) {
    ssize_t n = pread(fd, p, len, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -EIO;
    p += n;
    len -= (size_t)n;
    offset += n;
  }
  return 0;
}

bool cvfu_all_zero(const void *data, size_t len) {
  const uint8_t *p = data;
  while (len > 0 && ((uintptr_t)p & 7) != 0) {
    if (*p++ != 0) return false;
    len--;
  }
  // 64 bytes per step, ORed together: the compiler vectorises the inner loop.
  while (len >= 64) {
    uint64_t acc = 0;
    for (int i = 0; i < 8; i++) {
      uint64_t word;
      memcpy(&word, p + 8 * i, 8);
      acc |= word;
    }
    if (acc != 0) return false;
    p += 64;
    len -= 64;
  }
  while (len > 0) {
    if (*p++ != 0) return false;
    len--;
  }
  return true;
}
