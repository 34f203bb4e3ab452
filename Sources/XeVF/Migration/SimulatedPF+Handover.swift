import SystemPackage
import VFIODevice
import VFIOUser

/// The PF's part of a live update (protocol/live-update-device.md, section
/// 8 "pf"): the per-GT control state bits, the last failures, the knobs. The
/// rest of the PF (rings, save cursor and content, staged restore, the
/// workers) is carried only at rest: empty, unreachable without an open
/// stream, or started again on the next operation.
extension SimulatedPF {
  /// Bits that exist only while a save or restore runs: a PF with any of
  /// them is not at rest.
  static let transferBits: PFState = [
    .saveWIP, .saveProcessData, .saveWaitData, .saveDataDone,
    .restoreWIP, .restoreProcessData, .restoreWaitData, .restoreDataDone,
  ]
  /// Every bit `PFState` defines (1 to 39).
  static let knownBits = PFState(rawValue: (1 << 40) - 2)

  /// Why the PF's state cannot be handed over now, or nil.
  func handoverRefusal() -> String? {
    locked {
      if activeStream != nil {
        return "the PF has a migration data stream open for the VF"
      }
      for g in gts.indices {
        let gt = gts[g]
        let transfer = gt.state.intersection(Self.transferBits)
        if !transfer.isEmpty {
          return "the PF is saving or restoring the VF's state on GT\(g) (\(transfer))"
        }
        if !gt.ring.isEmpty {
          return "GT\(g)'s migration ring holds \(gt.ring.count) packets"
        }
        if gt.queued {
          return "the PF's GT\(g) worker has work queued (state \(gt.state))"
        }
        if !gt.events.isEmpty {
          return "the PF's GT\(g) waits for \(gt.events.count) GuC events (state \(gt.state))"
        }
      }
      return nil
    }
  }

  /// Appends the section body (the caller checked `handoverRefusal`).
  func exportHandover(into writer: inout ByteWriter) {
    locked {
      writer.append(UInt32(gts.count))
      for gt in gts {
        writer.append(gt.state.rawValue)
        writer.append(UInt32(gt.ringHighWater))
        writer.append(gt.failure?.rawValue ?? 0)
      }
      writer.append(UInt64(nextStreamID))
      writer.append(UInt8(workInlineValue ? 1 : 0))
      let t = timingValue
      for d in [
        t.control, t.gucAck, t.flr, t.restore, t.vramChunk, t.stream, t.gucLatency, t.flrHardware,
      ] {
        Self.append(d, to: &writer)
      }
      let f = faultsValue
      let sites = f.guc.keys.sorted {
        ($0.command.handoverCode, $0.gt) < ($1.command.handoverCode, $1.gt)
      }
      writer.append(UInt32(sites.count))
      for site in sites {
        writer.append(site.command.handoverCode)
        writer.append(Int64(site.gt))
        switch f.guc[site]! {
        case .busy(let times):
          writer.append(UInt8(1))
          writer.append(Int64(times))
        case .rejected:
          writer.append(UInt8(2))
          writer.append(Int64(0))
        case .error(let error):
          writer.append(UInt8(3))
          writer.append(Int64(error.rawValue))
        case .timeout:
          writer.append(UInt8(4))
          writer.append(Int64(0))
        }
      }
      for value in [f.vramChunkTimeout, f.interruptRead] {
        writer.append(UInt8(value == nil ? 0 : 1))
        writer.append(Int64(value ?? 0))
      }
      Self.append(f.flrNotificationDelay, to: &writer)
      writer.append(UInt8(f.skipFLRPrepare ? 1 : 0))
    }
  }

  /// Reads the section body into this PF, new and idle (no operation has
  /// run, so no worker has started).
  func importHandover(from reader: inout ByteReader) throws(HandoverRefusal) {
    let countAt = reader.offset
    let count: UInt32 = try reader.handoverField("the PF's GT count")
    guard count == gtCount else {
      throw HandoverRefusal.corrupt(
        "the PF's GT count", at: countAt, "\(count) GTs, where the profile has \(gtCount)")
    }
    var loaded = gts
    for g in 0..<gtCount {
      let stateAt = reader.offset
      let state = PFState(rawValue: try reader.handoverField("GT\(g)'s PF state"))
      guard Self.knownBits.isSuperset(of: state) else {
        throw HandoverRefusal.corrupt(
          "GT\(g)'s PF state", at: stateAt, "unknown bits \(String(state.rawValue, radix: 16))")
      }
      guard state.isDisjoint(with: Self.transferBits) else {
        throw HandoverRefusal.corrupt(
          "GT\(g)'s PF state", at: stateAt, "\(state) is a save or restore in progress")
      }
      let highAt = reader.offset
      let highWater: UInt32 = try reader.handoverField("GT\(g)'s ring high water")
      guard highWater <= Self.ringSize else {
        throw HandoverRefusal.corrupt(
          "GT\(g)'s ring high water", at: highAt,
          "\(highWater) packets in a ring of \(Self.ringSize)")
      }
      let failure: Int32 = try reader.handoverField("GT\(g)'s last failure")
      loaded[g] = GT()
      loaded[g].state = state
      loaded[g].done = !state.contains(.wip)
      loaded[g].ringHighWater = Int(highWater)
      loaded[g].failure = failure == 0 ? nil : Errno(rawValue: failure)
    }
    let streamAt = reader.offset
    let nextStream: UInt64 = try reader.handoverField("the PF's next stream id")
    guard nextStream >= 1, nextStream < UInt64(Int.max) else {
      throw HandoverRefusal.corrupt("the PF's next stream id", at: streamAt, "\(nextStream)")
    }
    let inline = try reader.handoverFlag("the PF's inline-work knob")
    var timing = PFTiming()
    timing.control = try Self.duration(&reader, "PFTiming.control")
    timing.gucAck = try Self.duration(&reader, "PFTiming.gucAck")
    timing.flr = try Self.duration(&reader, "PFTiming.flr")
    timing.restore = try Self.duration(&reader, "PFTiming.restore")
    timing.vramChunk = try Self.duration(&reader, "PFTiming.vramChunk")
    timing.stream = try Self.duration(&reader, "PFTiming.stream")
    timing.gucLatency = try Self.duration(&reader, "PFTiming.gucLatency")
    timing.flrHardware = try Self.duration(&reader, "PFTiming.flrHardware")
    let faults = try Self.faults(&reader)
    locked {
      gts = loaded
      nextStreamID = Int(nextStream)
      workInlineValue = inline
      timingValue = timing
      faultsValue = faults
    }
  }

  private static func faults(_ reader: inout ByteReader) throws(HandoverRefusal) -> PFFaults {
    var faults = PFFaults()
    let sites: UInt32 = try reader.handoverField("the PF's GuC fault count")
    for k in 0..<sites {
      let field = "GuC fault \(k)"
      let commandAt = reader.offset
      let code: UInt8 = try reader.handoverField("\(field)'s command")
      guard let command = PFFaults.Command.allCases.first(where: { $0.handoverCode == code }) else {
        throw HandoverRefusal.corrupt(
          "\(field)'s command", at: commandAt, "unknown command \(code)")
      }
      let gt: Int64 = try reader.handoverField("\(field)'s GT")
      let kindAt = reader.offset
      let kind: UInt8 = try reader.handoverField("\(field)'s kind")
      let value: Int64 = try reader.handoverField("\(field)'s value")
      let fault: PFFaults.GuCFault
      switch kind {
      case 1: fault = .busy(times: Int(value))
      case 2: fault = .rejected
      case 3:
        guard let errno = Int32(exactly: value) else {
          throw HandoverRefusal.corrupt("\(field)'s errno", at: kindAt + 1, "\(value)")
        }
        fault = .error(Errno(rawValue: errno))
      case 4: fault = .timeout
      default: throw HandoverRefusal.corrupt("\(field)'s kind", at: kindAt, "unknown kind \(kind)")
      }
      let site = PFFaults.Site(command: command, gt: Int(gt))
      guard faults.guc.updateValue(fault, forKey: site) == nil else {
        throw HandoverRefusal.corrupt(
          field, at: commandAt, "a second fault for \(command) on GT\(gt)")
      }
    }
    for name in ["vramChunkTimeout", "interruptRead"] {
      let present = try reader.handoverFlag("PFFaults.\(name)'s presence")
      let value: Int64 = try reader.handoverField("PFFaults.\(name)")
      let optional = present ? Int(value) : nil
      if name == "vramChunkTimeout" {
        faults.vramChunkTimeout = optional
      } else {
        faults.interruptRead = optional
      }
    }
    faults.flrNotificationDelay = try duration(&reader, "PFFaults.flrNotificationDelay")
    faults.skipFLRPrepare = try reader.handoverFlag("PFFaults.skipFLRPrepare")
    return faults
  }

  private static func append(_ duration: Duration, to writer: inout ByteWriter) {
    let (seconds, attoseconds) = duration.components
    writer.append(seconds)
    writer.append(attoseconds)
  }

  /// A duration: its seconds and attoseconds components, as `components` gives them.
  private static func duration(_ reader: inout ByteReader, _ field: String)
    throws(HandoverRefusal) -> Duration
  {
    let seconds: Int64 = try reader.handoverField("\(field)'s seconds")
    let attoseconds: Int64 = try reader.handoverField("\(field)'s attoseconds")
    return Duration(secondsComponent: seconds, attosecondsComponent: attoseconds)
  }
}

extension PFFaults.Command {
  /// The command's number in a handover blob.
  var handoverCode: UInt8 {
    switch self {
    case .pause: 1
    case .resume: 2
    case .stop: 3
    case .flrStart: 4
    case .flrFinish: 5
    case .query: 6
    case .save: 7
    case .restore: 8
    }
  }
}
