// CRC-32C (Castagnoli), the checkpoint file's checksum: a table, SSE4.2's crc32
// instruction on three lanes, or AVX-512 VPCLMULQDQ folding, chosen at start.
#include "cvfu_crc32c.h"

#include <string.h>

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
