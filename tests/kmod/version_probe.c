/* Opens /dev/vmsync and checks its ABI version. Built static for the test
 * initramfs. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "../../kmod/uapi/vmsync.h"

int main(void)
{
	struct vmsync_version v;
	int fd = open(VMSYNC_DEVICE_PATH, O_RDWR);

	if (fd < 0) {
		fprintf(stderr, "open %s: %s\n", VMSYNC_DEVICE_PATH, strerror(errno));
		return 1;
	}
	memset(&v, 0, sizeof(v));
	if (ioctl(fd, VMSYNC_IOC_GET_VERSION, &v) < 0) {
		fprintf(stderr, "VMSYNC_IOC_GET_VERSION: %s\n", strerror(errno));
		return 1;
	}
	printf("vmsync abi %u features 0x%llx\n", v.abi_version,
	       (unsigned long long)v.features);
	if (v.abi_version != VMSYNC_ABI_VERSION)
		return 1;
	printf("VERSION_OK\n");
	return 0;
}
