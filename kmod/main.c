// SPDX-License-Identifier: GPL-2.0
/*
 * vmsync.ko: /dev/vmsync, entry point.  This first step only registers the
 * misc device and answers the version query; attach/harvest are not yet
 * implemented and return -EOPNOTSUPP.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/uaccess.h>

#include "uapi/vmsync.h"

static unsigned int ring_entries = 65536;
module_param(ring_entries, uint, 0444);
MODULE_PARM_DESC(ring_entries,
		 "Default number of gfn ring entries per attach (power of two)");

static long vmsync_get_version(void __user *argp)
{
	struct vmsync_version v = {
		.abi_version = VMSYNC_ABI_VERSION,
		.features = 0,	/* nothing usable yet */
	};

	if (copy_to_user(argp, &v, sizeof(v)))
		return -EFAULT;
	return 0;
}

static long vmsync_ioctl(struct file *file, unsigned int cmd,
			 unsigned long arg)
{
	switch (cmd) {
	case VMSYNC_IOC_GET_VERSION:
		return vmsync_get_version((void __user *)arg);
	case VMSYNC_IOC_ATTACH:
	case VMSYNC_IOC_DETACH:
	case VMSYNC_IOC_HARVEST:
	case VMSYNC_IOC_CLEAR_OVERFLOW:
		return -EOPNOTSUPP;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations vmsync_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = vmsync_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
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
	if (!ring_entries || (ring_entries & (ring_entries - 1)))
		return -EINVAL;
	return misc_register(&vmsync_misc);
}

static void __exit vmsync_exit(void)
{
	misc_deregister(&vmsync_misc);
}

module_init(vmsync_init);
module_exit(vmsync_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmsync: harvest dirty pages of another process's KVM VM");
