/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vmsync.ko internals shared by main.c (the device, its ioctls and the ring)
 * vm.c (everything that talks to KVM), and the helpers below.
 */
#ifndef VMSYNC_INTERNAL_H
#define VMSYNC_INTERNAL_H

#include <linux/mutex.h>
#include <linux/types.h>

#include "uapi/vmsync.h"

struct file;
struct kvm;

/* One user memory slot whose dirty log the module reads. */
struct vmsync_slot {
	u16 as_id;
	u16 id;
	bool enabled_by_us;	/* we turned KVM_MEM_LOG_DIRTY_PAGES on */
	bool vmm_logs;		/* the VMM logs it: its log is not ours */
	u64 base_gfn;
	u64 npages;
	unsigned long hva;	/* where the VMM maps the slot */
};

/* KVM's ioctl arguments in the VMM's mm (scratch.c). */
struct vmsync_scratch {
	unsigned long addr;	/* start in the VMM's mm; 0: not mapped */
	size_t ro_bytes;	/* arguments page + CLEAR bitmap, read-only there */
	size_t rw_bytes;	/* GET bitmap, anonymous */
	size_t mapped;		/* both, and the guard after them */
	void *ro;		/* the read-only part's kernel address */
};

/* The state behind one open /dev/vmsync; every field under @lock. */
struct vmsync_vm {
	struct mutex lock;

	/* The ring: allocated at attach, freed at release (it may be mapped). */
	struct vmsync_ring_header *ring;
	/*
	 * Set once the attach succeeded and never cleared: what mmap maps.
	 * mmap reads it without @lock, since it runs under the caller's
	 * mmap_lock, which a harvest may need while holding @lock (a
	 * controller attached to its own VM).
	 */
	struct vmsync_ring_header *mappable_ring;
	u64 *entries;
	u32 ring_entries;
	size_t ring_bytes;
	u64 producer;		/* our copy; the header's may be scribbled on */
	bool overflow;		/* our copy of VMSYNC_RING_OVERFLOW */
	bool used;		/* one attach per open file */

	/* KVM side, set while attached. */
	struct file *vm_file;	/* our reference keeps the VM alive */
	struct kvm *kvm;
	struct vmsync_slot *slots;
	unsigned int nr_slots;
	u64 generation[2];	/* memslot generations after our last sync */
	bool slots_synced;

	/* Scratch for KVM's ioctl arguments, mapped in the VMM's mm. */
	struct vmsync_scratch scratch;

	/* Kernel copy of one slot's dirty bitmap. */
	unsigned long *bitmap;
	size_t bitmap_bytes;
};

/* What one harvest found, for the reply. */
struct vmsync_harvest_result {
	u64 published;
	u64 dirty;
	u64 vmm_written;	/* of @dirty: found in the VMM's page tables */
	u64 vmm_busy;		/* of those, left reported: I/O in flight */
	u32 slots;
	u32 flags;		/* VMSYNC_HARVEST_* */
	bool paused;		/* in: VMSYNC_HARVEST_PAUSED */
};

/* main.c: the ring (producer side). */
void vmsync_ring_push(struct vmsync_vm *vm, u64 entry,
		      struct vmsync_harvest_result *res);
void vmsync_ring_publish(struct vmsync_vm *vm);
void vmsync_ring_set_overflow(struct vmsync_vm *vm);

/* vm.c: attach/harvest/detach; called with vm->lock held. */
int vmsync_vm_attach(struct vmsync_vm *vm, int vm_fd,
		     struct vmsync_attach *reply);
int vmsync_vm_harvest(struct vmsync_vm *vm, struct vmsync_harvest_result *res);
void vmsync_vm_detach(struct vmsync_vm *vm);

/* scratch.c: called in the VMM's mm, except vmsync_scratch_free(). */
int vmsync_scratch_fit(struct vmsync_vm *vm, size_t bitmap_bytes);
void vmsync_scratch_unmap(struct vmsync_vm *vm);
void vmsync_scratch_free(struct vmsync_vm *vm);
void __user *vmsync_scratch_args(struct vmsync_vm *vm);
void __user *vmsync_scratch_clear_bitmap(struct vmsync_vm *vm);
void __user *vmsync_scratch_get_bitmap(struct vmsync_vm *vm);
void vmsync_scratch_set_args(struct vmsync_vm *vm, const void *arg, size_t len);
void vmsync_scratch_set_clear_bitmap(struct vmsync_vm *vm,
				     const unsigned long *bitmap, size_t bytes);

/* vmm_writes.c: pages the VMM writes through its own mapping. */
struct mm_struct;
struct vm_area_struct;
u32 vmsync_vma_refusal(struct vm_area_struct *vma);
u32 vmsync_slot_refusal(struct mm_struct *mm, const struct vmsync_slot *s);
long vmsync_vmm_writes(struct mm_struct *mm, const struct vmsync_slot *s,
		       unsigned long *bitmap, u64 *busy);

/* btf_check.c: KVM's structures as the running kernel lays them out. */
int vmsync_check_layout(void);

#endif /* VMSYNC_INTERNAL_H */
