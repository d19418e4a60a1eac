# Wire format of vmsync: checkpoints and the RPC between devices and the sync server.
#
# Guest RAM and the guest disk are both treated as arrays of 4096-byte units
# (pages, blocks); a chunk names one unit by index and carries its new bytes
# in some encoding.
@0xfe11caf0ed5867d0;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("vmsync::wire");

enum CheckpointKind {
  full @0;          # every non-zero unit of the image; a receiver starts from zeros
  incremental @1;   # units changed since the base sequence, VM running (fuzzy)
  final @2;         # VM paused: last changes, device state and image digest (exact)
}

enum ChunkEncoding {
  whole @0;         # data holds the unit's bytes
  zero @1;          # the unit is all zero bytes; data is empty
  xorDiff @2;       # data is an XOR run list against the policy's reference unit
  sameAs @3;        # identical to the unit of chunk number `sameAs` in the same list
  reference @4;     # a copy of another unit of the receiver's image as it was before this
                    # checkpoint (same image: RAM within RAM, disk within disk); data is 16
                    # bytes, the source unit's index then the xxh3-64 hash of its bytes, both
                    # little-endian, never compressed. The receiver uses the source only when
                    # its bytes hash to that value; otherwise it refuses the checkpoint.
                    # Never in a full checkpoint (it starts from an empty image).
}

enum Compression {
  none @0;          # data is stored as encoded
  lz4 @1;           # data is an lz4 block; `rawSize` is its decompressed size
  zstd @2;          # a zstd frame; for blobs only (BlobFrame), never on a single chunk
}

struct BlobFrame {
  compression @0 :Compression;  # none: the blob is its chunks' payloads as they are;
                                # zstd: the blob is one zstd frame of them
  rawSize @1 :UInt64;           # bytes of the blob after decompression (its size for none)
}

enum Policy {
  dirtyPrev @0;     # whole changed units; reference: previous checkpoint
  diffPrev @1;      # changed bytes only; reference: previous checkpoint
  dirtyOrig @2;     # whole changed units; reference: the original (base) image
  diffOrig @3;      # changed bytes only; reference: the original (base) image
}

struct Chunk {
  index @0 :UInt64;             # unit index within the image (byte offset / 4096)
  encoding @1 :ChunkEncoding;   # how `data` describes the unit
  compression @2 :Compression;  # compression applied on top of the encoding
  rawSize @3 :UInt32;           # bytes of `data` after decompression
  data @4 :Data;                # payload, unless it is in a blob; empty for zero and sameAs
                                # (for reference: the source unit and its hash)
  sameAs @5 :UInt32;            # for encoding sameAs: position of the earlier chunk
  blob @6 :UInt32;              # 0: the payload is `data`; k: it is bytes
  blobOffset @7 :UInt32;        #   [blobOffset, blobOffset + blobSize) of the
  blobSize @8 :UInt32;          #   checkpoint's blobs[k - 1] (`data` then empty)
}

struct VmSpec {
  vmId @0 :Text;                # name of the VM, unique on a server
  memoryBytes @1 :UInt64;       # guest RAM size (multiple of 4096)
  diskBytes @2 :UInt64;         # guest disk size (multiple of 4096)
  kernel @3 :Data;              # kernel image booted by the VMM (needed to start it again)
  initrd @4 :Data;              # initial ramdisk
  kernelCmdline @5 :Text;       # kernel command line
  accel @6 :Text;               # accelerator the VM was started with: "kvm" or "tcg"
  cpuModel @7 :Text;            # QEMU -cpu model; must match on every device
  vcpus @8 :UInt32;             # number of virtual CPUs
  policy @9 :Policy;            # checkpoint policy every device of this VM uses
  freePageReporting @10 :Bool;  # the VMM has a virtio-balloon with free page reporting
                                # (part of the VM's hardware, so of its device state)
}

struct Checkpoint {
  vmId @0 :Text;                # which VM
  epoch @1 :UInt64;             # lease epoch of the device that made it (fencing)
  sequence @2 :UInt64;          # position in the chain, 1 for the first
  baseSequence @3 :UInt64;      # sequence this one applies on top of (0: empty image)
  kind @4 :CheckpointKind;      # full, incremental or final
  policy @5 :Policy;            # how chunks were measured and encoded
  memory @6 :List(Chunk);       # changed guest RAM pages
  disk @7 :List(Chunk);         # changed guest disk blocks
  deviceState @8 :Data;         # final only: the VMM's device/CPU state stream
  imageDigest @9 :Data;         # final only: digest of RAM+disk after applying
  spec @10 :VmSpec;             # full only: what a receiver needs to build the VM
  origin @11 :Text;             # device id that produced the checkpoint
  createdUnixNs @12 :UInt64;    # wall clock at creation, for reports
  vmContinued @14 :Bool;        # final only: the VM ran on after it (a resumable point, not a switch or park)
  blobs @13 :List(Data);        # chunk payloads packed together, as the encoder wrote
                                # them: a sender adds them to the message without
                                # copying (at most 64 per list of chunks)
  resync @15 :Bool;             # built by the server from a device's unit hashes: takes
                                # that device's image (at baseSequence, or past it) to the
                                # chain's image at `sequence`, which may be lower
  blobFrames @16 :List(BlobFrame); # empty: every blob is plain; else one per blob, in
                                # order: how it is compressed. A chunk's blobOffset and
                                # blobSize name bytes of the decompressed blob
  deviceStateEncoding @17 :StateEncoding;  # how deviceState holds the state
  deviceStateRawSize @18 :UInt64;          # the state's size once decoded
}

enum StateEncoding {
  raw @0;                       # deviceState is the VMM's stream itself
  lz4 @1;                       # deviceState is an lz4 block of it
}

enum DeviceState {
  online @0;                    # connected and up to date
  offline @1;                   # not connected
  stale @2;                     # connected but behind the head of the chain
}

struct DeviceStatus {
  deviceId @0 :Text;            # device name
  state @1 :DeviceState;        # online, offline or stale
  appliedSequence @2 :UInt64;   # last checkpoint the device has applied
  active @3 :Bool;              # holds the lease and runs the VM
  sendingSequence @4 :UInt64;   # checkpoint (or merged catch-up up to it) on its way to the device; 0: none
  sendingBytes @5 :UInt64;      # its size
  sendingForNs @6 :UInt64;      # how long it has been on its way
}

struct ClusterStatus {
  vmId @0 :Text;                # the VM's name
  headSequence @1 :UInt64;      # newest checkpoint stored
  epoch @2 :UInt64;             # current lease epoch
  activeDevice @3 :Text;        # lease holder, empty if none
  devices @4 :List(DeviceStatus); # every device ever registered
  storedBytes @5 :UInt64;       # checkpoint bytes stored since this server started (folds not subtracted)
  parked @6 :Bool;              # no device runs the VM: the head is a final checkpoint any up-to-date device may resume
  parkedBy @7 :Text;            # the device that parked it
  resumablePoint @8 :UInt64;    # newest final checkpoint in the chain: where a failover resumes (0: none)
  resumablePointAgeNs @9 :UInt64; # how old it is (guest time a failover now would lose)
  activeSilentNs @10 :UInt64;   # time since the active device last renewed its lease
  abandoned @11 :UInt64;        # checkpoints a failover abandoned (kept under abandoned/ in the data directory)
  user @12 :Text;               # whose VM it is (empty on a server without TLS)
}

struct VmSummary {
  name @0 :Text;                # the VM's name
  user @1 :Text;                # whose it is (empty on a server without TLS)
  headSequence @2 :UInt64;      # newest checkpoint stored
  activeDevice @3 :Text;        # lease holder, empty if none
  parked @4 :Bool;              # no device runs it; the head is a final checkpoint
  chainBytes @5 :UInt64;        # bytes the chain takes on the server (base and checkpoints after it)
  devices @6 :UInt32;           # devices ever registered for it
}

struct SwitchReport {
  from @0 :Text;                # device that was active
  to @1 :Text;                  # device that is active now
  finalSequence @2 :UInt64;     # sequence of the final checkpoint
  finalBytes @3 :UInt64;        # encoded size of the final checkpoint
  pauseNs @4 :UInt64;           # stop the VM on the source
  finalHarvestNs @5 :UInt64;    # harvest and encode the last changes
  deviceStateSaveNs @6 :UInt64; # QEMU saves device state
  transferNs @7 :UInt64;        # source -> server -> target, apply excluded
  applyNs @8 :UInt64;           # target writes the final checkpoint and checks the digest
  deviceStateLoadNs @9 :UInt64; # target QEMU loads device state
  resumeNs @10 :UInt64;         # target VM continues
  totalNs @11 :UInt64;          # from the request to the VM running on the target
  epoch @12 :UInt64;            # lease epoch granted to the target
  catchUpNs @13 :UInt64;        # bringing a stale target up to date first, while the VM ran on
  catchUpBytes @14 :UInt64;     # what that sent
  fromParked @15 :Bool;         # the VM was parked (`from` parked it), not running: nothing was paused
  forced @16 :Bool;             # a failover: `from` was lost; the VM resumed from the newest resumable point
  lostNs @17 :UInt64;           # forced: the age of that point (guest time lost)
  abandonedCheckpoints @18 :UInt64; # forced: checkpoints after the point, abandoned
  deviceStateBytes @19 :UInt64; # the VMM's device state as saved
  deviceStateWireBytes @20 :UInt64; # as it travelled in the final checkpoint (compressed)
  pageSource @21 :Text;         # the source's page source ("scan", "kmod")
  finalRamFullCompare @22 :Bool; # its final harvest compared every RAM unit (else it took the source's list)
  finalRamUnits @23 :UInt64;    # RAM units the final checkpoint carried
  finalRamMissed @24 :UInt64;   # full compare: of those, units the page source had not reported
}

struct StopReport {
  device @0 :Text;              # the device that ran the VM
  finalSequence @1 :UInt64;     # the final checkpoint it parked the VM at
  finalBytes @2 :UInt64;        # its encoded size
}

struct HandOffResult {
  finalSequence @0 :UInt64;     # sequence of the final checkpoint pushed
  finalBytes @1 :UInt64;        # its encoded size
  pauseNs @2 :UInt64;           # time to stop the VM
  finalHarvestNs @3 :UInt64;    # time to harvest and encode
  deviceStateSaveNs @4 :UInt64; # time for QEMU to save device state
  pushNs @5 :UInt64;            # round trip of the push to the server
  deviceStateBytes @6 :UInt64;  # the VMM's device state as saved
  deviceStateWireBytes @7 :UInt64; # as it travels (compressed)
  pageSource @8 :Text;          # where the changed RAM pages came from ("scan", "kmod")
  finalRamFullCompare @9 :Bool; # the final harvest compared every RAM unit (else it took the source's list)
  finalRamUnits @10 :UInt64;    # RAM units the final checkpoint carries
  finalRamMissed @11 :UInt64;   # full compare: of those, units the source had not reported since the last checkpoint
}

struct ActivateResult {
  deviceStateLoadNs @0 :UInt64; # time for QEMU to load device state
  resumeNs @1 :UInt64;          # time for the VM to continue
}

# Served by every device; the server calls it.
interface DevicePeer {
  apply @0 (checkpoint :Checkpoint) -> (appliedSequence :UInt64, applyNs :UInt64);
  # Standby: write the checkpoint into the local image. A final checkpoint is
  # verified against its digest before the call returns.

  handOff @1 (target :Text) -> (result :HandOffResult);
  # Active: pause the VM, push a final checkpoint, stop the VMM, become standby.

  activate @2 (epoch :UInt64) -> (result :ActivateResult);
  # Standby holding the final checkpoint: load the device state, resume, become active.

  ping @3 () -> ();
  # Answers while the device's daemon is alive (the server asks before it lets
  # a second registration of the same device replace this one).

  park @4 () -> (result :HandOffResult);
  # Active: pause the VM, push a final checkpoint, give the lease back and exit
  # (`vmsync stop`). The VM is then parked on the server.

  rollBack @5 (to :UInt64, resync :Checkpoint) -> (appliedSequence :UInt64);
  # The image left the chain (a failover abandoned checkpoints it applied, or
  # its VM ran past its last checkpoint): apply `resync`, which takes it to
  # the chain at `to`; without one, drop the image and start over from 0.
  # Returns the sequence the image is at now.

  unitHashes @6 () -> (appliedSequence :UInt64, ram :List(UInt64), disk :List(UInt64));
  # The hash of every unit of the device's image as it is now (empty lists:
  # it has none), for the server to build a resync checkpoint. A fenced
  # active device stops its VM first.
}

# One registered device's session; dropping it marks the device offline.
interface DeviceSession {
  acquireLease @0 () -> (epoch :UInt64);
  # Become the active device. Granted only when no device holds the lease and
  # this device has applied every stored checkpoint (or none exists yet).

  push @1 (checkpoint :Checkpoint) -> (sequence :UInt64);
  # Store a checkpoint durably; returns after it is on disk. Rejected when the
  # epoch is not the current lease's (the device was fenced) or the sequence
  # does not follow the head.

  releaseLease @2 (epoch :UInt64) -> ();
  # Give the lease up after a final checkpoint.

  renewLease @3 (epoch :UInt64) -> ();
  # The lease holder is alive; refused (the device was fenced) for an old epoch.
}

# A server holds many VMs, each its user's. A request names one as "NAME",
# one of the caller's own, or "USER/NAME"; empty names the default VM "vm".
# Another user's VM is refused for every request; a VM is created by the
# first device that registers for it.
interface SyncServer {
  register @0 (deviceId :Text, peer :DevicePeer, appliedSequence :UInt64, appliedEpoch :UInt64, diverged :Bool,
               vm :Text)
      -> (session :DeviceSession, vmId :Text, headSequence :UInt64, parked :Bool, leaseTimeoutMs :UInt64);
  # Announce a device and the last sequence it has applied (with the lease
  # epoch of that checkpoint, 0 if unknown); the server sends it the
  # checkpoints it misses. A device whose image left the chain, because a
  # failover abandoned what it applied or (`diverged`) its VM ran past its
  # last checkpoint, is first brought back by a resync (DevicePeer.rollBack).

  status @1 (vm :Text) -> (status :ClusterStatus);
  # Devices, lease and chain head of one VM.

  switchTo @2 (target :Text, force :Bool, vm :Text) -> (report :SwitchReport);
  # Move the running VM to `target`, or resume a parked VM there.

  stop @3 (vm :Text) -> (report :StopReport);
  # Park the VM: the active device pauses it, pushes a final checkpoint, gives
  # the lease back and its daemon exits.

  listVms @4 () -> (vms :List(VmSummary));
  # The caller's VMs (on a server without TLS: every VM).
}
