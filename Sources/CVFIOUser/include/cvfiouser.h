// C shim for what Swift cannot express directly, one file per concern (the way
// libvfio-user keeps its socket transport apart from its DMA code): sockets and
// descriptor passing, files as memory, the kernel's ioctl and eventfd interfaces,
// CRC-32C, and POSIX threads and processes.
#ifndef CVFIOUSER_H
#define CVFIOUSER_H

#include "cvfu_crc32c.h"
#include "cvfu_kernel.h"
#include "cvfu_memory.h"
#include "cvfu_posix.h"
#include "cvfu_socket.h"

#endif
