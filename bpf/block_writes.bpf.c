// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * block_writes: record every write to a VM's disk image into a ring buffer.
 *
 * Two modes, chosen by the loader through read-only globals before load
 * (the programs of the other mode are not loaded):
 *
 * Block device mode: the VM's disk is a block device (a loop device over
 * the image). Every write request of the disk is recorded twice, with its
 * whole-disk sector and length: when it is issued to the driver
 * (raw_tp/block_rq_issue) and when it completes (raw_tp/block_rq_complete).
 * The completion record comes after the data landed, so a harvest that has
 * it can copy the blocks. The issue record is the safety net: the loader
 * keeps reporting an issued request at every harvest until it has seen the
 * request complete, or until the disk's request timeout has passed. The
 * kernel has been seen to skip a raw tracepoint program without counting it
 * anywhere (a completion run in softirq on top of an unrelated task); a
 * request whose completion is skipped that way is still reported, later
 * than its data, because its issue was seen.
 *
 * File mode: the VMM writes the image file with pwrite64/pwritev/pwritev2
 * (QEMU's aio=threads). The entry of each call of the VMM's process is kept
 * per thread; its exit records [offset, offset + bytes written). Calls that
 * change the image at an offset the program cannot know (write, writev,
 * ftruncate, pwritev2 at the file position) are recorded as "unknown", which
 * makes the loader rescan. An exit whose entry was never seen (a call in
 * flight when the programs were attached) is "unknown" too.
 *
 * Records are reserved in the ring buffer; a failed reservation is counted
 * in ring_full_drops, a failed per-thread insert in pending_full_drops. The
 * loader reads both counters at every harvest: any movement means lost
 * records and a full rescan, never silence. So does the kernel's count of
 * the runs of a program it skipped because the program was already running
 * on that CPU (bpf_prog_info.recursion_misses).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "block_writes.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Settings, written by the loader before load. */
const volatile __u32 mode = 0;		/* enum block_writes_mode */
const volatile __u32 target_dev = 0;	/* kernel dev_t: major << 20 | minor */
const volatile __u32 target_tgid = 0;	/* the VMM's process id (init pid ns) */
const volatile __s32 target_fd = -1;	/* the image's fd in that process */
/*
 * Wake the loader's epoll only once this many bytes wait in the ring: a
 * wake-up per record costs the writer a context switch per write. The loader
 * drains on a timer and at every harvest as well, so nothing waits for long.
 * 0: wake up for every record.
 */
const volatile __u64 wakeup_bytes = 0;

/* Loss counters, read by the loader. Only ever incremented. */
__u64 ring_full_drops = 0;
__u64 pending_full_drops = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024); /* the loader may resize before load */
} events SEC(".maps");

/* What a traced syscall's entry saw, kept until its exit. */
enum pending_kind {
	PENDING_OTHER_FD = 0,	/* another fd of the VMM: nothing to record */
	PENDING_AT_OFFSET = 1,	/* bytes written from `offset` (the exit's ret) */
	PENDING_RANGE = 2,	/* [offset, offset + length) (fallocate) */
	PENDING_UNKNOWN = 3,	/* content changed somewhere: rescan */
};

struct pending_call {
	__u64 offset;
	__u64 length;
	__u32 kind;
	__u32 reason;
};

/*
 * LRU: an entry whose exit never came (a thread killed in the call) is
 * evicted instead of filling the table for good. Evicting a live entry
 * makes its exit "unknown", a rescan, never a silent loss.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);		/* pid_tgid of the calling thread */
	__type(value, struct pending_call);
} pending SEC(".maps");

#define REQ_OP_BITS_MASK 0xffu	/* REQ_OP_MASK: the low 8 bits of cmd_flags */
#define RWF_APPEND_FLAG 0x10u	/* RWF_APPEND in include/uapi/linux/fs.h */

static __always_inline void emit(__u64 offset, __u64 length, __u32 flags, __u32 reason)
{
	struct block_write_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&ring_full_drops, 1);
		return;
	}
	e->offset = offset;
	e->length = length;
	e->flags = flags;
	e->reason = reason;
	if (wakeup_bytes && bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) < wakeup_bytes)
		bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	else
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/*
 * Records [sector, sector + bytes) of a write request of the target disk.
 * Reads, flushes and other disks are skipped. op_is_write(): writes,
 * discards, write-zeroes and zone resets have odd operation numbers.
 */
static __always_inline void record_request(struct request *rq, __u32 bytes, __u32 flags)
{
	struct gendisk *disk;
	__u32 op, dev;

	if (mode != BLOCK_WRITES_MODE_BLOCK_DEVICE)
		return;
	disk = BPF_CORE_READ(rq, q, disk);
	if (!disk)
		return;
	dev = ((__u32)BPF_CORE_READ(disk, major) << 20) |
	      (__u32)BPF_CORE_READ(disk, first_minor);
	if (dev != target_dev)
		return;
	op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_BITS_MASK;
	if (!(op & 1))
		return;
	emit(BPF_CORE_READ(rq, __sector) << 9, bytes, flags, 0);
}

/* block_rq_issue(struct request *rq): the driver is about to get rq. */
SEC("raw_tp/block_rq_issue")
int block_rq_issue(struct bpf_raw_tracepoint_args *ctx)
{
	struct request *rq = (struct request *)ctx->args[0];

	record_request(rq, BPF_CORE_READ(rq, __data_len), BLOCK_WRITE_ISSUED);
	return 0;
}

/*
 * block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)
 * fires at the top of blk_update_request(), before the request is advanced:
 * rq->__sector is the first sector of the nr_bytes being completed.
 */
SEC("raw_tp/block_rq_complete")
int block_rq_complete(struct bpf_raw_tracepoint_args *ctx)
{
	record_request((struct request *)ctx->args[0], (__u32)ctx->args[2], 0);
	return 0;
}

static __always_inline bool is_target_process(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == target_tgid;
}

static __always_inline void remember(__u64 fd, __u32 kind, __u64 offset, __u64 length,
				     __u32 reason)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_call call = {};

	if ((__s64)fd != (__s64)target_fd) {
		call.kind = PENDING_OTHER_FD;
	} else {
		call.kind = kind;
		call.offset = offset;
		call.length = length;
		call.reason = reason;
	}
	if (bpf_map_update_elem(&pending, &id, &call, BPF_ANY))
		__sync_fetch_and_add(&pending_full_drops, 1);
}

static __always_inline void settle(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_call *call;

	call = bpf_map_lookup_elem(&pending, &id);
	if (!call) {
		emit(0, 0, BLOCK_WRITE_UNKNOWN_RANGE, BLOCK_WRITE_REASON_EXIT_WITHOUT_ENTRY);
		return;
	}
	switch (call->kind) {
	case PENDING_AT_OFFSET:
		if (ret > 0)
			emit(call->offset, (__u64)ret, 0, 0);
		break;
	case PENDING_RANGE:
		/* A failed fallocate may have changed part of the range. */
		emit(call->offset, call->length, 0, 0);
		break;
	case PENDING_UNKNOWN:
		emit(0, 0, BLOCK_WRITE_UNKNOWN_RANGE, call->reason);
		break;
	default:
		break;
	}
	bpf_map_delete_elem(&pending, &id);
}

SEC("tracepoint/syscalls/sys_enter_pwrite64")
int enter_pwrite64(struct trace_event_raw_sys_enter *ctx)
{
	/* pwrite64(fd, buf, count, pos) */
	if (is_target_process())
		remember(ctx->args[0], PENDING_AT_OFFSET, ctx->args[3], 0, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_pwritev")
int enter_pwritev(struct trace_event_raw_sys_enter *ctx)
{
	/* pwritev(fd, vec, vlen, pos_l, pos_h); pos_h is unused on 64-bit */
	if (is_target_process())
		remember(ctx->args[0], PENDING_AT_OFFSET, ctx->args[3], 0, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_pwritev2")
int enter_pwritev2(struct trace_event_raw_sys_enter *ctx)
{
	/* pwritev2(fd, vec, vlen, pos_l, pos_h, flags) */
	__s64 pos = (__s64)ctx->args[3];
	__u64 flags = ctx->args[5];

	if (!is_target_process())
		return 0;
	if (pos == -1 || (flags & RWF_APPEND_FLAG))
		remember(ctx->args[0], PENDING_UNKNOWN, 0, 0,
			 BLOCK_WRITE_REASON_PWRITEV2_NO_OFFSET);
	else
		remember(ctx->args[0], PENDING_AT_OFFSET, (__u64)pos, 0, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_write")
int enter_write(struct trace_event_raw_sys_enter *ctx)
{
	if (is_target_process())
		remember(ctx->args[0], PENDING_UNKNOWN, 0, 0,
			 BLOCK_WRITE_REASON_FILE_POSITION_WRITE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_writev")
int enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	if (is_target_process())
		remember(ctx->args[0], PENDING_UNKNOWN, 0, 0,
			 BLOCK_WRITE_REASON_FILE_POSITION_WRITE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_fallocate")
int enter_fallocate(struct trace_event_raw_sys_enter *ctx)
{
	/* fallocate(fd, mode, offset, len): punch hole / zero range change data */
	if (is_target_process())
		remember(ctx->args[0], PENDING_RANGE, ctx->args[2], ctx->args[3], 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_ftruncate")
int enter_ftruncate(struct trace_event_raw_sys_enter *ctx)
{
	if (is_target_process())
		remember(ctx->args[0], PENDING_UNKNOWN, 0, 0, BLOCK_WRITE_REASON_TRUNCATE);
	return 0;
}

/* One exit program per traced syscall; they all settle the thread's entry. */
#define DEFINE_EXIT(name)						\
SEC("tracepoint/syscalls/sys_exit_" #name)				\
int exit_##name(struct trace_event_raw_sys_exit *ctx)			\
{									\
	if (is_target_process())					\
		settle(ctx->ret);					\
	return 0;							\
}

DEFINE_EXIT(pwrite64)
DEFINE_EXIT(pwritev)
DEFINE_EXIT(pwritev2)
DEFINE_EXIT(write)
DEFINE_EXIT(writev)
DEFINE_EXIT(fallocate)
DEFINE_EXIT(ftruncate)
