import SystemPackage
import TestSupport
import Testing
import VFIOUser

#if canImport(Glibc)
  import Glibc
#endif

@Suite struct OwnedFileDescriptorsTests {
  /// Past the inline places too: every descriptor comes back in order and
  /// the ones not taken close with the value.
  @Test func manyAreHeldInOrderAndTheRestCloseWithTheValue() {
    let ends = (0..<21).map { _ in PipeProbe() }
    var owned = OwnedFileDescriptors(taking: ends.map(\.writer))
    let count = owned.count
    #expect(count == 21)
    for (i, end) in ends.enumerated() {
      let held = owned[i]
      #expect(held == end.writer)
    }
    let taken2 = owned.take(2)
    let taken5 = owned.take(5)
    let taken17 = owned.take(17)
    let lent = owned[5]
    #expect(lent == nil)
    let takenTwice = owned.take(5) == nil
    #expect(takenTwice)
    let countAfter = owned.count
    #expect(countAfter == 21, "taken places still count")
    _ = consume owned
    for (i, end) in ends.enumerated() {
      #expect(end.writerClosed == ![2, 5, 17].contains(i), "descriptor \(i)")
    }
    _ = consume taken2
    _ = consume taken5
    _ = consume taken17
    let allClosed = ends.allSatisfy { $0.writerClosed }
    #expect(allClosed)
  }

  /// `keepFirst` keeps the first places' descriptors in order, without the
  /// taken ones, and closes those after them.
  @Test func keepFirstClosesTheSurplusAndCloseUpTheTakenPlaces() {
    let ends = (0..<9).map { _ in PipeProbe() }
    var owned = OwnedFileDescriptors(taking: ends.map(\.writer))
    let taken = owned.take(1)
    owned.keepFirst(6)
    let count = owned.count
    #expect(count == 5)
    for (i, end) in [0, 2, 3, 4, 5].enumerated() {
      let held = owned[i]
      #expect(held == ends[end].writer)
    }
    for i in 6..<9 { #expect(ends[i].writerClosed, "descriptor \(i)") }
    for i in [0, 2, 3, 4, 5] { #expect(!ends[i].writerClosed, "descriptor \(i)") }
    // Appending after the cut reuses the places.
    let extra = PipeProbe()
    owned.append(OwnedFileDescriptor(taking: extra.writer))
    let appended = owned[5]
    #expect(appended == extra.writer)
    let released = owned.release()
    #expect(released == [0, 2, 3, 4, 5].map { ends[$0].writer } + [extra.writer])
    for descriptor in released { _ = close(descriptor.rawValue) }
    _ = consume taken
    let allClosed = ends.allSatisfy { $0.writerClosed }
    #expect(allClosed && extra.writerClosed)
  }

  @Test func takeAllLeavesAnEmptyValue() {
    let ends = (0..<6).map { _ in PipeProbe() }
    var owned = OwnedFileDescriptors(taking: ends.map(\.writer))
    var all = owned.takeAll()
    let emptied = owned.isEmpty
    let moved = all.count
    #expect(emptied && moved == 6)
    _ = consume owned
    let anyClosed = ends.contains { $0.writerClosed }
    #expect(!anyClosed)
    all.keepFirst(0)
    let none = all.isEmpty
    #expect(none)
    let allClosed = ends.allSatisfy { $0.writerClosed }
    #expect(allClosed)
  }
}
