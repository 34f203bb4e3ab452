// The floor of `xe-vfio-user bench`'s idle RSS figure: a Swift program built
// like xe-vfio-user (same toolchain, same static standard library, same
// linking) that only listens on a Unix socket, the way `serve` waits for its
// first client. What `serve` costs above it is the server's own doing.
import CVFIOUser

#if canImport(Glibc)
  import Glibc
#endif

guard CommandLine.arguments.count == 2 else {
  print("usage: xe-vfio-user-idle-floor SOCKET-PATH (listens until a signal ends it)")
  exit(2)
}
let path = CommandLine.arguments[1]
let fd = cvfu_listen_unix(path, 8)
guard fd >= 0 else {
  print("cannot listen on \(path): errno \(-fd)")
  exit(1)
}
while true { pause() }
