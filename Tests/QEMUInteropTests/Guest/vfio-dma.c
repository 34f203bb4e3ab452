/*
 * Runs inside the vIOMMU guest of VIOMMUGuestTests. It drives the simulated
 * Xe VF's copy engine through the guest kernel's vfio-pci and a type1v2
 * container, so every DMA address is an IOVA that the guest's intel-iommu
 * translates, and QEMU turns each guest IOMMU map and unmap into
 * DMA_MAP/DMA_UNMAP for the server. It prints "XEVF: key value..." lines,
 * which the test parses, and exits non-zero on the first failure.
 *
 * Built on the host by the test: gcc -static -O2 -Wall -Wextra -Werror.
 * Usage: vfio-dma 0000:00:04.0
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* BAR0 registers of the simulated VF (Sources/XeVF/Registers.swift). */
#define SCRATCH 0x190240u /* VF_SW_FLAG(0): read/write, cleared by FLR */
#define DMA_BASE 0x3F0000u
#define DMA_SRC (DMA_BASE + 0x00)
#define DMA_DST (DMA_BASE + 0x08)
#define DMA_LEN (DMA_BASE + 0x10)
#define DMA_CTRL (DMA_BASE + 0x14)
#define DMA_DOORBELL (DMA_BASE + 0x18)
#define DMA_STATUS (DMA_BASE + 0x1C)
#define CTRL_TO_DEVICE 1u
#define STATUS_BUSY 1u
#define STATUS_DONE 2u
#define STATUS_ERROR 4u

/* The buffers' IOVAs: outside guest RAM, so only the guest IOMMU can make them valid. */
#define IOVA 0x100000000ull
#define SIZE (2u << 20)

static int container = -1, device = -1;
static uint64_t bar0;

static void fail(const char *what) {
  printf("XEVF: error %s %d %s\n", what, errno, strerror(errno));
  exit(1);
}

static uint64_t region(uint32_t index, uint64_t *size, uint32_t *flags) {
  struct vfio_region_info info = {.argsz = sizeof(info), .index = index};
  if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &info))
    fail("VFIO_DEVICE_GET_REGION_INFO");
  if (size)
    *size = info.size;
  if (flags)
    *flags = info.flags;
  return info.offset;
}

static uint32_t rd32(uint32_t reg) {
  uint32_t v;
  if (pread(device, &v, 4, bar0 + reg) != 4)
    fail("BAR0 read");
  return v;
}

static void wr32(uint32_t reg, uint32_t v) {
  if (pwrite(device, &v, 4, bar0 + reg) != 4)
    fail("BAR0 write");
}

static void wr64(uint32_t reg, uint64_t v) {
  wr32(reg, (uint32_t)v);
  wr32(reg + 4, (uint32_t)(v >> 32));
}

/* One copy-engine transfer; returns the final STATUS (then cleared). */
static uint32_t copy(int to_device, uint64_t vram, uint64_t iova, uint32_t length) {
  wr64(DMA_SRC, to_device ? iova : vram);
  wr64(DMA_DST, to_device ? vram : iova);
  wr32(DMA_LEN, length);
  wr32(DMA_CTRL, to_device ? CTRL_TO_DEVICE : 0);
  wr32(DMA_DOORBELL, 1);
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    uint32_t status = rd32(DMA_STATUS);
    if (!(status & STATUS_BUSY) && (status & (STATUS_DONE | STATUS_ERROR))) {
      wr32(DMA_STATUS, STATUS_DONE | STATUS_ERROR);
      return status;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec - start.tv_sec > 20) {
      printf("XEVF: error copy-timeout status 0x%x\n", status);
      exit(1);
    }
    usleep(500);
  }
}

static void fill(uint8_t *p, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i += 4) {
    uint32_t v = (uint32_t)(i / 4) * 2654435761u ^ seed;
    memcpy(p + i, &v, 4);
  }
}

static int all(const uint8_t *p, size_t n, uint8_t value) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != value)
      return 0;
  return 1;
}

/* AnonHugePages of the mapping holding `p`, from /proc/self/smaps (-1 if not found). */
static long anon_huge_kb(const void *p) {
  FILE *f = fopen("/proc/self/smaps", "r");
  if (!f)
    return -1;
  char line[512];
  int inside = 0;
  long kb = -1;
  while (fgets(line, sizeof(line), f)) {
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx ", &start, &end) == 2) /* a mapping's first line */
      inside = (uintptr_t)p >= start && (uintptr_t)p < end;
    else if (inside && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
      break;
  }
  fclose(f);
  return kb;
}

static void map(void *buffer, uint64_t iova) {
  struct vfio_iommu_type1_dma_map m = {
      .argsz = sizeof(m),
      .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
      .vaddr = (uintptr_t)buffer,
      .iova = iova,
      .size = SIZE,
  };
  if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m))
    fail("VFIO_IOMMU_MAP_DMA");
}

static uint64_t unmap(uint64_t iova) {
  struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof(u), .iova = iova, .size = SIZE};
  if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u))
    fail("VFIO_IOMMU_UNMAP_DMA");
  return u.size; /* the bytes the kernel unmapped */
}

/*
 * Copies VRAM -> buffer and buffer -> VRAM (at 2 MiB) through `iova` while it
 * is mapped, then checks that after VFIO_IOMMU_UNMAP_DMA the same transfers
 * fail with EFAULT and nothing lands on either side.
 */
static void exercise(const char *name, uint8_t *vram, uint8_t *buffer, uint64_t iova) {
  memset(buffer, 0, SIZE);
  fill(vram, SIZE, 0xa5a50001 ^ (uint32_t)iova);
  map(buffer, iova);
  printf("XEVF: map %s iova 0x%llx size %u\n", name, (unsigned long long)iova, SIZE);
  uint32_t st = copy(0, 0, iova, SIZE);
  printf("XEVF: dma-mapped %s status 0x%x match %d\n", name, st, memcmp(buffer, vram, SIZE) == 0);
  fill(buffer, SIZE, 0x3c3c0002 ^ (uint32_t)iova);
  st = copy(1, SIZE, iova, SIZE);
  printf("XEVF: dma-to-device %s status 0x%x match %d\n", name, st,
         memcmp(vram + SIZE, buffer, SIZE) == 0);

  printf("XEVF: unmap %s size %llu\n", name, (unsigned long long)unmap(iova));
  memset(buffer, 0x5a, SIZE);
  fill(vram, SIZE, 0x0f0f0003);
  st = copy(0, 0, iova, SIZE);
  printf("XEVF: dma-unmapped %s status 0x%x errno %u untouched %d\n", name, st & 0xffff, st >> 16,
         all(buffer, SIZE, 0x5a));
  memset(vram + SIZE, 0xee, SIZE);
  st = copy(1, SIZE, iova, SIZE);
  printf("XEVF: dma-to-device-unmapped %s status 0x%x errno %u untouched %d\n", name, st & 0xffff,
         st >> 16, all(vram + SIZE, SIZE, 0xee));
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc != 2) {
    fprintf(stderr, "usage: %s PCI-ADDRESS\n", argv[0]);
    return 2;
  }
  const char *address = argv[1];
  char path[512], link[256];
  snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", address);
  ssize_t n = readlink(path, link, sizeof(link) - 1);
  if (n < 0)
    fail("no IOMMU group");
  link[n] = 0;
  const char *group_name = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;

  container = open("/dev/vfio/vfio", O_RDWR);
  if (container < 0)
    fail("open /dev/vfio/vfio");
  if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
    fail("VFIO API version");
  if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1)
    fail("no type1v2 IOMMU");
  snprintf(path, sizeof(path), "/dev/vfio/%s", group_name);
  int group = open(path, O_RDWR);
  if (group < 0)
    fail("open group");
  struct vfio_group_status status = {.argsz = sizeof(status)};
  if (ioctl(group, VFIO_GROUP_GET_STATUS, &status))
    fail("VFIO_GROUP_GET_STATUS");
  if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
    errno = EBUSY;
    fail("group not viable");
  }
  if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
    fail("VFIO_GROUP_SET_CONTAINER");
  if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
    fail("VFIO_SET_IOMMU");
  device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, address);
  if (device < 0)
    fail("VFIO_GROUP_GET_DEVICE_FD");
  printf("XEVF: vfio-open group %s\n", group_name);

  /* Config space: IDs, then memory decoding and bus mastering (vfio leaves BME to us). */
  uint64_t config = region(VFIO_PCI_CONFIG_REGION_INDEX, NULL, NULL);
  uint32_t ids;
  if (pread(device, &ids, 4, config) != 4)
    fail("config read");
  printf("XEVF: vfio-config %08x\n", ids);
  uint16_t command;
  if (pread(device, &command, 2, config + PCI_COMMAND) != 2)
    fail("config read");
  command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
  if (pwrite(device, &command, 2, config + PCI_COMMAND) != 2)
    fail("config write");

  bar0 = region(VFIO_PCI_BAR0_REGION_INDEX, NULL, NULL);
  wr32(SCRATCH, 0x5ca1ab1e);
  printf("XEVF: vfio-scratch 0x%08x\n", rd32(SCRATCH));

  /* The first 4 MiB of VRAM, through the BAR2 mmap. */
  uint64_t bar2_size;
  uint32_t bar2_flags;
  uint64_t bar2 = region(VFIO_PCI_BAR2_REGION_INDEX, &bar2_size, &bar2_flags);
  if (!(bar2_flags & VFIO_REGION_INFO_FLAG_MMAP) || bar2_size < 2 * SIZE) {
    errno = ENOTSUP;
    fail("BAR2 not mappable");
  }
  uint8_t *vram = mmap(NULL, 2 * SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, device, (off_t)bar2);
  if (vram == MAP_FAILED)
    fail("mmap BAR2");
  /*
   * Two buffers. "pages": 4 KiB pages, so the guest IOMMU maps and unmaps page
   * by page and QEMU sends a DMA_MAP and a DMA_UNMAP per page. "huge": one
   * transparent huge page; booted with intel_iommu=sp_off, the guest maps it
   * as 512 PTEs in one page table (512 windows on the server) and its unmap
   * frees that table, so QEMU unmaps all 512 windows with one 2 MiB range.
   */
  uint8_t *pages = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint8_t *area = mmap(NULL, 2 * SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pages == MAP_FAILED || area == MAP_FAILED)
    fail("mmap buffer");
  if (madvise(pages, SIZE, MADV_NOHUGEPAGE))
    fail("madvise");
  uint8_t *huge = (uint8_t *)(((uintptr_t)area + SIZE - 1) & ~(uintptr_t)(SIZE - 1));
  if (madvise(huge, SIZE, MADV_HUGEPAGE))
    fail("madvise");
  memset(huge, 0, SIZE);
  printf("XEVF: huge-page %ld kB\n", anon_huge_kb(huge));

  exercise("pages", vram, pages, IOVA);
  exercise("huge", vram, huge, IOVA + SIZE);

  /* Mapped again at the same IOVA: the bytes land again. */
  map(pages, IOVA);
  fill(vram, SIZE, 0x77770004);
  uint32_t st = copy(0, 0, IOVA, SIZE);
  printf("XEVF: dma-remapped pages status 0x%x match %d\n", st, memcmp(pages, vram, SIZE) == 0);
  unmap(IOVA);

  if (ioctl(device, VFIO_DEVICE_RESET))
    fail("VFIO_DEVICE_RESET");
  printf("XEVF: vfio-reset scratch 0x%08x\n", rd32(SCRATCH));
  munmap(vram, 2 * SIZE);
  munmap(pages, SIZE);
  munmap(area, 2 * SIZE);
  close(device);
  close(group);
  close(container);
  printf("XEVF: vfio-done\n");
  return 0;
}
