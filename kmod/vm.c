// SPDX-License-Identifier: GPL-2.0
/*
 * vmsync.ko: the KVM side.  Attach to a VM that belongs to another process,
 * turn dirty logging on for its user memory slots, harvest the log, detach.
 *
 * KVM 6.1 does not export the helpers that read and re-protect the dirty log
 * (kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect), and its VM ioctls
 * refuse a caller whose mm is not the VM's.  So every dirty-log read is
 * KVM's own KVM_GET_DIRTY_LOG (plus KVM_CLEAR_DIRTY_LOG when the VMM enabled
 * manual protection), issued on the VM file by a kernel worker that has
 * adopted the VMM's mm with kthread_use_mm().  KVM then does the read and the
 * write-protect in one step under its MMU lock, as for the VMM itself.  The
 * ioctl arguments must be user memory of that mm: the worker maps a small
 * scratch area there (scratch.c: arguments read-only to the VMM, a bitmap
 * KVM writes, a PROT_NONE guard), and copies the bitmap out of it.
 *
 * Slot flags are changed with the exported __kvm_set_memory_region() under
 * kvm->slots_lock, so that reading a slot and rewriting its flags is one
 * step with respect to the VMM's own KVM_SET_USER_MEMORY_REGION.
 *
 * Lifetime: the attach holds a reference to the VM file, so the struct kvm
 * cannot go away.  The VMM's mm may (kill -9): the worker takes mm_users with
 * mmget_not_zero() and reports -ESRCH when it is gone; the caller then
 * detaches without touching the VM.
 */
#include <linux/file.h>
#include <linux/kthread.h>
#include <linux/kvm_host.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/workqueue.h>

#include "internal.h"

/* Runs fn in a kernel worker that has adopted the VMM's mm. */
struct vmsync_mm_call {
	struct work_struct work;
	struct vmsync_vm *vm;
	int (*fn)(struct vmsync_vm *vm, void *arg);
	void *arg;
	int ret;
};

static void vmsync_mm_call_work(struct work_struct *work)
{
	struct vmsync_mm_call *call =
		container_of(work, struct vmsync_mm_call, work);
	struct mm_struct *mm = call->vm->kvm->mm;

	if (!mmget_not_zero(mm)) {
		call->ret = -ESRCH;
		return;
	}
	kthread_use_mm(mm);
	call->ret = call->fn(call->vm, call->arg);
	kthread_unuse_mm(mm);
	mmput(mm);
}

static int vmsync_in_vmm_mm(struct vmsync_vm *vm,
			    int (*fn)(struct vmsync_vm *vm, void *arg),
			    void *arg)
{
	struct vmsync_mm_call call = { .vm = vm, .fn = fn, .arg = arg };

	INIT_WORK_ONSTACK(&call.work, vmsync_mm_call_work);
	queue_work(system_unbound_wq, &call.work);
	flush_work(&call.work);
	destroy_work_on_stack(&call.work);
	return call.ret;
}

static int vmsync_set_slot_flags(struct kvm *kvm, struct kvm_memory_slot *ms,
				 u32 flags)
{
	struct kvm_userspace_memory_region mem = {
		.slot = ((u32)ms->as_id << 16) | ms->id,
		.flags = flags,
		.guest_phys_addr = ms->base_gfn << PAGE_SHIFT,
		.memory_size = (u64)ms->npages << PAGE_SHIFT,
		.userspace_addr = ms->userspace_addr,
	};

	return __kvm_set_memory_region(kvm, &mem);
}

static bool vmsync_generation_changed(struct vmsync_vm *vm)
{
	int as;

	for (as = 0; as < KVM_ADDRESS_SPACE_NUM; as++)
		if (__kvm_memslots(vm->kvm, as)->generation != vm->generation[as])
			return true;
	return false;
}

static struct vmsync_slot *vmsync_find_slot(struct vmsync_vm *vm, u16 as_id,
					    u16 id)
{
	unsigned int i;

	for (i = 0; i < vm->nr_slots; i++)
		if (vm->slots[i].as_id == as_id && vm->slots[i].id == id)
			return &vm->slots[i];
	return NULL;
}

/*
 * Brings our slot list up to date and dirty logging on for every user slot
 * that is not read-only.  Returns 1 when the slots changed since the last
 * sync (writes may have gone unlogged: the caller asks for a rescan), 0 when
 * nothing changed, or -errno.
 *
 * A slot the VMM logs itself (QEMU during a migration) is the VMM's: reading
 * its log would take bits from the VMM and the VMM's reads take them from us.
 * At the attach that is a refusal (@reply says which slot); a slot made
 * later with logging on is left to the VMM and costs a rescan per harvest.
 */
static int vmsync_sync_slots(struct vmsync_vm *vm, struct vmsync_attach *reply)
{
	struct kvm *kvm = vm->kvm;
	struct vmsync_slot *slots = NULL, *old;
	struct kvm_memory_slot *ms;
	unsigned int n = 0, i;
	int as, bkt, r = 0;

	mutex_lock(&kvm->slots_lock);
	if (vm->slots_synced && !vmsync_generation_changed(vm))
		goto unlock;

	for (as = 0; as < KVM_ADDRESS_SPACE_NUM; as++)
		kvm_for_each_memslot(ms, bkt, __kvm_memslots(kvm, as))
			if (ms->id < KVM_USER_MEM_SLOTS &&
			    !(ms->flags & KVM_MEM_READONLY))
				n++;
	if (n) {
		slots = kvcalloc(n, sizeof(*slots), GFP_KERNEL_ACCOUNT);
		if (!slots) {
			r = -ENOMEM;
			goto unlock;
		}
	}
	/* Snapshot first: changing a slot rewrites the sets we walk. */
	i = 0;
	for (as = 0; as < KVM_ADDRESS_SPACE_NUM; as++) {
		kvm_for_each_memslot(ms, bkt, __kvm_memslots(kvm, as)) {
			if (ms->id >= KVM_USER_MEM_SLOTS ||
			    (ms->flags & KVM_MEM_READONLY) || i == n)
				continue;
			slots[i].as_id = as;
			slots[i].id = ms->id;
			slots[i].base_gfn = ms->base_gfn;
			slots[i].npages = ms->npages;
			slots[i].hva = ms->userspace_addr;
			/* Still ours if it is the slot we turned logging on. */
			old = vmsync_find_slot(vm, as, ms->id);
			slots[i].enabled_by_us = old && old->enabled_by_us &&
				old->base_gfn == ms->base_gfn &&
				old->npages == ms->npages &&
				old->hva == ms->userspace_addr;
			slots[i].vmm_logs = !slots[i].enabled_by_us &&
				(ms->flags & KVM_MEM_LOG_DIRTY_PAGES);
			if (slots[i].vmm_logs && reply) {
				reply->refused = VMSYNC_REFUSED_VMM_LOGS;
				reply->refused_gpa = ms->base_gfn << PAGE_SHIFT;
				kvfree(slots);
				r = -EBUSY;
				goto unlock;
			}
			i++;
		}
	}
	n = i;
	for (i = 0; i < n; i++) {
		ms = id_to_memslot(__kvm_memslots(kvm, slots[i].as_id),
				   slots[i].id);
		if (!ms || (ms->flags & KVM_MEM_LOG_DIRTY_PAGES))
			continue;
		r = vmsync_set_slot_flags(kvm, ms,
					  ms->flags | KVM_MEM_LOG_DIRTY_PAGES);
		if (r) {
			pr_warn_ratelimited("vmsync: cannot turn on dirty logging for slot %u/%u: %d\n",
					    slots[i].as_id, slots[i].id, r);
			/* Keep every slot: detach restores the ones we changed. */
			break;
		}
		slots[i].enabled_by_us = true;
	}
	kvfree(vm->slots);
	vm->slots = slots;
	vm->nr_slots = n;
	for (as = 0; as < KVM_ADDRESS_SPACE_NUM; as++)
		/* After a failure, never match: the next call tries again. */
		vm->generation[as] = r ? U64_MAX :
			__kvm_memslots(kvm, as)->generation;
	if (!r)
		r = vm->slots_synced ? 1 : 0;
	vm->slots_synced = true;
unlock:
	mutex_unlock(&kvm->slots_lock);
	return r;
}

/* Makes the scratch and the kernel bitmap large enough for every slot. */
static int vmsync_size_buffers(struct vmsync_vm *vm)
{
	size_t need = 0;
	unsigned int i;

	for (i = 0; i < vm->nr_slots; i++)
		need = max_t(size_t, need,
			     ALIGN(vm->slots[i].npages, BITS_PER_LONG) / 8);
	need = PAGE_ALIGN(need);
	if (need > vm->bitmap_bytes) {
		unsigned long *bitmap = kvzalloc(need, GFP_KERNEL_ACCOUNT);

		if (!bitmap)
			return -ENOMEM;
		kvfree(vm->bitmap);
		vm->bitmap = bitmap;
		vm->bitmap_bytes = need;
	}
	return vmsync_scratch_fit(vm, need);
}

static int vmsync_attach_in_mm(struct vmsync_vm *vm, void *arg)
{
	struct vmsync_attach *reply = arg;
	unsigned int i;
	int r = vmsync_sync_slots(vm, reply);

	if (r < 0)
		return r;
	/* The VMM's writes are followed in shared file mappings only. */
	for (i = 0; i < vm->nr_slots; i++) {
		u32 why = vmsync_slot_refusal(vm->kvm->mm, &vm->slots[i]);

		if (why) {
			reply->refused = why;
			reply->refused_gpa = vm->slots[i].base_gfn << PAGE_SHIFT;
			return -EOPNOTSUPP;
		}
	}
	return vmsync_size_buffers(vm);
}

/* A VM ioctl as the VMM would issue it; we are in the VMM's mm. */
static long vmsync_vm_ioctl(struct vmsync_vm *vm, unsigned int cmd,
			    const void *arg, size_t len)
{
	vmsync_scratch_set_args(vm, arg, len);
	return vm->vm_file->f_op->unlocked_ioctl(vm->vm_file, cmd,
		(unsigned long)vmsync_scratch_args(vm));
}

/*
 * After a failed dirty-log ioctl: 1 if the VMM changed its slots since our
 * snapshot (the slot was removed, or re-created smaller or larger, and a
 * larger one ran into the guard), else the error itself.
 */
static int vmsync_slot_error(struct vmsync_vm *vm, long err)
{
	bool changed;

	mutex_lock(&vm->kvm->slots_lock);
	changed = vmsync_generation_changed(vm);
	mutex_unlock(&vm->kvm->slots_lock);
	return changed ? 1 : (int)err;
}

/* Reads and re-arms one slot's log; publishes its gfns.  1 = slot changed. */
static int vmsync_harvest_slot(struct vmsync_vm *vm, struct vmsync_slot *s,
			       struct vmsync_harvest_result *res)
{
	void __user *ubitmap = vmsync_scratch_get_bitmap(vm);
	size_t bytes = ALIGN(s->npages, BITS_PER_LONG) / 8;
	struct kvm_dirty_log log = {
		.slot = ((u32)s->as_id << 16) | s->id,
		.dirty_bitmap = ubitmap,
	};
	unsigned long bit;
	long r, written;

	if (s->vmm_logs) {
		/* The VMM's log: not ours to read or clear. */
		res->flags |= VMSYNC_HARVEST_VMM_LOGS;
		return 0;
	}
	r = vmsync_vm_ioctl(vm, KVM_GET_DIRTY_LOG, &log, sizeof(log));
	if (r)
		return vmsync_slot_error(vm, r);
	if (copy_from_user(vm->bitmap, ubitmap, bytes))
		return -EFAULT;
	if (READ_ONCE(vm->kvm->manual_dirty_log_protect)) {
		/* KVM only copied the log: clear and re-protect what we got. */
		struct kvm_clear_dirty_log clear = {
			.slot = log.slot,
			.num_pages = s->npages,
			.first_page = 0,
			.dirty_bitmap = vmsync_scratch_clear_bitmap(vm),
		};

		/* What we read, where the VMM cannot change it. */
		vmsync_scratch_set_clear_bitmap(vm, vm->bitmap, bytes);
		r = vmsync_vm_ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear,
				    sizeof(clear));
		if (r)
			return vmsync_slot_error(vm, r);
	}
	/* No vCPU ran: what KVM has is not writes (a log turned on again). */
	if (res->paused)
		bitmap_zero(vm->bitmap, s->npages);
	/* What the VMM wrote itself, beside what the vCPUs wrote. */
	written = vmsync_vmm_writes(vm->kvm->mm, s, vm->bitmap,
				    &res->vmm_busy);
	if (written == -ENOMEM)
		return -ENOMEM;
	if (written < 0)
		res->flags |= VMSYNC_HARVEST_VMM_UNTRACKED;
	else
		res->vmm_written += written;
	for_each_set_bit(bit, vm->bitmap, s->npages) {
		res->dirty++;
		vmsync_ring_push(vm, ((u64)s->as_id << VMSYNC_GFN_AS_SHIFT) |
				 ((s->base_gfn + bit) & VMSYNC_GFN_MASK), res);
	}
	return 0;
}

static int vmsync_harvest_in_mm(struct vmsync_vm *vm, void *arg)
{
	struct vmsync_harvest_result *res = arg;
	unsigned int i;
	int r;

	r = vmsync_sync_slots(vm, NULL);
	if (r < 0)
		return r;
	if (r)
		res->flags |= VMSYNC_HARVEST_SLOTS_CHANGED;
	r = vmsync_size_buffers(vm);
	if (r)
		return r;
	for (i = 0; i < vm->nr_slots; i++) {
		r = vmsync_harvest_slot(vm, &vm->slots[i], res);
		if (r < 0)
			return r;
		if (r)
			res->flags |= VMSYNC_HARVEST_SLOTS_CHANGED;
		res->slots++;
	}
	/* A slot that changed while we read may have been read half. */
	mutex_lock(&vm->kvm->slots_lock);
	if (vmsync_generation_changed(vm))
		res->flags |= VMSYNC_HARVEST_SLOTS_CHANGED;
	mutex_unlock(&vm->kvm->slots_lock);
	/*
	 * A slot change costs a rescan, as writes may have gone unlogged;
	 * not when no vCPU ran, and the VMM's writes were walked anyway.
	 */
	if ((res->flags & VMSYNC_HARVEST_SLOTS_CHANGED) && !res->paused)
		vmsync_ring_set_overflow(vm);
	if (res->flags & (VMSYNC_HARVEST_VMM_UNTRACKED |
			  VMSYNC_HARVEST_VMM_LOGS))
		vmsync_ring_set_overflow(vm);
	return 0;
}

/* Turns logging off again on the slots we turned it on for, unmaps scratch. */
static int vmsync_detach_in_mm(struct vmsync_vm *vm, void *arg)
{
	struct kvm *kvm = vm->kvm;
	struct kvm_memory_slot *ms;
	unsigned int i;
	int r;

	mutex_lock(&kvm->slots_lock);
	for (i = 0; i < vm->nr_slots; i++) {
		struct vmsync_slot *s = &vm->slots[i];

		if (!s->enabled_by_us)
			continue;
		ms = id_to_memslot(__kvm_memslots(kvm, s->as_id), s->id);
		/* Leave alone a slot the VMM has replaced since. */
		if (!ms || ms->base_gfn != s->base_gfn ||
		    ms->npages != s->npages ||
		    !(ms->flags & KVM_MEM_LOG_DIRTY_PAGES))
			continue;
		r = vmsync_set_slot_flags(kvm, ms,
					  ms->flags & ~KVM_MEM_LOG_DIRTY_PAGES);
		if (r)
			pr_warn_ratelimited("vmsync: cannot restore slot %u/%u: %d\n",
					    s->as_id, s->id, r);
	}
	mutex_unlock(&kvm->slots_lock);
	vmsync_scratch_unmap(vm);
	return 0;
}

/* Frees the KVM side and drops the VM; the ring stays until close. */
static void vmsync_forget_vm(struct vmsync_vm *vm)
{
	kvfree(vm->slots);
	vm->slots = NULL;
	vm->nr_slots = 0;
	vm->slots_synced = false;
	kvfree(vm->bitmap);
	vm->bitmap = NULL;
	vm->bitmap_bytes = 0;
	vmsync_scratch_free(vm);
	fput(vm->vm_file);
	vm->vm_file = NULL;
	vm->kvm = NULL;
}

int vmsync_vm_attach(struct vmsync_vm *vm, int vm_fd,
		     struct vmsync_attach *reply)
{
	struct file *file = fget(vm_fd);
	struct kvm *kvm;
	int r;

	if (!file)
		return -EBADF;
	if (!file_is_kvm(file)) {
		fput(file);
		return -EINVAL;
	}
	kvm = file->private_data;
	/* With KVM's dirty ring there is no dirty bitmap to read. */
	if (READ_ONCE(kvm->dirty_ring_size)) {
		fput(file);
		reply->refused = VMSYNC_REFUSED_DIRTY_RING;
		return -EOPNOTSUPP;
	}
	vm->vm_file = file;
	vm->kvm = kvm;
	r = vmsync_in_vmm_mm(vm, vmsync_attach_in_mm, reply);
	if (r) {
		if (r != -ESRCH && vm->slots_synced)
			vmsync_in_vmm_mm(vm, vmsync_detach_in_mm, NULL);
		vmsync_forget_vm(vm);
	}
	return r;
}

int vmsync_vm_harvest(struct vmsync_vm *vm, struct vmsync_harvest_result *res)
{
	return vmsync_in_vmm_mm(vm, vmsync_harvest_in_mm, res);
}

/*
 * Restores the slots and unmaps the scratch while the VMM lives; when its mm
 * is gone there is nothing left to restore (the VM dies with our reference).
 */
void vmsync_vm_detach(struct vmsync_vm *vm)
{
	vmsync_in_vmm_mm(vm, vmsync_detach_in_mm, NULL);
	vmsync_forget_vm(vm);
}
