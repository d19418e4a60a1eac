/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Settings, counters and the outage schedule shared by bpf/link_loss.bpf.c
 * and its loader (userspace/lab/link_loss.cc). Plain C types only: this
 * header is compiled both with vmlinux.h (BPF side) and with the C++
 * toolchain, so that both sides compute one schedule.
 */
#ifndef VMSYNC_BPF_LINK_LOSS_H
#define VMSYNC_BPF_LINK_LOSS_H

/*
 * What one direction of an emulated link does to the packets it sends; the
 * one element of the `settings` array map, written by the loader at any time.
 */
struct link_loss_settings {
	/* An IP packet is dropped when a 32-bit draw is below this: probability * 2^32. */
	unsigned long long loss_threshold;
	/*
	 * Outages: time since `outage_epoch_ns` (CLOCK_MONOTONIC, the clock of
	 * bpf_ktime_get_ns) is cut into slots of `outage_period_ns`; each slot
	 * holds one outage of `outage_min_ns`..`outage_max_ns` at an offset drawn,
	 * like the length, from `outage_seed` and the slot's number. Every packet
	 * sent inside an outage is dropped. 0: no outages.
	 */
	unsigned long long outage_period_ns;
	unsigned long long outage_min_ns;
	unsigned long long outage_max_ns;
	unsigned long long outage_epoch_ns;
	unsigned long long outage_seed;
};

/*
 * What the program saw, per CPU in the `counters` per-CPU array map; the
 * loader adds the CPUs up. Only ever incremented.
 */
struct link_loss_counters {
	unsigned long long packets;	   /* every packet the program saw */
	unsigned long long dropped;	   /* dropped by the loss draw */
	unsigned long long outage_dropped; /* dropped inside an outage */
	unsigned long long offloaded;	   /* packets that carried more than one segment (GSO) */
};

/* splitmix64's output function: a 64-bit mix with every input bit reaching every output bit. */
static inline unsigned long long link_loss_mix(unsigned long long x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/*
 * The outage of slot `slot`: [*start, *end) in CLOCK_MONOTONIC nanoseconds.
 * Needs outage_period_ns > outage_max_ns >= outage_min_ns (the loader checks).
 */
static inline void link_loss_outage(const struct link_loss_settings *s, unsigned long long slot,
				    unsigned long long *start, unsigned long long *end)
{
	unsigned long long draw = link_loss_mix(s->outage_seed ^ link_loss_mix(slot));
	unsigned long long length = s->outage_min_ns + (draw & 0xffffffffULL) % (s->outage_max_ns - s->outage_min_ns + 1);
	unsigned long long offset = (draw >> 32) % (s->outage_period_ns - length + 1);

	*start = s->outage_epoch_ns + slot * s->outage_period_ns + offset;
	*end = *start + length;
}

#endif /* VMSYNC_BPF_LINK_LOSS_H */
