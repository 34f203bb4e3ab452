// Unix stream sockets: SCM_RIGHTS descriptors both ways, listening, connecting and
// accepting, socket options, and splice(2) relays from one socket to another.
#ifndef CVFU_SOCKET_H
#define CVFU_SOCKET_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

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
/// cvfu_recvmsg, except that with `wakeable` set an interrupted wait
/// returns -EINTR instead of waiting again (`cvfu_wake`).
ssize_t cvfu_recvmsg_wakeable(int sock, void *buf, size_t len, int *fds, int maxfds,
                              int *nfds, int flags, int wakeable);

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
/// cvfu_accept, except that with `wakeable` set an interrupted wait returns
/// -EINTR instead of waiting again (`cvfu_wake`).
int cvfu_accept_wakeable(int listener, int wakeable);
/// Waits up to `ms` for `fd` to become readable: 1 ready, 0 timeout, -errno.
int cvfu_wait_readable(int fd, int ms);
/// Sets SO_SNDTIMEO: a send that makes no progress for `ms` fails with EAGAIN (0: never).
int cvfu_set_send_timeout_ms(int sock, int ms);

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

#endif
