import SystemPackage
import VFIODevice
import VFIOUser

extension Connection {
  // MARK: DMA windows

  /// DMA_MAP: checked (alignment, room, overlap, the device's IOVA ranges),
  /// mapped, added, then the device is told, with the client's descriptor,
  /// which becomes the device's. A refusal removes the window again.
  func dmaMap(_ payload: UnsafeRawBufferPointer, fds: consuming OwnedFileDescriptors)
    throws(Errno) -> Int
  {
    // At most one descriptor; every path that throws closes what came, before the reply.
    let request = try DMAMapRequest(decoding: payload)
    guard fds.count <= 1 else { throw .invalidArgument }
    let lent = fds.isEmpty ? nil : fds[0]
    // The file's status, from the one fstat a DMA_MAP makes.
    var status: FileStatus? = nil
    if let lent { status = try checkDMAFile(lent, for: request) }
    // Owned here until the device takes it.
    let file = lent != nil ? fds.take(0) : nil
    let entry: DMATable.Entry
    do throws(Errno) {
      entry = try dma.prepare(request, file: lent, status: status)
    } catch {
      if error == .outOfRange {
        logger.warning(
          "DMA_MAP [0x\(String(request.address, radix: 16)), +0x\(String(request.size, radix: 16))) refused (ERANGE): outside the IOVA ranges the device can reach"
        )
      }
      throw error
    }
    if let backing = entry.backing, !backing.mayShrink {
      logger.debug(
        "DMA_MAP [0x\(String(request.address, radix: 16)), +0x\(String(request.size, radix: 16))): the file is sealed against shrinking (F_SEAL_SHRINK), so copies through it need no SIGBUS guard"
      )
    }
    try dma.insert(entry)
    let window = entry.window
    do throws(Errno) {
      try backend.dmaMap(window, file: file)
    } catch {
      dma.remove(inside: window.address, size: window.size)
      throw error
    }
    stats.counters.dmaMapped()
    dmaBytes += window.size
    let (count, bytes) = (dma.count, dmaBytes)
    stats.update {
      $0.dmaRegions = count
      $0.dmaBytes = bytes
    }
    return 0
  }

  /// A DMA window's file must be memory the server can map: a regular file
  /// (EBADF for a socket, pipe, eventfd, directory or device) that reaches
  /// the window's end (EINVAL: touching a mapping past the end of its file
  /// would kill the server with SIGBUS). Returns the file's status, which
  /// `DMATable.prepare` uses rather than asking again.
  private func checkDMAFile(_ fd: FileDescriptor, for request: DMAMapRequest) throws(Errno)
    -> FileStatus
  {
    let status = try FileStatus(of: fd)
    guard status.isRegularFile else {
      // What it is, for the log (a refusal: the second look costs nothing that matters).
      let kind = (try? DescriptorKind(of: fd)).map { "\($0)" } ?? "unknown"
      logger.warning(
        "DMA_MAP with a descriptor that is not a memory file (\(kind)): EBADF")
      throw .badFileDescriptor
    }
    let size = status.size
    guard request.offset <= UInt64(size), UInt64(size) - request.offset >= request.size else {
      logger.warning(
        "DMA_MAP of 0x\(String(request.size, radix: 16)) bytes at file offset 0x\(String(request.offset, radix: 16)) beyond the end of a file of 0x\(String(size, radix: 16)) bytes: EINVAL"
      )
      throw .invalidArgument
    }
    return status
  }

  /// Removes the windows inside the range (the kernel's type1v2 rules, see
  /// `DMATable.windows(inside:size:)`), or every window with UNMAP_ALL. The
  /// device is told first and may refuse, all or nothing: then the reply is
  /// its errno and no window is removed (a range over many windows included).
  /// Otherwise transfers in flight to the windows are cancelled and their
  /// memory released before the reply, which echoes the request.
  func dmaUnmap(_ payload: UnsafeRawBufferPointer) throws(Errno) -> Int {
    let request = try DMAUnmapPayload(decoding: payload)
    let all = request.flags.contains(.all)
    let windows: [DMAWindow]
    if all {
      windows = dma.windows
    } else {
      do throws(Errno) {
        windows = try dma.windows(inside: request.address, size: request.size)
      } catch {
        // The client believes this memory is no longer the device's; it still is.
        logger.warning(
          "DMA_UNMAP \(range(request)) refused (\(error.name)): it cuts through a window or is not page-aligned; nothing removed"
        )
        throw error
      }
    }
    if !windows.isEmpty {
      do throws(Errno) {
        try backend.dmaUnmap(windows)
      } catch {
        logger.warning(
          "DMA_UNMAP \(all ? "all" : range(request)) refused by the device (\(error.name)): none of its \(windows.count) windows removed"
        )
        throw error
      }
    }
    if all {
      abortDMAJobs()
      dma.removeAll()
    } else {
      for window in windows { abortDMAJobs(touching: window) }
      dma.remove(inside: request.address, size: request.size)
    }
    if traceEnabled {
      logger.trace(
        "DMA_UNMAP \(all ? "all" : range(request)): \(windows.count) windows removed")
    }
    stats.counters.dmaUnmapped()
    dmaBytes = all ? 0 : dmaBytes - windows.reduce(0) { $0 + $1.size }
    let (count, bytes) = (dma.count, dmaBytes)
    stats.update {
      $0.dmaRegions = count
      $0.dmaBytes = bytes
    }
    request.encode(into: replyArea)
    return DMAUnmapPayload.size
  }

  /// The range with its last byte: it may end at 2^64.
  private func range(_ request: DMAUnmapPayload) -> String {
    "[0x\(String(request.address, radix: 16)), 0x\(String(request.address + (request.size - 1), radix: 16))]"
  }
}
