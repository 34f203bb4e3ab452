// CRC-32C (Castagnoli), the checkpoint file's checksum.
#ifndef CVFU_CRC32C_H
#define CVFU_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/// CRC-32C (Castagnoli) of `len` bytes continuing from `crc` (0 to start):
/// crc32c(b, crc32c(a, 0)) == crc32c(a ++ b, 0). Uses SSE4.2's crc32
/// instruction on three interleaved lanes where the CPU has it (the save
/// file's checksum must not slow a multi-GiB save), a table otherwise.
uint32_t cvfu_crc32c(uint32_t crc, const void *data, size_t len);

#endif
