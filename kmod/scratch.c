// SPDX-License-Identifier: GPL-2.0
/*
 * vmsync.ko: the scratch area in the VMM's address space that KVM's dirty-log
 * ioctls take their arguments from (they must be user memory of the VM's
 * mm).  Called from the worker that adopted that mm (vm.c).
 *
 * Three mappings, reserved together so they stay adjacent:
 *
 *   [ arguments page | CLEAR bitmap ]  our pages, read-only to the VMM
 *   [ GET bitmap ]                     anonymous, KVM writes it
 *   [ guard ]                          PROT_NONE, KVM_MEM_MAX_NR_PAGES bits
 *
 * The ioctl arguments and the bitmap KVM_CLEAR_DIRTY_LOG reads are written
 * by the module through its own kernel address and are read-only in the
 * VMM (no VM_MAYWRITE, so neither mprotect() nor /proc/PID/mem can change
 * them): a VMM thread cannot make KVM clear bits the module never read.  The
 * GET bitmap must be writable for KVM; a VMM writing into it can only make
 * the module read wrong bits, which are then exactly the ones it clears and
 * reports (with manual protection; without it KVM clears while it copies).
 * The guard turns a GET into -EFAULT when the VMM re-created a slot larger
 * between our snapshot and the ioctl, instead of KVM writing past the
 * bitmap into the VMM's memory.
 *
 * The read-only part is a mapping of an anonymous-inode file with our
 * vm_operations_struct: at unmap the module checks that each of the three
 * is still the mapping it made (our vm_ops and owner, or anonymous with the
 * same bounds and protection) and leaves alone anything the VMM put there
 * since.  It shows as [vmsync-scratch] in /proc/PID/maps.
 */
#include <linux/anon_inodes.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/sched/mm.h>
#include <linux/string.h>
#include <linux/vmalloc.h>

#include "internal.h"

/* A slot's bitmap is at most KVM_MEM_MAX_NR_PAGES bits. */
#define VMSYNC_SCRATCH_GUARD	(ALIGN(KVM_MEM_MAX_NR_PAGES, BITS_PER_LONG) / 8)

static const char *vmsync_scratch_name(struct vm_area_struct *vma)
{
	return "[vmsync-scratch]";
}

static const struct vm_operations_struct vmsync_scratch_vm_ops = {
	.name = vmsync_scratch_name,
};

/*
 * Mapped once, by vmsync_scratch_fit(): the file forgets its owner then, so
 * that a mapping the VMM moved away (which keeps the file) cannot be
 * repeated through /proc/PID/map_files after the owner is gone.
 */
static int vmsync_scratch_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct vmsync_vm *vm = file->private_data;
	int r;

	if (!vm)
		return -ENODEV;
	if (vma->vm_pgoff || vma->vm_end - vma->vm_start != vm->scratch.ro_bytes ||
	    (vma->vm_flags & (VM_WRITE | VM_EXEC)))
		return -EINVAL;
	vma->vm_flags &= ~(VM_MAYWRITE | VM_MAYEXEC);
	vma->vm_flags |= VM_DONTCOPY | VM_DONTEXPAND | VM_DONTDUMP;
	vma->vm_ops = &vmsync_scratch_vm_ops;
	vma->vm_private_data = vm;
	r = remap_vmalloc_range(vma, vm->scratch.ro, 0);
	if (!r)
		file->private_data = NULL;
	return r;
}

static const struct file_operations vmsync_scratch_fops = {
	.owner = THIS_MODULE,
	.mmap = vmsync_scratch_mmap,
};

/* Is [start, end) exactly (or, for the guard, within) the mapping we made? */
static bool vmsync_scratch_part(struct mm_struct *mm, struct vmsync_vm *vm,
				unsigned long start, unsigned long end,
				bool ours, unsigned long prot_flags)
{
	struct vm_area_struct *vma = find_vma(mm, start);
	const unsigned long access = VM_READ | VM_WRITE | VM_EXEC;

	if (!vma || vma->vm_start > start || vma->vm_end < end)
		return false;
	if (ours)
		return vma->vm_ops == &vmsync_scratch_vm_ops &&
			vma->vm_private_data == vm &&
			vma->vm_start == start && vma->vm_end == end;
	/* Anonymous: the guard may have merged with a neighbour like it. */
	if (vma->vm_file || vma->vm_ops ||
	    (vma->vm_flags & access) != prot_flags)
		return false;
	return prot_flags == 0 || (vma->vm_start == start && vma->vm_end == end);
}

/* Unmaps what is still ours of the scratch; in the VMM's mm. */
void vmsync_scratch_unmap(struct vmsync_vm *vm)
{
	struct vmsync_scratch *sc = &vm->scratch;
	struct mm_struct *mm = current->mm;
	unsigned long ro = sc->addr, rw = ro + sc->ro_bytes;
	unsigned long guard = rw + sc->rw_bytes, end = ro + sc->mapped;
	bool keep[3];

	if (!sc->addr)
		return;
	mmap_read_lock(mm);
	keep[0] = !vmsync_scratch_part(mm, vm, ro, rw, true, 0);
	keep[1] = !vmsync_scratch_part(mm, vm, rw, guard, false,
				       VM_READ | VM_WRITE);
	keep[2] = !vmsync_scratch_part(mm, vm, guard, end, false, 0);
	mmap_read_unlock(mm);
	if (!keep[0])
		vm_munmap(ro, rw - ro);
	if (!keep[1])
		vm_munmap(rw, guard - rw);
	if (!keep[2])
		vm_munmap(guard, end - guard);
	if (keep[0] || keep[1] || keep[2])
		pr_warn_ratelimited("vmsync: the VMM replaced part of the scratch at %#lx; left it as found\n",
				    ro);
	sc->addr = 0;
}

/* Frees the kernel side; the VMM's mapping, if any is left, keeps its pages. */
void vmsync_scratch_free(struct vmsync_vm *vm)
{
	vfree(vm->scratch.ro);
	memset(&vm->scratch, 0, sizeof(vm->scratch));
}

/*
 * Makes the scratch hold a bitmap of @bitmap_bytes (page aligned); in the
 * VMM's mm.  A larger one replaces the old mapping.
 */
int vmsync_scratch_fit(struct vmsync_vm *vm, size_t bitmap_bytes)
{
	struct vmsync_scratch *sc = &vm->scratch;
	size_t ro_bytes = PAGE_SIZE + bitmap_bytes;
	size_t total = ro_bytes + bitmap_bytes + VMSYNC_SCRATCH_GUARD;
	struct file *file;
	unsigned long addr;
	void *ro;

	if (sc->addr && bitmap_bytes <= sc->rw_bytes)
		return 0;
	vmsync_scratch_unmap(vm);
	vmsync_scratch_free(vm);
	ro = vmalloc_user(ro_bytes);
	if (!ro)
		return -ENOMEM;
	sc->ro = ro;
	sc->ro_bytes = ro_bytes;
	file = anon_inode_getfile("[vmsync-scratch]", &vmsync_scratch_fops, vm,
				  O_RDONLY);
	if (IS_ERR(file))
		return PTR_ERR(file);
	/* Reserve everything inaccessible, then open the two parts. */
	addr = vm_mmap(NULL, 0, total, PROT_NONE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, 0);
	if (IS_ERR_VALUE(addr)) {
		fput(file);
		return (int)addr;
	}
	if (vm_mmap(file, addr, ro_bytes, PROT_READ, MAP_SHARED | MAP_FIXED,
		    0) != addr ||
	    vm_mmap(NULL, addr + ro_bytes, bitmap_bytes,
		    PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, 0) !=
		    addr + ro_bytes) {
		fput(file);
		vm_munmap(addr, total);
		return -ENOMEM;
	}
	fput(file);	/* the mapping holds its own reference */
	sc->addr = addr;
	sc->rw_bytes = bitmap_bytes;
	sc->mapped = total;
	return 0;
}

/* Where KVM reads the arguments and the CLEAR bitmap, and writes GET's. */
void __user *vmsync_scratch_args(struct vmsync_vm *vm)
{
	return (void __user *)vm->scratch.addr;
}

void __user *vmsync_scratch_clear_bitmap(struct vmsync_vm *vm)
{
	return (void __user *)(vm->scratch.addr + PAGE_SIZE);
}

void __user *vmsync_scratch_get_bitmap(struct vmsync_vm *vm)
{
	return (void __user *)(vm->scratch.addr + vm->scratch.ro_bytes);
}

/* Our writes into the read-only part, through the kernel's address. */
void vmsync_scratch_set_args(struct vmsync_vm *vm, const void *arg, size_t len)
{
	memcpy(vm->scratch.ro, arg, len);
}

void vmsync_scratch_set_clear_bitmap(struct vmsync_vm *vm,
				     const unsigned long *bitmap, size_t bytes)
{
	memcpy(vm->scratch.ro + PAGE_SIZE, bitmap, bytes);
}
