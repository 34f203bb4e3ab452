// The kernel's interfaces Swift cannot call directly: variadic ioctl and the
// linux/vfio.h definitions the kernel backend uses, eventfds, and what kind of
// file a descriptor a client sent is.
#ifndef CVFU_KERNEL_H
#define CVFU_KERNEL_H

#include <stdint.h>
#include <linux/vfio.h>

int cvfu_ioctl(int fd, unsigned long request, void *arg);
int cvfu_eventfd(unsigned int initval, int flags);
int cvfu_eventfd_signal(int fd);
/// Reads and clears an eventfd counter without blocking; -errno (EAGAIN) if 0.
int64_t cvfu_eventfd_drain(int fd);

/// What kind of file a descriptor a client sent is, checked before use.
enum cvfu_fd_kind {
  CVFU_FD_OTHER = 0,    // an anonymous inode other than an eventfd, or anything unknown
  CVFU_FD_REGULAR = 1,  // a regular file: memfd, tmpfs, hugetlbfs, /dev/shm, disk (mappable memory)
  CVFU_FD_EVENTFD = 2,
  CVFU_FD_SOCKET = 3,
  CVFU_FD_PIPE = 4,
  CVFU_FD_DIRECTORY = 5,
  CVFU_FD_DEVICE = 6,   // a character or block device
};
/// The kind of `fd` (fstat, and /proc/self/fd/N for anonymous inodes, which
/// have no file type); its size in `*size` for a regular file. -errno (EBADF).
int cvfu_fd_kind(int fd, int64_t *size);

/// The layouts of the linux/vfio.h and linux/iommufd.h structures KernelVFIO
/// encodes, as numbers Swift reads: its codecs use these, and cvfu_kernel.c
/// checks each against offsetof and sizeof wherever the build host's headers
/// define the structure (Debian 12's 6.1 headers predate iommufd and
/// MIG_DATA_SIZE, so those are checked on newer hosts only).
enum {  // anonymous, so that Swift sees Int constants
  // Every argsz-led structure: argsz u32 @0, flags u32 @4.
  CVFU_ARGSZ_OFFSET = 0,
  CVFU_FLAGS_OFFSET = 4,
  // struct vfio_group_status
  CVFU_GROUP_STATUS_SIZE = 8,
  // struct vfio_device_info
  CVFU_DEVICE_INFO_SIZE = 24,
  CVFU_DEVICE_INFO_NUM_REGIONS_OFFSET = 8,
  CVFU_DEVICE_INFO_NUM_IRQS_OFFSET = 12,
  // struct vfio_region_info
  CVFU_REGION_INFO_SIZE = 32,
  CVFU_REGION_INFO_INDEX_OFFSET = 8,
  CVFU_REGION_INFO_CAP_OFFSET_OFFSET = 12,
  CVFU_REGION_INFO_SIZE_OFFSET = 16,
  CVFU_REGION_INFO_OFFSET_OFFSET = 24,
  // struct vfio_info_cap_header
  CVFU_CAP_HEADER_SIZE = 8,
  CVFU_CAP_HEADER_ID_OFFSET = 0,
  CVFU_CAP_HEADER_NEXT_OFFSET = 4,
  // struct vfio_region_info_cap_sparse_mmap and its vfio_region_sparse_mmap_area
  CVFU_SPARSE_MMAP_NR_AREAS_OFFSET = 8,
  CVFU_SPARSE_MMAP_AREAS_OFFSET = 16,
  CVFU_SPARSE_MMAP_AREA_SIZE = 16,
  CVFU_SPARSE_MMAP_AREA_OFFSET_OFFSET = 0,
  CVFU_SPARSE_MMAP_AREA_SIZE_OFFSET = 8,
  // struct vfio_region_info_cap_type
  CVFU_CAP_TYPE_SIZE = 16,
  CVFU_CAP_TYPE_TYPE_OFFSET = 8,
  CVFU_CAP_TYPE_SUBTYPE_OFFSET = 12,
  // struct vfio_irq_info
  CVFU_IRQ_INFO_SIZE = 16,
  CVFU_IRQ_INFO_INDEX_OFFSET = 8,
  CVFU_IRQ_INFO_COUNT_OFFSET = 12,
  // struct vfio_irq_set
  CVFU_IRQ_SET_SIZE = 20,
  CVFU_IRQ_SET_INDEX_OFFSET = 8,
  CVFU_IRQ_SET_START_OFFSET = 12,
  CVFU_IRQ_SET_COUNT_OFFSET = 16,
  CVFU_IRQ_SET_DATA_OFFSET = 20,
  // struct vfio_iommu_type1_info
  CVFU_IOMMU_INFO_SIZE = 24,
  CVFU_IOMMU_INFO_PGSIZES_OFFSET = 8,
  CVFU_IOMMU_INFO_CAP_OFFSET_OFFSET = 16,
  // struct vfio_iommu_type1_info_cap_iova_range and its vfio_iova_range
  CVFU_IOVA_RANGE_CAP_NR_IOVAS_OFFSET = 8,
  CVFU_IOVA_RANGE_CAP_RANGES_OFFSET = 16,
  CVFU_IOVA_RANGE_SIZE = 16,
  CVFU_IOVA_RANGE_START_OFFSET = 0,
  CVFU_IOVA_RANGE_END_OFFSET = 8,
  // struct vfio_iommu_type1_info_dma_avail
  CVFU_DMA_AVAIL_CAP_SIZE = 12,
  CVFU_DMA_AVAIL_CAP_AVAIL_OFFSET = 8,
  // struct vfio_iommu_type1_info_cap_migration
  CVFU_MIGRATION_CAP_SIZE = 32,
  CVFU_MIGRATION_CAP_PGSIZE_BITMAP_OFFSET = 16,
  // struct vfio_iommu_type1_dma_map
  CVFU_DMA_MAP_SIZE = 32,
  CVFU_DMA_MAP_VADDR_OFFSET = 8,
  CVFU_DMA_MAP_IOVA_OFFSET = 16,
  CVFU_DMA_MAP_SIZE_OFFSET = 24,
  // struct vfio_iommu_type1_dma_unmap
  CVFU_DMA_UNMAP_SIZE = 24,
  CVFU_DMA_UNMAP_IOVA_OFFSET = 8,
  CVFU_DMA_UNMAP_SIZE_OFFSET = 16,
  // struct vfio_bitmap, after vfio_iommu_type1_dma_unmap or in a dirty_bitmap_get
  CVFU_BITMAP_SIZE = 24,
  CVFU_BITMAP_PGSIZE_OFFSET = 0,
  CVFU_BITMAP_SIZE_OFFSET = 8,
  CVFU_BITMAP_DATA_OFFSET = 16,
  // struct vfio_iommu_type1_dirty_bitmap and its vfio_iommu_type1_dirty_bitmap_get
  CVFU_DIRTY_BITMAP_SIZE = 8,
  CVFU_DIRTY_BITMAP_GET_SIZE = 40,
  CVFU_DIRTY_BITMAP_GET_IOVA_OFFSET = 0,
  CVFU_DIRTY_BITMAP_GET_SIZE_OFFSET = 8,
  CVFU_DIRTY_BITMAP_GET_BITMAP_OFFSET = 16,
  // struct vfio_device_feature and the migration features' data
  CVFU_DEVICE_FEATURE_SIZE = 8,
  CVFU_DEVICE_FEATURE_DATA_OFFSET = 8,
  CVFU_FEATURE_MIGRATION_SIZE = 8,
  CVFU_FEATURE_MIG_STATE_SIZE = 8,
  CVFU_FEATURE_MIG_STATE_DEVICE_STATE_OFFSET = 0,
  CVFU_FEATURE_MIG_STATE_DATA_FD_OFFSET = 4,
  CVFU_FEATURE_MIG_DATA_SIZE_SIZE = 8,
  // struct vfio_device_bind_iommufd
  CVFU_BIND_IOMMUFD_SIZE = 16,
  CVFU_BIND_IOMMUFD_IOMMUFD_OFFSET = 8,
  // struct vfio_device_attach_iommufd_pt
  CVFU_ATTACH_IOMMUFD_PT_SIZE = 12,
  CVFU_ATTACH_IOMMUFD_PT_PT_ID_OFFSET = 8,
  // struct iommu_ioas_alloc
  CVFU_IOAS_ALLOC_SIZE = 12,
  CVFU_IOAS_ALLOC_OUT_IOAS_ID_OFFSET = 8,
  // struct iommu_ioas_iova_ranges and its iommu_iova_range
  CVFU_IOAS_IOVA_RANGES_SIZE = 32,
  CVFU_IOAS_IOVA_RANGES_IOAS_ID_OFFSET = 4,
  CVFU_IOAS_IOVA_RANGES_NUM_IOVAS_OFFSET = 8,
  CVFU_IOAS_IOVA_RANGES_ALLOWED_IOVAS_OFFSET = 16,
  CVFU_IOAS_IOVA_RANGES_OUT_IOVA_ALIGNMENT_OFFSET = 24,
  // struct iommu_ioas_map
  CVFU_IOAS_MAP_SIZE = 40,
  CVFU_IOAS_MAP_IOAS_ID_OFFSET = 8,
  CVFU_IOAS_MAP_USER_VA_OFFSET = 16,
  CVFU_IOAS_MAP_LENGTH_OFFSET = 24,
  CVFU_IOAS_MAP_IOVA_OFFSET = 32,
  // struct iommu_ioas_unmap
  CVFU_IOAS_UNMAP_SIZE = 24,
  CVFU_IOAS_UNMAP_IOAS_ID_OFFSET = 4,
  CVFU_IOAS_UNMAP_IOVA_OFFSET = 8,
  CVFU_IOAS_UNMAP_LENGTH_OFFSET = 16,
};

/// Fills the C structure of `which` (a CVFU_SAMPLE_* below) with the values
/// cvfu_kernel.c lists, as the compiler lays it out, into `out` (at least
/// `capacity` bytes); returns its size, or -1 for an unknown or absent
/// structure. For the codec tests: bytes laid out by the C struct.
enum {  // cvfu_layout_sample's `which`
  CVFU_SAMPLE_DEVICE_INFO = 1,
  CVFU_SAMPLE_REGION_INFO = 2,
  CVFU_SAMPLE_IRQ_INFO = 3,
  CVFU_SAMPLE_IRQ_SET = 4,
  CVFU_SAMPLE_DMA_MAP = 5,
  CVFU_SAMPLE_DMA_UNMAP = 6,
  CVFU_SAMPLE_IOMMU_INFO = 7,
  CVFU_SAMPLE_MIG_STATE = 8,
  CVFU_SAMPLE_DIRTY_BITMAP_GET = 9,
};
int cvfu_layout_sample(int which, void *out, int capacity);

#endif
