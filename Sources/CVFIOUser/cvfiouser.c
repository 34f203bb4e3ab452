#define _GNU_SOURCE
#include "cvfiouser.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sched.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <poll.h>
#include <stdio.h>
#include <time.h>
#include <sys/un.h>
#include <unistd.h>

_Static_assert(sizeof(struct vfio_region_info) == 32, "vfio_region_info");
_Static_assert(sizeof(struct vfio_irq_set) == 20, "vfio_irq_set");

ssize_t cvfu_sendmsg(int sock, const struct iovec *iov, int iovcnt,
                     const int *fds, int nfds) {
  struct msghdr msg = {0};
  msg.msg_iov = (struct iovec *)iov;
  msg.msg_iovlen = (size_t)iovcnt;
  union {
    char buf[CMSG_SPACE(sizeof(int) * CVFU_SCM_MAX_FD)];
    struct cmsghdr align;
  } control;
  if (nfds > 0) {
    if (nfds > CVFU_SCM_MAX_FD) return -EINVAL;
    memset(&control, 0, sizeof(control));
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
  }
  for (;;) {
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n >= 0) return n;
    if (errno != EINTR) return -errno;
  }
}

ssize_t cvfu_recvmsg(int sock, void *buf, size_t len, int *fds, int maxfds,
                     int *nfds, int flags) {
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  union {
    char buf[CMSG_SPACE(sizeof(int) * CVFU_SCM_MAX_FD)];
    struct cmsghdr align;
  } control;
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof(control.buf);
  *nfds = 0;
  ssize_t n;
  for (;;) {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags);
    if (n >= 0) break;
    if (errno != EINTR) return -errno;
  }
  int got = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int *data = (int *)CMSG_DATA(c);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, &data[i], sizeof(int));
      if (got < maxfds) fds[got] = fd; else close(fd);
      got++;
    }
  }
  *nfds = got;
  return n;
}

int cvfu_ioctl(int fd, unsigned long request, void *arg) {
  int r = ioctl(fd, request, arg);
  return r < 0 ? -errno : r;
}

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

int cvfu_pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

int cvfu_unpin(void) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

int cvfu_socket_buffers(int sock, int bytes) {
  if (setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)) < 0) return -errno;
  if (setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)) < 0) return -errno;
  return 0;
}

int cvfu_socketpair(int fds[2]) {
  return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0 ? -errno : 0;
}

int cvfu_set_recv_timeout_ms(int sock, int ms) {
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  return setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ? -errno : 0;
}

int cvfu_peer_cred(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
  *pid = cred.pid;
  *uid = cred.uid;
  *gid = cred.gid;
  return 0;
}

static int fill_addr(struct sockaddr_un *addr, const char *path) {
  memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  size_t len = strlen(path);
  if (len == 0 || len >= sizeof(addr->sun_path)) return -ENAMETOOLONG;
  memcpy(addr->sun_path, path, len + 1);
  return 0;
}

int cvfu_connect_unix(const char *path) {
  struct sockaddr_un addr;
  int r = fill_addr(&addr, path);
  if (r < 0) return r;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
    if (errno == EINTR) continue;
    int e = errno;
    close(fd);
    return -e;
  }
  return fd;
}

int cvfu_listen_unix(const char *path, int backlog) {
  struct sockaddr_un addr;
  int r = fill_addr(&addr, path);
  if (r < 0) return r;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  for (int attempt = 0; attempt < 2; attempt++) {
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
      if (listen(fd, backlog) < 0) {
        int e = errno;
        close(fd);
        return -e;
      }
      return fd;
    }
    if (errno != EADDRINUSE || attempt > 0) break;
    // Only a socket may be replaced: a file, directory or link the user named is never removed.
    struct stat st;
    if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
      close(fd);
      // A symbolic link is never followed, to a socket or anywhere else.
      return S_ISLNK(st.st_mode) ? -ELOOP : S_ISDIR(st.st_mode) ? -EISDIR : -ENOTSOCK;
    }
    // Someone listening there is a live server; a refused connect is a stale socket.
    int probe = cvfu_connect_unix(path);
    if (probe >= 0) {
      close(probe);
      close(fd);
      return -EADDRINUSE;
    }
    if (probe != -ECONNREFUSED) break;
    unlink(path);
  }
  int e = errno;
  close(fd);
  return -e;
}

int cvfu_accept(int listener) {
  for (;;) {
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != EINTR) return -errno;
  }
}

int cvfu_wait_readable(int fd, int ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  for (;;) {
    int r = poll(&p, 1, ms);
    if (r >= 0) return r;
    if (errno != EINTR) return -errno;
  }
}

int cvfu_set_send_timeout_ms(int sock, int ms) {
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  return setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0 ? -errno : 0;
}

int64_t cvfu_monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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

// MARK: CRC-32C

// Reflected CRC-32C polynomial; in this representation bit 31 is x^0.
#define CRC32C_POLY 0x82F63B78u

static uint32_t crc32c_table[256];

static void crc32c_table_init(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ CRC32C_POLY : c >> 1;
    crc32c_table[n] = c;
  }
}

// Raw (no pre/post inversion) CRC update, one byte at a time.
static uint32_t crc32c_raw_table(uint32_t c, const uint8_t *p, size_t n) {
  while (n--) c = crc32c_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c;
}

// a * b modulo the polynomial, both reflected.
static uint32_t crc32c_mulmod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = b & 1 ? (b >> 1) ^ CRC32C_POLY : b >> 1;  // b *= x
  }
  return product;
}

// x^bits modulo the polynomial, reflected.
static uint32_t crc32c_shift_factor_bits(size_t bits) {
  uint32_t result = 1u << 31, square = 1u << 30;  // x^0, x^1
  for (size_t e = bits; e != 0; e >>= 1) {
    if (e & 1) result = crc32c_mulmod(result, square);
    square = crc32c_mulmod(square, square);
  }
  return result;
}

// What appending `bytes` zero bytes multiplies a raw CRC by: x^(8 * bytes).
static uint32_t crc32c_shift_factor(size_t bytes) { return crc32c_shift_factor_bits(8 * bytes); }

#if defined(__x86_64__)
#include <immintrin.h>

// Three lanes hide the crc32 instruction's 3-cycle latency.
#define CRC32C_LANE 8192

static uint32_t crc32c_lane_shift;

__attribute__((target("sse4.2"))) static uint32_t crc32c_raw_sse42(uint32_t c, const uint8_t *p,
                                                                    size_t n) {
  while (n >= 3 * CRC32C_LANE) {
    uint64_t a = c, b = 0, d = 0;
    const uint8_t *pb = p + CRC32C_LANE, *pd = p + 2 * CRC32C_LANE;
    for (size_t i = 0; i < CRC32C_LANE; i += 8) {
      uint64_t wa, wb, wd;
      memcpy(&wa, p + i, 8);
      memcpy(&wb, pb + i, 8);
      memcpy(&wd, pd + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      d = _mm_crc32_u64(d, wd);
    }
    // crc(A ++ B ++ D) = (crc(A) * x^8L + crc(B)) * x^8L + crc(D), raw CRCs being linear.
    c = crc32c_mulmod(crc32c_mulmod((uint32_t)a, crc32c_lane_shift) ^ (uint32_t)b,
                      crc32c_lane_shift) ^
        (uint32_t)d;
    p += 3 * CRC32C_LANE;
    n -= 3 * CRC32C_LANE;
  }
  uint64_t w64 = c;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    w64 = _mm_crc32_u64(w64, w);
  }
  c = (uint32_t)w64;
  for (; n > 0; n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

// Folding with carry-less multiplication (AVX-512 VPCLMULQDQ): four 512-bit
// accumulators take 256 bytes a step. A 128-bit block X, whose bit b stands
// for x^(127-b), is X = H*x^64 + L (H its low, L its high 64 bits), so
// X*x^(8D) = H*x^(8D+64) + L*x^(8D) mod P: two carry-less products fold it D
// bytes forward. A product of two reflected 64-bit operands lands one degree
// low, hence the constants x^(8D+63) and x^(8D-1). They are computed at start,
// not copied from tables.
static __m128i crc32c_fold_constants(size_t distance) {
  uint64_t high = (uint64_t)crc32c_shift_factor_bits(8 * distance + 63) << 32;
  uint64_t low = (uint64_t)crc32c_shift_factor_bits(8 * distance - 1) << 32;
  return _mm_set_epi64x((long long)low, (long long)high);
}

static __m128i crc32c_k16, crc32c_k32, crc32c_k48, crc32c_k64, crc32c_k128, crc32c_k192,
    crc32c_k256;
static int crc32c_use_vpclmul;

__attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2"))) static __m512i
crc32c_fold512(__m512i x, __m512i k, __m512i next) {
  __m512i h = _mm512_clmulepi64_epi128(x, k, 0x00);
  __m512i l = _mm512_clmulepi64_epi128(x, k, 0x11);
  return _mm512_ternarylogic_epi64(h, l, next, 0x96);  // h ^ l ^ next
}

__attribute__((target("pclmul,sse4.2"))) static __m128i crc32c_fold128(__m128i x, __m128i k,
                                                                        __m128i next) {
  __m128i h = _mm_clmulepi64_si128(x, k, 0x00);
  __m128i l = _mm_clmulepi64_si128(x, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(h, l), next);
}

// The raw CRC of the first n bytes (a multiple of 256, at least 1024), continuing from c.
__attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2"))) static uint32_t
crc32c_raw_vpclmul(uint32_t c, const uint8_t *p, size_t n) {
  __m512i a0 = _mm512_loadu_si512((const void *)p);
  __m512i a1 = _mm512_loadu_si512((const void *)(p + 64));
  __m512i a2 = _mm512_loadu_si512((const void *)(p + 128));
  __m512i a3 = _mm512_loadu_si512((const void *)(p + 192));
  // The running CRC enters as the message's first 32 bits.
  a0 = _mm512_xor_si512(a0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c)));
  __m512i k256 = _mm512_broadcast_i32x4(crc32c_k256);
  for (size_t i = 256; i < n; i += 256) {
    a0 = crc32c_fold512(a0, k256, _mm512_loadu_si512((const void *)(p + i)));
    a1 = crc32c_fold512(a1, k256, _mm512_loadu_si512((const void *)(p + i + 64)));
    a2 = crc32c_fold512(a2, k256, _mm512_loadu_si512((const void *)(p + i + 128)));
    a3 = crc32c_fold512(a3, k256, _mm512_loadu_si512((const void *)(p + i + 192)));
  }
  // Four accumulators into one: 192, 128 and 64 bytes forward.
  __m512i x = crc32c_fold512(a0, _mm512_broadcast_i32x4(crc32c_k192), a3);
  x = _mm512_xor_si512(x, crc32c_fold512(a1, _mm512_broadcast_i32x4(crc32c_k128),
                                         _mm512_setzero_si512()));
  x = _mm512_xor_si512(x, crc32c_fold512(a2, _mm512_broadcast_i32x4(crc32c_k64),
                                         _mm512_setzero_si512()));
  // Its four 128-bit blocks into one: 48, 32 and 16 bytes forward.
  __m128i r = _mm512_extracti32x4_epi32(x, 3);
  r = crc32c_fold128(_mm512_extracti32x4_epi32(x, 0), crc32c_k48, r);
  r = crc32c_fold128(_mm512_extracti32x4_epi32(x, 1), crc32c_k32, r);
  r = crc32c_fold128(_mm512_extracti32x4_epi32(x, 2), crc32c_k16, r);
  // What is left is congruent to the message: its CRC is the message's.
  uint64_t w[2];
  _mm_storeu_si128((__m128i *)w, r);
  return (uint32_t)_mm_crc32_u64(_mm_crc32_u64(0, w[0]), w[1]);
}
#endif

static int crc32c_use_sse42;

__attribute__((constructor)) static void crc32c_init(void) {
  crc32c_table_init();
#if defined(__x86_64__)
  crc32c_lane_shift = crc32c_shift_factor(CRC32C_LANE);
  __builtin_cpu_init();
  crc32c_use_sse42 = __builtin_cpu_supports("sse4.2");
  crc32c_use_vpclmul = crc32c_use_sse42 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul");
  if (crc32c_use_vpclmul) {
    crc32c_k16 = crc32c_fold_constants(16);
    crc32c_k32 = crc32c_fold_constants(32);
    crc32c_k48 = crc32c_fold_constants(48);
    crc32c_k64 = crc32c_fold_constants(64);
    crc32c_k128 = crc32c_fold_constants(128);
    crc32c_k192 = crc32c_fold_constants(192);
    crc32c_k256 = crc32c_fold_constants(256);
  }
#endif
}

uint32_t cvfu_crc32c(uint32_t crc, const void *data, size_t len) {
  uint32_t c = ~crc;
  const uint8_t *p = data;
#if defined(__x86_64__)
  if (crc32c_use_vpclmul && len >= 1024) {
    size_t head = len & ~(size_t)255;
    c = crc32c_raw_vpclmul(c, p, head);
    p += head;
    len -= head;
  }
  if (crc32c_use_sse42) return ~crc32c_raw_sse42(c, p, len);
#endif
  return ~crc32c_raw_table(c, p, len);
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

int cvfu_relay_pipe(int fds[2]) {
  if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
  (void)fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);  // else the default 64 KiB: more calls, same bytes
  return 0;
}

int cvfu_splice_exact(
    int from, int to, const int pipe_fds[2], size_t count, int *side, size_t *moved,
    size_t *taken) {
  *moved = 0;
  *taken = 0;
  while (count > 0) {
    ssize_t in = splice(from, NULL, pipe_fds[1], NULL, count, SPLICE_F_MOVE);
    if (in < 0 && errno == EINTR) continue;
    if (in <= 0) {
      *side = 0;
      return in == 0 ? -ECONNRESET : -errno;
    }
    count -= (size_t)in;
    *taken += (size_t)in;
    while (in > 0) {
      ssize_t out = splice(pipe_fds[0], NULL, to, NULL, (size_t)in, SPLICE_F_MOVE);
      if (out < 0 && errno == EINTR) continue;
      if (out <= 0) {
        *side = 1;
        return out == 0 ? -EPIPE : -errno;
      }
      in -= out;
      *moved += (size_t)out;
    }
  }
  return 0;
}
