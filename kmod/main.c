// SPDX-License-Identifier: GPL-2.0
/*
 * vmsync.ko: /dev/vmsync, its ioctls and the gfn ring shared with the
 * controller by mmap.  Everything that talks to KVM is in vm.c.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "internal.h"

static unsigned int ring_entries = 65536;
module_param(ring_entries, uint, 0444);
MODULE_PARM_DESC(ring_entries,
		 "Default number of gfn ring entries per attach (power of two)");

static unsigned int max_ring_entries = 1U << 22;
module_param(max_ring_entries, uint, 0444);
MODULE_PARM_DESC(max_ring_entries,
		 "Largest ring an attach may ask for, in entries (power of two)");

/* entries[] starts on its own cache lines after the header. */
#define VMSYNC_ENTRIES_OFFSET	256

static bool is_power_of_two(u64 n)
{
	return n && !(n & (n - 1));
}

/*
 * Producer side of the ring.  The controller may write anything into the
 * mapping, so our own producer index and overflow flag are the truth and the
 * header only mirrors them; a consumer index that makes no sense reads as a
 * full ring.
 */
void vmsync_ring_push(struct vmsync_vm *vm, u64 entry,
		      struct vmsync_harvest_result *res)
{
	/* Pairs with the consumer's release: it is done with those slots. */
	u64 consumer = smp_load_acquire(&vm->ring->consumer);

	if (vm->producer - consumer >= vm->ring_entries) {
		res->flags |= VMSYNC_HARVEST_RING_FULL;
		vmsync_ring_set_overflow(vm);
		return;
	}
	WRITE_ONCE(vm->entries[vm->producer & (vm->ring_entries - 1)], entry);
	vm->producer++;
	res->published++;
}

/* Makes the pushed entries visible: entries before the producer index. */
void vmsync_ring_publish(struct vmsync_vm *vm)
{
	/* Pairs with the consumer's acquire of producer. */
	smp_store_release(&vm->ring->producer, vm->producer);
}

void vmsync_ring_set_overflow(struct vmsync_vm *vm)
{
	vm->overflow = true;
	WRITE_ONCE(vm->ring->flags, VMSYNC_RING_OVERFLOW);
}

static int vmsync_ring_alloc(struct vmsync_vm *vm, u32 entries)
{
	size_t bytes = PAGE_ALIGN(VMSYNC_ENTRIES_OFFSET + (size_t)entries * 8);
	void *ring = vmalloc_user(bytes);

	BUILD_BUG_ON(sizeof(struct vmsync_ring_header) > VMSYNC_ENTRIES_OFFSET);
	if (!ring)
		return -ENOMEM;
	vm->ring = ring;
	vm->entries = ring + VMSYNC_ENTRIES_OFFSET;
	vm->ring_entries = entries;
	vm->ring_bytes = bytes;
	vm->producer = 0;
	vm->overflow = false;
	vm->ring->entries = entries;
	vm->ring->entries_offset = VMSYNC_ENTRIES_OFFSET;
	return 0;
}

static long vmsync_get_version(void __user *argp)
{
	struct vmsync_version v = {
		.abi_version = VMSYNC_ABI_VERSION,
		.features = VMSYNC_FEATURE_RING | VMSYNC_FEATURE_SLOT_TRACKING |
			    VMSYNC_FEATURE_VMM_WRITES,
	};

	if (copy_to_user(argp, &v, sizeof(v)))
		return -EFAULT;
	return 0;
}

static bool all_zero(const __u64 *words, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (words[i])
			return false;
	return true;
}

static long vmsync_attach(struct vmsync_vm *vm, void __user *argp)
{
	struct vmsync_attach a;
	u32 entries;
	int r;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (a.flags || a.pad || a.pad2 || a.slots || a.ring_bytes ||
	    a.refused || a.pad3 || a.refused_gpa ||
	    !all_zero(a.reserved, ARRAY_SIZE(a.reserved)))
		return -EINVAL;
	entries = a.ring_entries ? a.ring_entries : ring_entries;
	if (!is_power_of_two(entries) || entries > max_ring_entries)
		return -EINVAL;

	mutex_lock(&vm->lock);
	r = -EBUSY;
	if (vm->used)
		goto out;
	r = vmsync_ring_alloc(vm, entries);
	if (r)
		goto out;
	r = vmsync_vm_attach(vm, a.vm_fd, &a);
	if (r) {
		vfree(vm->ring);
		vm->ring = NULL;
		/* Say why, where the module knows (the error stays r). */
		if (a.refused && copy_to_user(argp, &a, sizeof(a)))
			r = -EFAULT;
		goto out;
	}
	vm->used = true;
	/* Pairs with vmsync_mmap(): ring_bytes and the header are set. */
	smp_store_release(&vm->mappable_ring, vm->ring);
	a.ring_entries = vm->ring_entries;
	a.ring_bytes = vm->ring_bytes;
	a.slots = vm->nr_slots;
	if (copy_to_user(argp, &a, sizeof(a))) {
		/* Stay attached: close or detach undoes it. */
		r = -EFAULT;
	}
out:
	mutex_unlock(&vm->lock);
	return r;
}

static long vmsync_harvest(struct vmsync_vm *vm, void __user *argp)
{
	struct vmsync_harvest h;
	struct vmsync_harvest_result res = {};
	int r;

	if (copy_from_user(&h, argp, sizeof(h)))
		return -EFAULT;
	if (h.published || h.dirty || h.slots || h.flags || h.vmm_written ||
	    h.vmm_busy || (h.request & ~VMSYNC_HARVEST_PAUSED) || h.pad)
		return -EINVAL;
	res.paused = h.request & VMSYNC_HARVEST_PAUSED;

	mutex_lock(&vm->lock);
	if (!vm->vm_file) {
		r = -ENOTCONN;
		goto out;
	}
	r = vmsync_vm_harvest(vm, &res);
	/*
	 * Whatever was pushed before an error is real: publish it.  But KVM
	 * may have cleared bits we then failed to read: rescan.
	 */
	if (r)
		vmsync_ring_set_overflow(vm);
	vmsync_ring_publish(vm);
	if (r == -ESRCH) {
		/* The VMM's address space is gone: the VM is dead. */
		vmsync_vm_detach(vm);
	}
out:
	mutex_unlock(&vm->lock);
	if (r)
		return r;
	h.published = res.published;
	h.dirty = res.dirty;
	h.slots = res.slots;
	h.flags = res.flags;
	h.vmm_written = min_t(u64, res.vmm_written, U32_MAX);
	h.vmm_busy = min_t(u64, res.vmm_busy, U32_MAX);
	if (copy_to_user(argp, &h, sizeof(h)))
		return -EFAULT;
	return 0;
}

static long vmsync_ioctl(struct file *file, unsigned int cmd,
			 unsigned long arg)
{
	struct vmsync_vm *vm = file->private_data;
	void __user *argp = (void __user *)arg;
	long r = 0;

	switch (cmd) {
	case VMSYNC_IOC_GET_VERSION:
		return vmsync_get_version(argp);
	case VMSYNC_IOC_ATTACH:
		return vmsync_attach(vm, argp);
	case VMSYNC_IOC_HARVEST:
		return vmsync_harvest(vm, argp);
	case VMSYNC_IOC_DETACH:
		mutex_lock(&vm->lock);
		if (vm->vm_file)
			vmsync_vm_detach(vm);
		else
			r = -ENOTCONN;
		mutex_unlock(&vm->lock);
		return r;
	case VMSYNC_IOC_CLEAR_OVERFLOW:
		mutex_lock(&vm->lock);
		if (vm->ring) {
			vm->overflow = false;
			WRITE_ONCE(vm->ring->flags, 0);
		} else {
			r = -ENOTCONN;
		}
		mutex_unlock(&vm->lock);
		return r;
	default:
		return -ENOTTY;
	}
}

static int vmsync_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct vmsync_vm *vm = file->private_data;
	struct vmsync_ring_header *ring;
	unsigned long len = vma->vm_end - vma->vm_start;

	/* Pairs with the release in vmsync_attach(). */
	ring = smp_load_acquire(&vm->mappable_ring);
	if (vma->vm_pgoff)
		return -EINVAL;
	if (!ring)
		return -ENOTCONN;
	/* ring_bytes was set before mappable_ring and never changes. */
	if (len > vm->ring_bytes)
		return -EINVAL;
	return remap_vmalloc_range(vma, ring, 0);
}

static int vmsync_open(struct inode *inode, struct file *file)
{
	struct vmsync_vm *vm = kzalloc(sizeof(*vm), GFP_KERNEL);

	if (!vm)
		return -ENOMEM;
	mutex_init(&vm->lock);
	file->private_data = vm;
	return 0;
}

/* Last reference to the file: no mapping of the ring is left either. */
static int vmsync_release(struct inode *inode, struct file *file)
{
	struct vmsync_vm *vm = file->private_data;

	mutex_lock(&vm->lock);
	if (vm->vm_file)
		vmsync_vm_detach(vm);
	mutex_unlock(&vm->lock);
	vfree(vm->ring);
	mutex_destroy(&vm->lock);
	kfree(vm);
	return 0;
}

static const struct file_operations vmsync_fops = {
	.owner = THIS_MODULE,
	.open = vmsync_open,
	.release = vmsync_release,
	.unlocked_ioctl = vmsync_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = vmsync_mmap,
	.llseek = noop_llseek,
};

static struct miscdevice vmsync_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "vmsync",
	.fops = &vmsync_fops,
	.mode = 0600,
};

static int __init vmsync_init(void)
{
	int err;

	if (!is_power_of_two(ring_entries) ||
	    !is_power_of_two(max_ring_entries) ||
	    ring_entries > max_ring_entries)
		return -EINVAL;
	err = vmsync_check_layout();
	if (err)
		return err;
	return misc_register(&vmsync_misc);
}

static void __exit vmsync_exit(void)
{
	misc_deregister(&vmsync_misc);
}

module_init(vmsync_init);
module_exit(vmsync_exit);
MODULE_LICENSE("GPL");
MODULE_VERSION("0.3");
MODULE_DESCRIPTION("vmsync: harvest dirty pages of another process's KVM VM");
