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

#include <stddef.h>

// The layout numbers cvfu_kernel.h gives Swift, checked against the headers.
#define CVFU_SIZE(type, value) _Static_assert(sizeof(type) == (value), #type " size")
#define CVFU_AT(type, field, value) \
  _Static_assert(offsetof(type, field) == (value), #type "." #field " offset")
#define CVFU_ARGSZ_FLAGS(type)                      \
  CVFU_AT(type, argsz, CVFU_ARGSZ_OFFSET);          \
  CVFU_AT(type, flags, CVFU_FLAGS_OFFSET)

CVFU_SIZE(struct vfio_group_status, CVFU_GROUP_STATUS_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_group_status);

// 6.1's headers end at cap_offset (20 bytes); newer ones add the pad to the 24 Swift asks for.
_Static_assert(sizeof(struct vfio_device_info) == CVFU_DEVICE_INFO_SIZE ||
                   sizeof(struct vfio_device_info) == CVFU_DEVICE_INFO_SIZE - 4,
               "struct vfio_device_info size");
CVFU_ARGSZ_FLAGS(struct vfio_device_info);
CVFU_AT(struct vfio_device_info, num_regions, CVFU_DEVICE_INFO_NUM_REGIONS_OFFSET);
CVFU_AT(struct vfio_device_info, num_irqs, CVFU_DEVICE_INFO_NUM_IRQS_OFFSET);

CVFU_SIZE(struct vfio_region_info, CVFU_REGION_INFO_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_region_info);
CVFU_AT(struct vfio_region_info, index, CVFU_REGION_INFO_INDEX_OFFSET);
CVFU_AT(struct vfio_region_info, cap_offset, CVFU_REGION_INFO_CAP_OFFSET_OFFSET);
CVFU_AT(struct vfio_region_info, size, CVFU_REGION_INFO_SIZE_OFFSET);
CVFU_AT(struct vfio_region_info, offset, CVFU_REGION_INFO_OFFSET_OFFSET);

CVFU_SIZE(struct vfio_info_cap_header, CVFU_CAP_HEADER_SIZE);
CVFU_AT(struct vfio_info_cap_header, id, CVFU_CAP_HEADER_ID_OFFSET);
CVFU_AT(struct vfio_info_cap_header, next, CVFU_CAP_HEADER_NEXT_OFFSET);

CVFU_AT(struct vfio_region_info_cap_sparse_mmap, nr_areas, CVFU_SPARSE_MMAP_NR_AREAS_OFFSET);
CVFU_AT(struct vfio_region_info_cap_sparse_mmap, areas, CVFU_SPARSE_MMAP_AREAS_OFFSET);
CVFU_SIZE(struct vfio_region_sparse_mmap_area, CVFU_SPARSE_MMAP_AREA_SIZE);
CVFU_AT(struct vfio_region_sparse_mmap_area, offset, CVFU_SPARSE_MMAP_AREA_OFFSET_OFFSET);
CVFU_AT(struct vfio_region_sparse_mmap_area, size, CVFU_SPARSE_MMAP_AREA_SIZE_OFFSET);

CVFU_SIZE(struct vfio_region_info_cap_type, CVFU_CAP_TYPE_SIZE);
CVFU_AT(struct vfio_region_info_cap_type, type, CVFU_CAP_TYPE_TYPE_OFFSET);
CVFU_AT(struct vfio_region_info_cap_type, subtype, CVFU_CAP_TYPE_SUBTYPE_OFFSET);

CVFU_SIZE(struct vfio_irq_info, CVFU_IRQ_INFO_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_irq_info);
CVFU_AT(struct vfio_irq_info, index, CVFU_IRQ_INFO_INDEX_OFFSET);
CVFU_AT(struct vfio_irq_info, count, CVFU_IRQ_INFO_COUNT_OFFSET);

CVFU_SIZE(struct vfio_irq_set, CVFU_IRQ_SET_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_irq_set);
CVFU_AT(struct vfio_irq_set, index, CVFU_IRQ_SET_INDEX_OFFSET);
CVFU_AT(struct vfio_irq_set, start, CVFU_IRQ_SET_START_OFFSET);
CVFU_AT(struct vfio_irq_set, count, CVFU_IRQ_SET_COUNT_OFFSET);
CVFU_AT(struct vfio_irq_set, data, CVFU_IRQ_SET_DATA_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_info, CVFU_IOMMU_INFO_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_iommu_type1_info);
CVFU_AT(struct vfio_iommu_type1_info, iova_pgsizes, CVFU_IOMMU_INFO_PGSIZES_OFFSET);
CVFU_AT(struct vfio_iommu_type1_info, cap_offset, CVFU_IOMMU_INFO_CAP_OFFSET_OFFSET);

CVFU_AT(struct vfio_iommu_type1_info_cap_iova_range, nr_iovas, CVFU_IOVA_RANGE_CAP_NR_IOVAS_OFFSET);
CVFU_AT(struct vfio_iommu_type1_info_cap_iova_range, iova_ranges, CVFU_IOVA_RANGE_CAP_RANGES_OFFSET);
CVFU_SIZE(struct vfio_iova_range, CVFU_IOVA_RANGE_SIZE);
CVFU_AT(struct vfio_iova_range, start, CVFU_IOVA_RANGE_START_OFFSET);
CVFU_AT(struct vfio_iova_range, end, CVFU_IOVA_RANGE_END_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_info_dma_avail, CVFU_DMA_AVAIL_CAP_SIZE);
CVFU_AT(struct vfio_iommu_type1_info_dma_avail, avail, CVFU_DMA_AVAIL_CAP_AVAIL_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_info_cap_migration, CVFU_MIGRATION_CAP_SIZE);
CVFU_AT(struct vfio_iommu_type1_info_cap_migration, pgsize_bitmap,
        CVFU_MIGRATION_CAP_PGSIZE_BITMAP_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_dma_map, CVFU_DMA_MAP_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_iommu_type1_dma_map);
CVFU_AT(struct vfio_iommu_type1_dma_map, vaddr, CVFU_DMA_MAP_VADDR_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dma_map, iova, CVFU_DMA_MAP_IOVA_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dma_map, size, CVFU_DMA_MAP_SIZE_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_dma_unmap, CVFU_DMA_UNMAP_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_iommu_type1_dma_unmap);
CVFU_AT(struct vfio_iommu_type1_dma_unmap, iova, CVFU_DMA_UNMAP_IOVA_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dma_unmap, size, CVFU_DMA_UNMAP_SIZE_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dma_unmap, data, CVFU_DMA_UNMAP_SIZE);

CVFU_SIZE(struct vfio_bitmap, CVFU_BITMAP_SIZE);
CVFU_AT(struct vfio_bitmap, pgsize, CVFU_BITMAP_PGSIZE_OFFSET);
CVFU_AT(struct vfio_bitmap, size, CVFU_BITMAP_SIZE_OFFSET);
CVFU_AT(struct vfio_bitmap, data, CVFU_BITMAP_DATA_OFFSET);

CVFU_SIZE(struct vfio_iommu_type1_dirty_bitmap, CVFU_DIRTY_BITMAP_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_iommu_type1_dirty_bitmap);
CVFU_AT(struct vfio_iommu_type1_dirty_bitmap, data, CVFU_DIRTY_BITMAP_SIZE);
CVFU_SIZE(struct vfio_iommu_type1_dirty_bitmap_get, CVFU_DIRTY_BITMAP_GET_SIZE);
CVFU_AT(struct vfio_iommu_type1_dirty_bitmap_get, iova, CVFU_DIRTY_BITMAP_GET_IOVA_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dirty_bitmap_get, size, CVFU_DIRTY_BITMAP_GET_SIZE_OFFSET);
CVFU_AT(struct vfio_iommu_type1_dirty_bitmap_get, bitmap, CVFU_DIRTY_BITMAP_GET_BITMAP_OFFSET);

CVFU_SIZE(struct vfio_device_feature, CVFU_DEVICE_FEATURE_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_device_feature);
CVFU_AT(struct vfio_device_feature, data, CVFU_DEVICE_FEATURE_DATA_OFFSET);
CVFU_SIZE(struct vfio_device_feature_migration, CVFU_FEATURE_MIGRATION_SIZE);
CVFU_SIZE(struct vfio_device_feature_mig_state, CVFU_FEATURE_MIG_STATE_SIZE);
CVFU_AT(struct vfio_device_feature_mig_state, device_state,
        CVFU_FEATURE_MIG_STATE_DEVICE_STATE_OFFSET);
CVFU_AT(struct vfio_device_feature_mig_state, data_fd, CVFU_FEATURE_MIG_STATE_DATA_FD_OFFSET);
#ifdef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
CVFU_SIZE(struct vfio_device_feature_mig_data_size, CVFU_FEATURE_MIG_DATA_SIZE_SIZE);
#endif

#ifdef VFIO_DEVICE_BIND_IOMMUFD
CVFU_SIZE(struct vfio_device_bind_iommufd, CVFU_BIND_IOMMUFD_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_device_bind_iommufd);
CVFU_AT(struct vfio_device_bind_iommufd, iommufd, CVFU_BIND_IOMMUFD_IOMMUFD_OFFSET);
CVFU_SIZE(struct vfio_device_attach_iommufd_pt, CVFU_ATTACH_IOMMUFD_PT_SIZE);
CVFU_ARGSZ_FLAGS(struct vfio_device_attach_iommufd_pt);
CVFU_AT(struct vfio_device_attach_iommufd_pt, pt_id, CVFU_ATTACH_IOMMUFD_PT_PT_ID_OFFSET);
#endif

#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
CVFU_SIZE(struct iommu_ioas_alloc, CVFU_IOAS_ALLOC_SIZE);
CVFU_AT(struct iommu_ioas_alloc, size, CVFU_ARGSZ_OFFSET);
CVFU_AT(struct iommu_ioas_alloc, out_ioas_id, CVFU_IOAS_ALLOC_OUT_IOAS_ID_OFFSET);
CVFU_SIZE(struct iommu_ioas_iova_ranges, CVFU_IOAS_IOVA_RANGES_SIZE);
CVFU_AT(struct iommu_ioas_iova_ranges, size, CVFU_ARGSZ_OFFSET);
CVFU_AT(struct iommu_ioas_iova_ranges, ioas_id, CVFU_IOAS_IOVA_RANGES_IOAS_ID_OFFSET);
CVFU_AT(struct iommu_ioas_iova_ranges, num_iovas, CVFU_IOAS_IOVA_RANGES_NUM_IOVAS_OFFSET);
CVFU_AT(struct iommu_ioas_iova_ranges, allowed_iovas, CVFU_IOAS_IOVA_RANGES_ALLOWED_IOVAS_OFFSET);
CVFU_AT(struct iommu_ioas_iova_ranges, out_iova_alignment,
        CVFU_IOAS_IOVA_RANGES_OUT_IOVA_ALIGNMENT_OFFSET);
CVFU_SIZE(struct iommu_ioas_map, CVFU_IOAS_MAP_SIZE);
CVFU_AT(struct iommu_ioas_map, size, CVFU_ARGSZ_OFFSET);
CVFU_AT(struct iommu_ioas_map, flags, CVFU_FLAGS_OFFSET);
CVFU_AT(struct iommu_ioas_map, ioas_id, CVFU_IOAS_MAP_IOAS_ID_OFFSET);
CVFU_AT(struct iommu_ioas_map, user_va, CVFU_IOAS_MAP_USER_VA_OFFSET);
CVFU_AT(struct iommu_ioas_map, length, CVFU_IOAS_MAP_LENGTH_OFFSET);
CVFU_AT(struct iommu_ioas_map, iova, CVFU_IOAS_MAP_IOVA_OFFSET);
CVFU_SIZE(struct iommu_ioas_unmap, CVFU_IOAS_UNMAP_SIZE);
CVFU_AT(struct iommu_ioas_unmap, size, CVFU_ARGSZ_OFFSET);
CVFU_AT(struct iommu_ioas_unmap, ioas_id, CVFU_IOAS_UNMAP_IOAS_ID_OFFSET);
CVFU_AT(struct iommu_ioas_unmap, iova, CVFU_IOAS_UNMAP_IOVA_OFFSET);
CVFU_AT(struct iommu_ioas_unmap, length, CVFU_IOAS_UNMAP_LENGTH_OFFSET);
#endif

// Each field a distinct value, so a codec reading the wrong offset is seen.
#define CVFU_SAMPLE(type, ...)                           \
  do {                                                   \
    type s = __VA_ARGS__;                                \
    if (capacity < (int)sizeof s) return -1;             \
    memcpy(out, &s, sizeof s);                           \
    return (int)sizeof s;                                \
  } while (0)

int cvfu_layout_sample(int which, void *out, int capacity) {
  switch (which) {
  case CVFU_SAMPLE_DEVICE_INFO:
    CVFU_SAMPLE(struct vfio_device_info,
                {.argsz = 24, .flags = 0x83, .num_regions = 9, .num_irqs = 5});
  case CVFU_SAMPLE_REGION_INFO:
    CVFU_SAMPLE(struct vfio_region_info,
                {.argsz = 32, .flags = 0x7, .index = 2, .cap_offset = 0,
                 .size = 0x1122334455667788ull, .offset = 0x20000000000ull});
  case CVFU_SAMPLE_IRQ_INFO:
    CVFU_SAMPLE(struct vfio_irq_info, {.argsz = 16, .flags = 0x9, .index = 2, .count = 64});
  case CVFU_SAMPLE_IRQ_SET:
    CVFU_SAMPLE(struct vfio_irq_set,
                {.argsz = 20, .flags = 0x21, .index = 2, .start = 3, .count = 0});
  case CVFU_SAMPLE_DMA_MAP:
    CVFU_SAMPLE(struct vfio_iommu_type1_dma_map,
                {.argsz = 32, .flags = 0x3, .vaddr = 0x7f0011223000ull, .iova = 0xfee00000ull,
                 .size = 0x200000ull});
  case CVFU_SAMPLE_DMA_UNMAP:
    CVFU_SAMPLE(struct vfio_iommu_type1_dma_unmap,
                {.argsz = 24, .flags = 0, .iova = 0xfee00000ull, .size = 0x200000ull});
  case CVFU_SAMPLE_IOMMU_INFO:
    CVFU_SAMPLE(struct vfio_iommu_type1_info,
                {.argsz = 24, .flags = 0x1, .iova_pgsizes = 0x40201000ull, .cap_offset = 0});
  case CVFU_SAMPLE_MIG_STATE:
    CVFU_SAMPLE(struct vfio_device_feature_mig_state, {.device_state = 2, .data_fd = -1});
  case CVFU_SAMPLE_DIRTY_BITMAP_GET:
    CVFU_SAMPLE(struct vfio_iommu_type1_dirty_bitmap_get,
                {.iova = 0x100000ull, .size = 0x400000ull,
                 .bitmap = {.pgsize = 4096, .size = 128, .data = 0}});
  default: return -1;
  }
}

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
