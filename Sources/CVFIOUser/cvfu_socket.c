// Unix stream sockets: SCM_RIGHTS descriptors both ways, listening, connecting and
// accepting, socket options, and splice(2) relays from one socket to another.
#define _GNU_SOURCE
#include "cvfu_socket.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

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
  return cvfu_recvmsg_wakeable(sock, buf, len, fds, maxfds, nfds, flags, 0);
}

ssize_t cvfu_recvmsg_wakeable(int sock, void *buf, size_t len, int *fds, int maxfds,
                              int *nfds, int flags, int wakeable) {
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
    if (errno != EINTR || wakeable) return -errno;
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

int cvfu_accept(int listener) { return cvfu_accept_wakeable(listener, 0); }

int cvfu_accept_wakeable(int listener, int wakeable) {
  for (;;) {
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != EINTR || wakeable) return -errno;
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
