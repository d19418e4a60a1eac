/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Records shared by bpf/block_writes.bpf.c and its loader
 * (userspace/harvest/bpf_block_source.cc). Plain C types only: this header is
 * compiled both with vmlinux.h (BPF side) and with the C++ toolchain.
 */
#ifndef VMSYNC_BPF_BLOCK_WRITES_H
#define VMSYNC_BPF_BLOCK_WRITES_H

/* What the programs trace; written to the `mode` global before load. */
enum block_writes_mode {
	BLOCK_WRITES_MODE_BLOCK_DEVICE = 1, /* completed write requests on a disk */
	BLOCK_WRITES_MODE_FILE = 2,	    /* write syscalls of one process on one fd */
};

/* The record's range is unknown: the loader must treat every block as written. */
#define BLOCK_WRITE_UNKNOWN_RANGE 0x1u
/*
 * Block device mode: the request was issued, not completed; its data may
 * land after this record is read. The completion comes as a record without
 * this flag.
 */
#define BLOCK_WRITE_ISSUED 0x2u

/*
 * One write to the VM's disk image. [offset, offset + length) is a byte
 * range of the image; block device sectors are converted to bytes in the
 * program. With BLOCK_WRITE_UNKNOWN_RANGE set, offset and length are 0
 * and `reason` says which call could not be placed.
 */
struct block_write_event {
	unsigned long long offset;
	unsigned long long length;
	unsigned int flags;
	unsigned int reason; /* enum block_write_unknown_reason, or 0 */
};

/* Why a record has BLOCK_WRITE_UNKNOWN_RANGE. Numbers are never reused. */
enum block_write_unknown_reason {
	BLOCK_WRITE_REASON_NONE = 0,
	/* A pwrite-family exit whose entry was not seen (in flight at attach). */
	BLOCK_WRITE_REASON_EXIT_WITHOUT_ENTRY = 1,
	/* write(2)/writev(2) on the image fd: the offset is the file position. */
	BLOCK_WRITE_REASON_FILE_POSITION_WRITE = 2,
	/* pwritev2(2) with offset -1 or RWF_APPEND. */
	BLOCK_WRITE_REASON_PWRITEV2_NO_OFFSET = 3,
	/* ftruncate(2) on the image fd. */
	BLOCK_WRITE_REASON_TRUNCATE = 4,
};

#endif /* VMSYNC_BPF_BLOCK_WRITES_H */
