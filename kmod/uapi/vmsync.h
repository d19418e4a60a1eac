/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * vmsync.ko user ABI: the one definition shared by the module, the
 * controller and the tests.  Numbers are never reused; every struct has
 * explicit padding and reserved words that must be zero.
 *
 * Flow: open /dev/vmsync; VMSYNC_IOC_GET_VERSION; VMSYNC_IOC_ATTACH with a
 * KVM VM fd (obtained from the VMM with pidfd_getfd(2)); mmap the ring at
 * offset 0 with ring_bytes from the attach reply; consume gfns between
 * consumer and producer; VMSYNC_IOC_HARVEST asks the module to read and
 * re-arm KVM's dirty state atomically and publish it into the ring;
 * VMSYNC_IOC_DETACH (or close) restores the slots.
 *
 * One attach per open file: the ring lives until the file is closed (it may
 * still be mapped after a detach); to attach again, open the device again.
 *
 * The ring carries every gfn KVM logged in the VM's user memory slots
 * (read-only slots are not followed) and, with VMSYNC_FEATURE_VMM_WRITES,
 * every gfn the VMM itself wrote through its mapping of guest RAM (device
 * emulation, virtio DMA), which KVM's log does not see.  Whenever the module cannot vouch for
 * the set it sets VMSYNC_RING_OVERFLOW and the controller must rescan every
 * page: the ring was full, or the VMM added, moved or removed a slot, or
 * turned logging off on one (the module turns it back on at the next
 * harvest, but writes in between were not logged).
 */
#ifndef _UAPI_LINUX_VMSYNC_H
#define _UAPI_LINUX_VMSYNC_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VMSYNC_DEVICE_PATH	"/dev/vmsync"
#define VMSYNC_ABI_VERSION	1

/* Feature bits reported by VMSYNC_IOC_GET_VERSION. */
#define VMSYNC_FEATURE_RING		(1ULL << 0)	/* mmap'd gfn ring */
#define VMSYNC_FEATURE_SLOT_TRACKING	(1ULL << 1)	/* follows slot changes */
#define VMSYNC_FEATURE_VMM_WRITES	(1ULL << 2)	/* reports the VMM's own
							 * writes; says why an
							 * attach is refused */

struct vmsync_version {
	__u32 abi_version;	/* out: VMSYNC_ABI_VERSION */
	__u32 pad;		/* must be zero */
	__u64 features;		/* out: VMSYNC_FEATURE_* */
	__u64 reserved[4];	/* must be zero */
};

/*
 * Why an attach was refused (vmsync_attach.refused, set beside the error;
 * refused_gpa is the guest physical address of the slot concerned).
 */
#define VMSYNC_REFUSED_DIRTY_RING	1  /* EOPNOTSUPP: the VM uses KVM's dirty
					    * ring, which has no bitmap */
#define VMSYNC_REFUSED_VMM_LOGS		2  /* EBUSY: the VMM already logs the
					    * slot (a migration under way) */
#define VMSYNC_REFUSED_RAM_NOT_SHARED	3  /* EOPNOTSUPP: guest RAM is not a
					    * shared file mapping (anonymous
					    * or private memory) */
#define VMSYNC_REFUSED_HUGETLB		4  /* EOPNOTSUPP: guest RAM on hugetlbfs */

struct vmsync_attach {
	__s32 vm_fd;		/* in: fd of a KVM VM (anon_inode:kvm-vm) */
	__u32 flags;		/* in: must be zero */
	__u32 ring_entries;	/* in: power of two, 0 = module default;
				 * out: entries actually used */
	__u32 pad;		/* must be zero */
	__u64 ring_bytes;	/* out: length to mmap at offset 0 */
	__u32 slots;		/* out: memory slots followed */
	__u32 pad2;		/* must be zero */
	__u32 refused;		/* in: zero; out: VMSYNC_REFUSED_* on error */
	__u32 pad3;		/* must be zero */
	__u64 refused_gpa;	/* in: zero; out: see VMSYNC_REFUSED_* */
	__u64 reserved[1];	/* must be zero */
};

/* Why a harvest could not vouch for its set (VMSYNC_RING_OVERFLOW is set). */
#define VMSYNC_HARVEST_RING_FULL	(1U << 0)  /* gfns dropped */
#define VMSYNC_HARVEST_SLOTS_CHANGED	(1U << 1)  /* the VMM changed slots */
#define VMSYNC_HARVEST_VMM_UNTRACKED	(1U << 2)  /* guest RAM left a shared
						    * file mapping: the VMM's
						    * writes are not followed */
#define VMSYNC_HARVEST_VMM_LOGS		(1U << 3)  /* the VMM logs a slot made
						    * after the attach itself:
						    * its log is left to it */

/* Asked of a harvest (vmsync_harvest.request). */
#define VMSYNC_HARVEST_PAUSED		(1U << 0)  /* no vCPU ran since the last
						    * harvest: re-arm KVM's log
						    * but report only the VMM's
						    * writes, and a slot change
						    * is no reason to rescan */

struct vmsync_harvest {
	__u64 published;	/* out: gfns added to the ring by this call */
	__u64 dirty;		/* out: gfns found dirty (published or not) */
	__u32 slots;		/* out: memory slots read */
	__u32 flags;		/* out: VMSYNC_HARVEST_* */
	__u32 vmm_written;	/* out: of dirty, gfns found written through
				 * the VMM's mapping and not in KVM's log */
	__u32 vmm_busy;		/* out: pages of this harvest with an I/O in
				 * flight into them: reported again by the
				 * next harvest */
	__u32 request;		/* in: VMSYNC_HARVEST_PAUSED or zero */
	__u32 pad;		/* must be zero */
};

/*
 * Ring layout at mmap offset 0: this header, then entries[] of __u64
 * guest frame numbers (address-space id in bits 63..56, gfn below).
 * Single producer (module), single consumer (controller).  Indexes are
 * free-running; slot = index & (entries - 1).  The consumer reads
 * producer with acquire semantics and writes consumer with release.
 */
#define VMSYNC_RING_OVERFLOW	(1U << 0)  /* gfns were dropped: rescan all */

struct vmsync_ring_header {
	__u64 producer;		/* written by the module */
	__u64 pad0[7];		/* keep producer on its own cache line */
	__u64 consumer;		/* written by the controller */
	__u64 pad1[7];
	__u32 flags;		/* VMSYNC_RING_*; controller clears OVERFLOW
				 * with VMSYNC_IOC_CLEAR_OVERFLOW */
	__u32 entries;		/* number of entries, power of two */
	__u64 reserved[7];
	__u64 entries_offset;	/* byte offset of entries[] from ring start */
};

#define VMSYNC_GFN_AS_SHIFT	56
#define VMSYNC_GFN_MASK		((1ULL << VMSYNC_GFN_AS_SHIFT) - 1)

#define VMSYNC_IOC_GET_VERSION	_IOWR('V', 0x00, struct vmsync_version)
#define VMSYNC_IOC_ATTACH	_IOWR('V', 0x01, struct vmsync_attach)
#define VMSYNC_IOC_DETACH	_IO('V', 0x02)
#define VMSYNC_IOC_HARVEST	_IOWR('V', 0x03, struct vmsync_harvest)
#define VMSYNC_IOC_CLEAR_OVERFLOW _IO('V', 0x04)

#endif /* _UAPI_LINUX_VMSYNC_H */
